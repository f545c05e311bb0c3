/**
 * The hosted sparse extent header (`KDMV`, VMware "Virtual Disk Format 1.1"
 * §4): 512 little-endian bytes at the start of every monolithicSparse,
 * twoGbMaxExtentSparse and streamOptimized extent. Parsing validates every
 * field against the file it came from, so later code may trust offsets and
 * sizes: a table never lies past the end of the file, a size never
 * overflows, nothing allocates more than the file could describe.
 * @module
 */

/** `KDMV` read as a little-endian u32. */
export const SPARSE_MAGIC = 0x564d444b;
export const SECTOR_BYTES = 512;
export const HEADER_BYTES = 512;

export const FLAG_NL_DETECT = 1 << 0;
export const FLAG_REDUNDANT_GRAIN_TABLE = 1 << 1;
export const FLAG_ZERO_GRAIN = 1 << 2;
export const FLAG_COMPRESSED = 1 << 16;
export const FLAG_MARKERS = 1 << 17;
export const COMPRESSION_DEFLATE = 1;
/** `gdOffset` meaning "read the footer at the end of the file" (streamOptimized). */
export const GD_AT_END = 0xffffffffffffffffn;

/** Largest grain QEMU accepts (0x200000 sectors would be 1 GiB; VMware uses 64 KiB). */
export const grain_sectors_max = 1 << 16;
/** Grain table entries per table: VMware always writes 512, QEMU refuses more. */
export const grain_table_entries_max = 512;
/** Grain directory entries, as QEMU's L1 limit: 32 Mi tables. */
export const grain_directory_entries_max = 32 << 20;
/** An embedded or separate descriptor is read up to this size (QEMU: 1 MiB). */
export const descriptor_bytes_max = 1 << 20;

/** The header fields, in sectors where the format counts sectors. */
export interface SparseHeader {
  version: number;
  flags: number;
  capacitySectors: number;
  grainSectors: number;
  descriptorOffsetSectors: number;
  descriptorSectors: number;
  grainTableEntries: number;
  redundantDirectoryOffsetSectors: number;
  directoryOffsetSectors: number;
  overheadSectors: number;
  uncleanShutdown: boolean;
  compressAlgorithm: number;
}

/** A header that cannot be used, with the reason. */
export class HeaderError extends Error {
  readonly kind = "vmdk-header";
}

function u64(view: DataView, offset: number, name: string): number {
  const value = view.getBigUint64(offset, true);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new HeaderError(`${name} ${value} is out of range`);
  }
  return Number(value);
}

/** True when `bytes` starts with the sparse magic. */
export function hasSparseMagic(bytes: Uint8Array): boolean {
  return bytes.byteLength >= 4 &&
    new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0, true) === SPARSE_MAGIC;
}

/** True when the header says the grain directory is in the footer. */
export function directoryAtEnd(bytes: Uint8Array): boolean {
  return new DataView(bytes.buffer, bytes.byteOffset, HEADER_BYTES).getBigUint64(56, true) ===
    GD_AT_END;
}

/** Decodes the 512 header bytes; throws {@linkcode HeaderError} on nonsense. */
export function decodeSparseHeader(bytes: Uint8Array): SparseHeader {
  if (bytes.byteLength < HEADER_BYTES) throw new HeaderError("header is truncated");
  if (!hasSparseMagic(bytes)) throw new HeaderError("bad magic (not a KDMV sparse extent)");
  const view = new DataView(bytes.buffer, bytes.byteOffset, HEADER_BYTES);
  return {
    version: view.getUint32(4, true),
    flags: view.getUint32(8, true),
    capacitySectors: u64(view, 12, "capacity"),
    grainSectors: u64(view, 20, "grain size"),
    descriptorOffsetSectors: u64(view, 28, "descriptor offset"),
    descriptorSectors: u64(view, 36, "descriptor size"),
    grainTableEntries: view.getUint32(44, true),
    redundantDirectoryOffsetSectors: u64(view, 48, "redundant grain directory offset"),
    directoryOffsetSectors: u64(view, 56, "grain directory offset"),
    overheadSectors: u64(view, 64, "overhead"),
    uncleanShutdown: view.getUint8(72) !== 0,
    compressAlgorithm: view.getUint16(77, true),
  };
}

