/**
 * The qcow (version 1) on-disk header, as QEMU's block/qcow.c reads it, and
 * the 16-byte Xen extended header the 2006 blktap tools put right after it.
 *
 * ```
 *  0 magic "QFI\xfb"      4 version (1)         8 backing_file_offset u64
 * 16 backing_file_size   20 mtime              24 size (bytes) u64
 * 32 cluster_bits u8     33 l2_bits u8         34 padding u16
 * 36 crypt_method u32    40 l1_table_offset u64                      = 48
 * 48 xmagic "XEN\xfb"    52 cksum              56 min_cluster_alloc
 * 60 flags (0x01 sparse, 0x02 L1 big-endian)                         = 64
 * 64 "BLKX" extent_tables_from u64 (ours, standalone images only)    = 76
 * ```
 * The BLKX record says which L2 tables own the 2 MiB extent behind them:
 * those at or past `extent_tables_from`. img2qcow packs the tables and data
 * it writes densely (as small as QEMU's output) and sets it to the end of
 * what it wrote, so later writes reserve extents for new tables only.
 * Without the record, every table of a trusted extent image owns its
 * extent, as in the 2006 tools.
 * Everything is big-endian. L1 and L2 entries are u64 file offsets; 0 means
 * unallocated; bit 63 marks a compressed cluster whose byte length sits in
 * the bits just below it (QEMU: `entry >> (63 - cluster_bits)`).
 * @module
 */
import { Md5 } from "./md5.ts";

export const QCOW_MAGIC = 0x514649fb;
export const XEN_MAGIC = 0x58454efb;
export const QCOW_VERSION = 1;
export const QCOW_HEADER_BYTES = 48;
export const XEN_HEADER_BYTES = 16;
/** Xen flag: the image was created sparse (not reserved). */
export const XEN_FLAG_SPARSE = 0x01;
/** Xen flag: the L1 table is big-endian (legacy tapdisk wrote it little-endian). */
export const XEN_FLAG_L1_BIG_ENDIAN = 0x02;
/**
 * Xen flag (blktap's): the image is open read-write, or its last writer
 * died. A read-write open that finds it set reclaims what the dead writer
 * allocated and never linked; a clean close clears it. The 2006 tools
 * ignore unknown flags; QEMU ignores the whole extension.
 */
export const XEN_FLAG_DIRTY = 0x04;
/** blktap's layout puts the L1 table on its own page. */
export const XEN_L1_OFFSET_BYTES = 4096;
/** "BLKX": blktap's record at offset 64 of standalone images. */
export const BLKX_MAGIC = 0x424c4b58;
export const BLKX_OFFSET_BYTES = 64;
/** QEMU refuses backing names longer than this. */
export const backing_name_bytes_max = 1023;
/**
 * Largest L1 table: what QEMU 7.2 opens. qcow_open refuses more than
 * INT_MAX / 8 entries ("Image too large") and reads the table with one
 * request of at most BDRV_REQUEST_MAX_BYTES (2^31 - 512), so 268435392
 * entries: 512 TiB - 128 MiB with 4 KiB clusters. We page the table, so
 * memory does not grow with it.
 */
export const l1_entries_max = Math.floor((2 ** 31 - 512) / 8);
export const cluster_bits_min = 9;
export const cluster_bits_max = 16;

/** An image we cannot open, with the reason; `check` reports it as unusable. */
export class QcowFormatError extends Error {
  constructor(path: string, problem: string) {
    super(`${path}: ${problem}`);
    this.name = "QcowFormatError";
  }
}

/** The Xen extended header, when present. */
export interface XenHeader {
  checksum: number;
  minClusterAlloc: number;
  flags: number;
}

/** A decoded and validated qcow header. */
export interface QcowHeader {
  backingFileOffset: number;
  backingFileSize: number;
  mtime: number;
  /** The size field as stored (it sizes the L1 table). */
  sizeBytes: number;
  /** What the guest sees: the size rounded down to whole sectors, as QEMU serves it. */
  virtualSizeBytes: number;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1TableOffset: number;
  /** Derived: entries in the L1 table. */
  l1Entries: number;
  xen?: XenHeader;
  /** From the BLKX record: L2 tables at or past this file offset own their extent. */
  extentTablesFromBytes?: number;
}

/** Cluster and table geometry derived from a header. */
export interface QcowGeometry {
  clusterBytes: number;
  clusterBits: number;
  l2Entries: number;
  l2Bits: number;
  l2TableBytes: number;
  /** Guest bytes one L2 table covers. */
  l2SpanBytes: number;
  l1Entries: number;
}

