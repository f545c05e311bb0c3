/**
 * The qcow2 header (QEMU `docs/interop/qcow2.txt`), versions 2 and 3, and
 * its extensions. Everything is big-endian.
 *
 * ```
 *  0 magic "QFI\xfb"        4 version (2|3)          8 backing_file_offset u64
 * 16 backing_file_size     20 cluster_bits          24 size u64
 * 32 crypt_method          36 l1_size               40 l1_table_offset u64
 * 48 refcount_table_offset u64                     56 refcount_table_clusters
 * 60 nb_snapshots          64 snapshots_offset u64                       = 72 (v2)
 * 72 incompatible_features 80 compatible_features  88 autoclear_features
 * 96 refcount_order       100 header_length       104 compression_type u8 = 112
 * ```
 * Extensions follow the header (type u32, length u32, data padded to 8)
 * up to an end marker; the backing file name sits after them in cluster 0.
 * Unknown extensions and unknown header fields are kept byte for byte:
 * this driver changes the header only by patching fixed fields in place
 * (all inside the first 512-byte sector, so a torn write cannot mix them).
 * @module
 */

export const QCOW2_MAGIC = 0x514649fb;
export const cluster_bits_min = 9;
/** QEMU's implementation limit: 2 MiB clusters. */
export const cluster_bits_max = 21;
/** QEMU refuses backing names longer than this. */
export const backing_name_bytes_max = 1023;
/** QEMU's limits on table sizes (bytes). */
export const l1_table_bytes_max = 32 << 20;
export const refcount_table_bytes_max = 8 << 20;
export const snapshots_max = 65536;

/** Whether an L1 table of `entries` is over QEMU's limit (active or snapshot). */
export function l1TooLarge(entries: number): boolean {
  return entries * 8 > l1_table_bytes_max;
}
/** Bytes of the v3 header this driver writes (fields through compression_type, padded). */
export const V3_HEADER_BYTES = 112;
export const V2_HEADER_BYTES = 72;

export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const INCOMPAT_DIRTY = 1n;
export const INCOMPAT_CORRUPT = 2n;
export const INCOMPAT_DATA_FILE = 4n;
export const INCOMPAT_COMPRESSION = 8n;
export const INCOMPAT_EXTENDED_L2 = 16n;
export const COMPAT_LAZY_REFCOUNTS = 1n;
export const AUTOCLEAR_BITMAPS = 1n;
export const AUTOCLEAR_RAW_DATA = 2n;

/** Offsets of the fields this driver patches. */
export const FIELD_REFCOUNT_TABLE_OFFSET = 48;
export const FIELD_INCOMPATIBLE = 72;
export const FIELD_AUTOCLEAR = 88;

/** QEMU's names for the features it knows (type: 0 incompatible, 1 compatible, 2 autoclear). */
export const KNOWN_FEATURES: { type: number; bit: number; name: string }[] = [
  { type: 0, bit: 0, name: "dirty bit" },
  { type: 0, bit: 1, name: "corrupt bit" },
  { type: 0, bit: 2, name: "external data file" },
  { type: 0, bit: 3, name: "compression type" },
  { type: 0, bit: 4, name: "extended L2 entries" },
  { type: 1, bit: 0, name: "lazy refcounts" },
  { type: 2, bit: 0, name: "bitmaps" },
  { type: 2, bit: 1, name: "raw external data" },
];

/** An image we cannot open, with the reason; `check` reports it as unusable. */
export class Qcow2FormatError extends Error {
  constructor(path: string, problem: string) {
    super(`${path}: ${problem}`);
    this.name = "Qcow2FormatError";
  }
}

/** One header extension as stored. */
export interface HeaderExtension {
  type: number;
  data: Uint8Array;
}

/** A decoded and validated qcow2 header. */
export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  sizeBytes: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Every extension in file order (the end marker excluded). */
  extensions: HeaderExtension[];
  backingName?: string;
  backingFormat?: string;
  dataFileName?: string;
  /** Names from the feature name table, by `type:bit`. */
  featureNames: Map<string, string>;
  crypto?: { offsetBytes: number; lengthBytes: number };
  bitmaps?: { count: number; directoryBytes: number; directoryOffset: number };
  /** Where the extension area ends (the end marker's first byte). */
  extensionsEndBytes: number;
}

/** Cluster geometry derived from a header. */
export interface Qcow2Geometry {
  clusterBits: number;
  clusterBytes: number;
  /** Entries per L2 table (one cluster of u64). */
  l2Entries: number;
  l2Bits: number;
  /** Guest bytes one L2 table covers. */
  l2SpanBytes: number;
  refcountBits: number;
  refcountOrder: number;
  /** Refcount entries per refcount block. */
  refblockEntries: number;
  /** Largest refcount the width holds. */
  refcountMax: number;
}