/** Encodes a header (with the newline-detection bytes VMware expects). */
export function encodeSparseHeader(header: SparseHeader): Uint8Array {
  const bytes = new Uint8Array(HEADER_BYTES);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, SPARSE_MAGIC, true);
  view.setUint32(4, header.version, true);
  view.setUint32(8, header.flags, true);
  view.setBigUint64(12, BigInt(header.capacitySectors), true);
  view.setBigUint64(20, BigInt(header.grainSectors), true);
  view.setBigUint64(28, BigInt(header.descriptorOffsetSectors), true);
  view.setBigUint64(36, BigInt(header.descriptorSectors), true);
  view.setUint32(44, header.grainTableEntries, true);
  view.setBigUint64(48, BigInt(header.redundantDirectoryOffsetSectors), true);
  view.setBigUint64(56, BigInt(header.directoryOffsetSectors), true);
  view.setBigUint64(64, BigInt(header.overheadSectors), true);
  view.setUint8(72, header.uncleanShutdown ? 1 : 0);
  bytes.set([0x0a, 0x20, 0x0d, 0x0a], 73);
  view.setUint16(77, header.compressAlgorithm, true);
  return bytes;
}

/** Geometry derived from a validated header. */
export interface SparseLayout {
  header: SparseHeader;
  grainBytes: number;
  /** Guest bytes one grain table covers. */
  tableSpanBytes: number;
  directoryEntries: number;
  /** Bytes of one grain table on disk. */
  tableBytes: number;
  compressed: boolean;
  markers: boolean;
  zeroGrains: boolean;
  redundant: boolean;
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/**
 * Checks the header against the size of its file and derives the layout.
 * Throws {@linkcode HeaderError} naming the field at fault.
 */
export function validateSparseHeader(header: SparseHeader, fileBytes: number): SparseLayout {
  const h = header;
  if (h.version < 1 || h.version > 3) throw new HeaderError(`unsupported version ${h.version}`);
  if (!isPowerOfTwo(h.grainSectors) || h.grainSectors > grain_sectors_max) {
    throw new HeaderError(`invalid grain size ${h.grainSectors} sectors`);
  }
  if (h.grainTableEntries < 1 || h.grainTableEntries > grain_table_entries_max) {
    throw new HeaderError(`invalid grain table size ${h.grainTableEntries} entries`);
  }
  const compressed = h.compressAlgorithm === COMPRESSION_DEFLATE;
  if (h.compressAlgorithm > COMPRESSION_DEFLATE) {
    throw new HeaderError(`unknown compression algorithm ${h.compressAlgorithm}`);
  }
  const capacityBytes = h.capacitySectors * SECTOR_BYTES;
  if (!Number.isSafeInteger(capacityBytes)) throw new HeaderError("capacity is out of range");
  const grainBytes = h.grainSectors * SECTOR_BYTES;
  const tableSpanBytes = grainBytes * h.grainTableEntries;
  const directoryEntries = Math.ceil(capacityBytes / tableSpanBytes);
  if (directoryEntries > grain_directory_entries_max) {
    throw new HeaderError(`grain directory of ${directoryEntries} entries is too big`);
  }
  const redundant = (h.flags & FLAG_REDUNDANT_GRAIN_TABLE) !== 0;
  const directoryBytes = directoryEntries * 4;
  insideFile("grain directory", h.directoryOffsetSectors, directoryBytes, fileBytes);
  if (redundant) {
    insideFile(
      "redundant grain directory",
      h.redundantDirectoryOffsetSectors,
      directoryBytes,
      fileBytes,
    );
  }
  if (h.descriptorSectors > 0) {
    insideFile(
      "descriptor",
      h.descriptorOffsetSectors,
      Math.min(h.descriptorSectors * SECTOR_BYTES, descriptor_bytes_max),
      fileBytes,
    );
  }
  return {
    header: h,
    grainBytes,
    tableSpanBytes,
    directoryEntries,
    tableBytes: h.grainTableEntries * 4,
    compressed,
    markers: (h.flags & FLAG_MARKERS) !== 0,
    zeroGrains: (h.flags & FLAG_ZERO_GRAIN) !== 0,
    redundant,
  };
}

function insideFile(what: string, offsetSectors: number, lengthBytes: number, fileBytes: number) {
  const start = offsetSectors * SECTOR_BYTES;
  if (offsetSectors === 0 || !Number.isSafeInteger(start) || start + lengthBytes > fileBytes) {
    throw new HeaderError(
      `${what} at sector ${offsetSectors} (+${lengthBytes} bytes) lies outside the file (${fileBytes} bytes)`,
    );
  }
}