export function geometryOf(header: QcowHeader): QcowGeometry {
  const clusterBytes = 2 ** header.clusterBits;
  const l2Entries = 2 ** header.l2Bits;
  return {
    clusterBytes,
    clusterBits: header.clusterBits,
    l2Entries,
    l2Bits: header.l2Bits,
    l2TableBytes: l2Entries * 8,
    l2SpanBytes: clusterBytes * l2Entries,
    l1Entries: header.l1Entries,
  };
}

function u64(view: DataView, offset: number): number {
  return view.getUint32(offset) * 2 ** 32 + view.getUint32(offset + 4);
}

function setU64(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, Math.floor(value / 2 ** 32));
  view.setUint32(offset + 4, value >>> 0);
}

/** Whether the first bytes of a file are a qcow v1 header. */
export function isQcowHeader(head: Uint8Array): boolean {
  if (head.byteLength < QCOW_HEADER_BYTES) return false;
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  return view.getUint32(0) === QCOW_MAGIC && view.getUint32(4) === QCOW_VERSION;
}

/** L1 entries for a virtual size, or undefined when the image is too large. */
export function l1EntriesFor(sizeBytes: number, clusterBits: number, l2Bits: number) {
  const span = 2 ** (clusterBits + l2Bits);
  return Math.ceil(sizeBytes / span);
}

/**
 * Decodes and validates the header in `head` (at least the first 64 bytes)
 * of a file of `fileBytes`. Throws {@linkcode QcowFormatError} naming the
 * problem; everything returned is safe to use for offsets and allocations.
 */
export function decodeHeader(path: string, head: Uint8Array, fileBytes: number): QcowHeader {
  if (head.byteLength < QCOW_HEADER_BYTES || fileBytes < QCOW_HEADER_BYTES) {
    throw new QcowFormatError(path, "file too short for a qcow header");
  }
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (view.getUint32(0) !== QCOW_MAGIC) throw new QcowFormatError(path, "not a qcow image");
  const version = view.getUint32(4);
  if (version !== QCOW_VERSION) {
    throw new QcowFormatError(path, `qcow version ${version} is not supported (only 1)`);
  }
  const header: QcowHeader = {
    backingFileOffset: u64(view, 8),
    backingFileSize: view.getUint32(16),
    mtime: view.getUint32(20),
    sizeBytes: u64(view, 24),
    clusterBits: view.getUint8(32),
    l2Bits: view.getUint8(33),
    cryptMethod: view.getUint32(36),
    l1TableOffset: u64(view, 40),
    l1Entries: 0,
    virtualSizeBytes: 0,
  };
  _validate(path, header, fileBytes);
  header.xen = _decodeXen(view, header);
  if (
    header.xen && header.backingFileOffset === 0 && view.byteLength >= 76 &&
    view.getUint32(BLKX_OFFSET_BYTES) === BLKX_MAGIC
  ) {
    header.extentTablesFromBytes = u64(view, BLKX_OFFSET_BYTES + 4);
  }
  return header;
}

function _validate(path: string, h: QcowHeader, fileBytes: number): void {
  const fail = (problem: string) => {
    throw new QcowFormatError(path, problem);
  };
  if (h.cryptMethod === 1) fail("encrypted qcow images (AES) are not supported");
  if (h.cryptMethod !== 0) fail(`invalid encryption method ${h.cryptMethod}`);
  if (h.sizeBytes <= 1 || !Number.isSafeInteger(h.sizeBytes)) {
    fail(`invalid virtual size ${h.sizeBytes}`);
  }
  // QEMU: bs->total_sectors = size / 512 (a partial last sector is not served).
  h.virtualSizeBytes = Math.floor(h.sizeBytes / 512) * 512;
  if (h.clusterBits < cluster_bits_min || h.clusterBits > cluster_bits_max) {
    fail(`cluster_bits ${h.clusterBits} out of range (9..16)`);
  }
  if (h.l2Bits < 6 || h.l2Bits > 13) fail(`l2_bits ${h.l2Bits} out of range (6..13)`);
  h.l1Entries = l1EntriesFor(h.sizeBytes, h.clusterBits, h.l2Bits);
  if (h.l1Entries > l1_entries_max) {
    fail(`image too large: L1 table of ${h.l1Entries} entries (max ${l1_entries_max})`);
  }
  if (h.l1TableOffset < QCOW_HEADER_BYTES || h.l1TableOffset % 8 !== 0) {
    fail(`L1 table offset ${h.l1TableOffset} is invalid`);
  }
  if (h.l1TableOffset + h.l1Entries * 8 > fileBytes) {
    fail(
      `L1 table (${h.l1Entries} entries at ${h.l1TableOffset}) extends past the end of the file`,
    );
  }
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize === 0 || h.backingFileSize > backing_name_bytes_max) {
      fail(`backing file name length ${h.backingFileSize} is invalid`);
    }
    if (
      h.backingFileOffset < QCOW_HEADER_BYTES ||
      h.backingFileOffset + h.backingFileSize > fileBytes
    ) {
      fail(`backing file name at ${h.backingFileOffset} lies outside the file`);
    }
  }
}