export function geometryOf(header: Qcow2Header): Qcow2Geometry {
  const clusterBytes = 2 ** header.clusterBits;
  const refcountBits = 2 ** header.refcountOrder;
  return {
    clusterBits: header.clusterBits,
    clusterBytes,
    l2Entries: clusterBytes / 8,
    l2Bits: header.clusterBits - 3,
    l2SpanBytes: clusterBytes * (clusterBytes / 8),
    refcountBits,
    refcountOrder: header.refcountOrder,
    refblockEntries: (clusterBytes * 8) / refcountBits,
    refcountMax: refcountBits === 64 ? Number.MAX_SAFE_INTEGER : 2 ** refcountBits - 1,
  };
}

export function u64(view: DataView, offset: number): number {
  return view.getUint32(offset) * 2 ** 32 + view.getUint32(offset + 4);
}

export function setU64(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, Math.floor(value / 2 ** 32));
  view.setUint32(offset + 4, value >>> 0);
}

/** Whether the first bytes of a file are a qcow2 (version 2 or 3) header. */
export function isQcow2Header(head: Uint8Array): boolean {
  if (head.byteLength < V2_HEADER_BYTES) return false;
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const version = view.getUint32(4);
  return view.getUint32(0) === QCOW2_MAGIC && (version === 2 || version === 3);
}

/** Entries of an L1 table covering `sizeBytes`. */
export function l1EntriesFor(sizeBytes: number, clusterBits: number): number {
  return Math.ceil(sizeBytes / 2 ** (clusterBits * 2 - 3));
}

/** The name of feature `bit` of `type`, from the image's table or QEMU's. */
export function featureName(header: Qcow2Header, type: number, bit: number): string | undefined {
  return header.featureNames.get(`${type}:${bit}`) ??
    KNOWN_FEATURES.find((f) => f.type === type && f.bit === bit)?.name;
}

/**
 * Decodes and validates the header in `head` (the first cluster, or the
 * whole file when shorter) of a file of `fileBytes`. Throws
 * {@linkcode Qcow2FormatError} naming the problem, with QEMU's wording where
 * it has one.
 */
export function decodeHeader(path: string, head: Uint8Array, fileBytes: number): Qcow2Header {
  const fail = (problem: string): never => {
    throw new Qcow2FormatError(path, problem);
  };
  if (head.byteLength < V2_HEADER_BYTES || fileBytes < V2_HEADER_BYTES) {
    fail("file too short for a qcow2 header");
  }
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (view.getUint32(0) !== QCOW2_MAGIC) fail("not a qcow2 image (bad magic)");
  const version = view.getUint32(4);
  if (version !== 2 && version !== 3) fail(`qcow2 version ${version} is not supported (2 or 3)`);
  const h: Qcow2Header = {
    version: version as 2 | 3,
    backingFileOffset: u64(view, 8),
    backingFileSize: view.getUint32(16),
    clusterBits: view.getUint32(20),
    sizeBytes: Number(view.getBigUint64(24)),
    cryptMethod: view.getUint32(32),
    l1Size: view.getUint32(36),
    l1TableOffset: u64(view, 40),
    refcountTableOffset: u64(view, 48),
    refcountTableClusters: view.getUint32(56),
    nbSnapshots: view.getUint32(60),
    snapshotsOffset: u64(view, 64),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_BYTES,
    compressionType: 0,
    extensions: [],
    featureNames: new Map(),
    extensionsEndBytes: V2_HEADER_BYTES,
  };
  if (BigInt(h.sizeBytes) !== view.getBigUint64(24) || h.sizeBytes > 2 ** 63) {
    fail(`virtual size ${view.getBigUint64(24)} is not supported`);
  }
  if (h.clusterBits < cluster_bits_min || h.clusterBits > cluster_bits_max) {
    fail(`unsupported cluster size: 2^${h.clusterBits} (512 bytes to 2 MiB)`);
  }
  const clusterBytes = 2 ** h.clusterBits;
  if (version === 3) _decodeV3Fields(h, view, clusterBytes, fail);
  _decodeExtensions(h, view, clusterBytes, fail);
  _validateTables(h, clusterBytes, fail);
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > backing_name_bytes_max || h.backingFileSize === 0) {
      fail(`backing file name length ${h.backingFileSize} is invalid (1..1023)`);
    }
    if (h.backingFileOffset + h.backingFileSize > Math.min(clusterBytes, head.byteLength)) {
      fail("backing file name lies outside the header cluster");
    }
    const name = head.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize);
    h.backingName = new TextDecoder().decode(name);
    if (h.backingName.includes("\0")) fail("backing file name contains a NUL byte");
  }
  return h;
}

function _decodeV3Fields(
  h: Qcow2Header,
  view: DataView,
  clusterBytes: number,
  fail: (problem: string) => never,
): void {
  if (view.byteLength < 104) fail("qcow2 header too short");
  h.incompatible = view.getBigUint64(72);
  h.compatible = view.getBigUint64(80);
  h.autoclear = view.getBigUint64(88);
  h.refcountOrder = view.getUint32(96);
  h.headerLength = view.getUint32(100);
  if (h.headerLength < 104) fail("qcow2 header too short");
  if (h.headerLength > clusterBytes || h.headerLength > view.byteLength) {
    fail("qcow2 header exceeds cluster size");
  }
  if (h.headerLength % 8 !== 0) fail(`header_length ${h.headerLength} is not a multiple of 8`);
  if (h.refcountOrder > 6) {
    fail("reference count entry width too large; may not exceed 64 bits");
  }
  if (h.headerLength > 104) h.compressionType = view.getUint8(104);
}

function _decodeExtensions(
  h: Qcow2Header,
  view: DataView,
  clusterBytes: number,
  fail: (problem: string) => never,
): void {
  if (h.backingFileOffset > clusterBytes) fail("invalid backing file offset");
  const end = Math.min(
    h.backingFileOffset !== 0 ? h.backingFileOffset : clusterBytes,
    view.byteLength,
  );
  let offset = h.headerLength;
  h.extensionsEndBytes = offset;
  while (offset + 8 <= end) {
    const type = view.getUint32(offset);
    const length = view.getUint32(offset + 4);
    h.extensionsEndBytes = offset;
    if (type === EXT_END) return;
    offset += 8;
    if (length > end - offset) fail(`header extension 0x${type.toString(16)} too large`);
    const data = new Uint8Array(view.buffer, view.byteOffset + offset, length).slice();
    h.extensions.push({ type, data });
    _decodeKnownExtension(h, type, data, fail);
    offset += Math.ceil(length / 8) * 8;
    h.extensionsEndBytes = Math.min(offset, end);
  }
}

function _decodeKnownExtension(
  h: Qcow2Header,
  type: number,
  data: Uint8Array,
  fail: (problem: string) => never,
): void {
  const text = () => new TextDecoder().decode(data);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (type === EXT_BACKING_FORMAT) {
    if (data.byteLength >= 16) fail(`backing format name of ${data.byteLength} bytes is too long`);
    h.backingFormat = text();
  } else if (type === EXT_FEATURE_TABLE) {
    for (let at = 0; at + 48 <= data.byteLength; at += 48) {
      const name = new TextDecoder().decode(data.subarray(at + 2, at + 48)).replace(/\0.*$/s, "");
      h.featureNames.set(`${data[at]}:${data[at + 1]}`, name);
    }
  } else if (type === EXT_DATA_FILE) {
    h.dataFileName = text();
  } else if (type === EXT_CRYPTO) {
    if (data.byteLength !== 16) fail(`crypto header extension of ${data.byteLength} bytes`);
    h.crypto = { offsetBytes: u64(view, 0), lengthBytes: u64(view, 8) };
  } else if (type === EXT_BITMAPS) {
    if (data.byteLength !== 24) fail(`bitmaps extension of ${data.byteLength} bytes`);
    h.bitmaps = {
      count: view.getUint32(0),
      directoryBytes: u64(view, 8),
      directoryOffset: u64(view, 16),
    };
  }
}

function _validateTables(h: Qcow2Header, clusterBytes: number, fail: (p: string) => never) {
  const unaligned = (offset: number) => offset % clusterBytes !== 0;
  if (h.refcountTableClusters === 0) fail("image does not contain a reference count table");
  if (h.refcountTableClusters * clusterBytes > refcount_table_bytes_max) {
    fail("reference count table too large");
  }
  if (unaligned(h.refcountTableOffset) || !Number.isSafeInteger(h.refcountTableOffset)) {
    fail("invalid reference count table offset");
  }
  if (l1TooLarge(h.l1Size)) fail("active L1 table too large");
  if (h.l1Size < l1EntriesFor(h.sizeBytes, h.clusterBits)) fail("L1 table is too small");
  if (h.l1Size > 0 && (unaligned(h.l1TableOffset) || !Number.isSafeInteger(h.l1TableOffset))) {
    fail("invalid L1 table offset");
  }
  if (h.nbSnapshots > snapshots_max) fail("too many snapshots");
  if (h.nbSnapshots > 0 && (unaligned(h.snapshotsOffset) || h.snapshotsOffset === 0)) {
    fail("invalid snapshot table offset");
  }
}