function _decodeXen(view: DataView, h: QcowHeader): XenHeader | undefined {
  // As blktap: the extension exists only where the L1 table starts on a page.
  if (h.l1TableOffset % 4096 !== 0 || view.byteLength < QCOW_HEADER_BYTES + XEN_HEADER_BYTES) {
    return undefined;
  }
  if (h.backingFileOffset !== 0 && h.backingFileOffset < QCOW_HEADER_BYTES + XEN_HEADER_BYTES) {
    return undefined;
  }
  if (view.getUint32(48) !== XEN_MAGIC) return undefined;
  return {
    checksum: view.getUint32(52),
    minClusterAlloc: view.getUint32(56),
    flags: view.getUint32(60),
  };
}

/** Fields for {@linkcode encodeHeader}. */
export interface HeaderFields {
  sizeBytes: number;
  clusterBits: number;
  l2Bits: number;
  l1TableOffset: number;
  backingFileOffset?: number;
  backingFileSize?: number;
  mtime?: number;
  xen?: XenHeader;
}

/** Writes the 48-byte header (and the Xen extension, if given) into `out`. */
export function encodeHeader(fields: HeaderFields, out: Uint8Array): void {
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  view.setUint32(0, QCOW_MAGIC);
  view.setUint32(4, QCOW_VERSION);
  setU64(view, 8, fields.backingFileOffset ?? 0);
  view.setUint32(16, fields.backingFileSize ?? 0);
  view.setUint32(20, fields.mtime ?? 0);
  setU64(view, 24, fields.sizeBytes);
  view.setUint8(32, fields.clusterBits);
  view.setUint8(33, fields.l2Bits);
  view.setUint16(34, 0);
  view.setUint32(36, 0);
  setU64(view, 40, fields.l1TableOffset);
  if (fields.xen) encodeXen(fields.xen, out);
}

/** Writes the BLKX record (see the module description) into a header page. */
export function encodeBlkx(extentTablesFromBytes: number, out: Uint8Array): void {
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  view.setUint32(BLKX_OFFSET_BYTES, BLKX_MAGIC);
  setU64(view, BLKX_OFFSET_BYTES + 4, extentTablesFromBytes);
}

/** Writes the Xen extension at offset 48 of `out`. */
export function encodeXen(xen: XenHeader, out: Uint8Array): void {
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  view.setUint32(48, XEN_MAGIC);
  view.setUint32(52, xen.checksum >>> 0);
  view.setUint32(56, xen.minClusterAlloc);
  view.setUint32(60, xen.flags);
}

/**
 * blktap's L1 checksum (the 2006 tapdisk's `gen_cksum`): MD5 of the L1
 * table as stored, its first four bytes copied into a host (x86,
 * little-endian) u32; the header stores that value big-endian.
 */
export function l1Checksum(l1Bytes: Uint8Array): number {
  return checksumOfDigest(new Md5().update(l1Bytes).digest());
}

/** The checksum value of an MD5 digest of the L1 table (see {@linkcode l1Checksum}). */
export function checksumOfDigest(digest: Uint8Array): number {
  return (digest[0] | (digest[1] << 8) | (digest[2] << 16) | (digest[3] << 24)) >>> 0;
}

/** A table entry decoded: 0 unallocated, else a plain or compressed cluster. */
export interface ClusterEntry {
  offsetBytes: number;
  compressed: boolean;
  /** Bytes of compressed data (compressed clusters only). */
  compressedBytes: number;
}

/**
 * Decodes a big-endian u64 entry given as two u32 halves. Offsets that do
 * not fit a safe integer come back as `Infinity` (they lie outside any file).
 */
export function decodeEntry(hi: number, lo: number, clusterBits: number): ClusterEntry {
  if ((hi & 0x80000000) === 0) {
    const offsetBytes = hi >= 0x200000 ? Infinity : hi * 2 ** 32 + lo;
    return { offsetBytes, compressed: false, compressedBytes: 0 };
  }
  const value = (BigInt(hi) << 32n) | BigInt(lo);
  const shift = BigInt(63 - clusterBits);
  const size = Number((value >> shift) & BigInt(2 ** clusterBits - 1));
  const offset = value & ((1n << shift) - 1n);
  const offsetBytes = offset > BigInt(Number.MAX_SAFE_INTEGER) ? Infinity : Number(offset);
  return { offsetBytes, compressed: true, compressedBytes: size };
}