/** What the driver must refuse, named; undefined when it can open the image. */
export function unsupportedFeature(h: Qcow2Header): string | undefined {
  const unknown = h.incompatible & ~31n;
  if (unknown !== 0n) {
    const names: string[] = [];
    for (let bit = 0; bit < 64; bit += 1) {
      if ((unknown >> BigInt(bit)) & 1n) {
        const name = h.featureNames.get(`0:${bit}`);
        names.push(name ? `'${name}' (incompatible bit ${bit})` : `incompatible bit ${bit}`);
      }
    }
    return `unsupported qcow2 feature(s): ${names.join(", ")}`;
  }
  if (h.cryptMethod !== 0) {
    const how = h.cryptMethod === 1 ? "AES" : h.cryptMethod === 2 ? "LUKS" : `${h.cryptMethod}`;
    return `encryption (crypt_method ${how}) is not supported`;
  }
  if (h.incompatible & INCOMPAT_DATA_FILE) {
    const name = h.dataFileName ? ` '${h.dataFileName}'` : "";
    return `external data file${name} (incompatible feature 'external data file') is not supported`;
  }
  if (h.incompatible & INCOMPAT_EXTENDED_L2) {
    return "extended L2 entries (extended_l2=on, subclusters) are not supported";
  }
  if ((h.incompatible & INCOMPAT_COMPRESSION) || h.compressionType !== 0) {
    const name = h.compressionType === 1 ? "zstd" : `type ${h.compressionType}`;
    return `compression type ${name} is not supported (only zlib)`;
  }
  return undefined;
}

/** Fields of a new header; see {@linkcode encodeHeader}. */
export interface NewHeader {
  version: 2 | 3;
  clusterBits: number;
  sizeBytes: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  refcountOrder: number;
  compatible: bigint;
  backingName?: string;
  backingFormat?: string;
}

function _extensionBytes(type: number, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(8 + Math.ceil(data.byteLength / 8) * 8);
  const view = new DataView(out.buffer);
  view.setUint32(0, type);
  view.setUint32(4, data.byteLength);
  out.set(data, 8);
  return out;
}

function _featureTable(): Uint8Array {
  const table = new Uint8Array(KNOWN_FEATURES.length * 48);
  KNOWN_FEATURES.forEach((f, i) => {
    table[i * 48] = f.type;
    table[i * 48 + 1] = f.bit;
    table.set(new TextEncoder().encode(f.name), i * 48 + 2);
  });
  return table;
}

/**
 * The header cluster's content for a new image, as QEMU lays it out: the
 * header, the backing format extension, the feature name table (v3, when it
 * fits), the end marker, the backing file name. Throws RangeError when the
 * backing name does not fit the cluster.
 */
export function encodeHeader(h: NewHeader): Uint8Array {
  const clusterBytes = 2 ** h.clusterBits;
  const headerBytes = h.version === 3 ? V3_HEADER_BYTES : V2_HEADER_BYTES;
  const name = new TextEncoder().encode(h.backingName ?? "");
  if (name.byteLength > backing_name_bytes_max) {
    throw new RangeError(`backing file name longer than ${backing_name_bytes_max} bytes`);
  }
  const parts: Uint8Array[] = [];
  if (h.backingFormat) {
    parts.push(_extensionBytes(EXT_BACKING_FORMAT, new TextEncoder().encode(h.backingFormat)));
  }
  const used = () => headerBytes + parts.reduce((n, p) => n + p.byteLength, 0) + 8 + name.length;
  if (h.version === 3) {
    const table = _extensionBytes(EXT_FEATURE_TABLE, _featureTable());
    // Optional: QEMU also leaves it out of small clusters.
    if (used() + table.byteLength <= clusterBytes) parts.push(table);
  }
  if (used() > clusterBytes) {
    throw new RangeError(`backing file name does not fit the ${clusterBytes}-byte header cluster`);
  }
  const out = new Uint8Array(used());
  const view = new DataView(out.buffer);
  view.setUint32(0, QCOW2_MAGIC);
  view.setUint32(4, h.version);
  const nameOffset = out.byteLength - name.byteLength;
  setU64(view, 8, name.byteLength > 0 ? nameOffset : 0);
  view.setUint32(16, name.byteLength);
  view.setUint32(20, h.clusterBits);
  setU64(view, 24, h.sizeBytes);
  view.setUint32(36, h.l1Size);
  setU64(view, 40, h.l1TableOffset);
  setU64(view, 48, h.refcountTableOffset);
  view.setUint32(56, h.refcountTableClusters);
  if (h.version === 3) {
    view.setBigUint64(80, h.compatible);
    view.setUint32(96, h.refcountOrder);
    view.setUint32(100, V3_HEADER_BYTES);
  }
  let at = headerBytes;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  out.set(name, nameOffset);
  return out;
}
