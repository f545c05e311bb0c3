/**
 * L1, L2 and refcount table entries of qcow2, decoded from and encoded to
 * their two big-endian u32 halves (`hi`, `lo`).
 *
 * ```
 * L1:  bit 63 COPIED (refcount exactly 1) | bits 9..55 L2 table offset
 * L2:  bit 63 COPIED | bit 62 COMPRESSED | standard: bits 9..55 host offset,
 *      bit 0 ZERO (v3) | compressed: x = 62 - (cluster_bits - 8), bits 0..x-1
 *      byte offset, bits x..61 additional 512-byte sectors
 * ```
 * Offsets that do not fit a safe integer decode as `Infinity` (they lie
 * outside any file). The kinds are QEMU's `qcow2_get_cluster_type`.
 * @module
 */

/** What a guest cluster is, by its L2 entry. */
export type ClusterKind = "unallocated" | "zero-plain" | "zero-alloc" | "normal" | "compressed";

/** A decoded L2 entry. */
export interface L2Entry {
  kind: ClusterKind;
  /** Host offset: cluster-aligned for normal/zero-alloc, a byte offset for compressed. */
  offsetBytes: number;
  /** Bit 63: the cluster's refcount is exactly one (writes may go in place). */
  copied: boolean;
  /** Compressed only: bytes to read from `offsetBytes` (QEMU's csize). */
  compressedBytes: number;
  /** Compressed only: the stored sector count field (additional sectors). */
  compressedSectors: number;
  /** Reserved bits of a standard descriptor are set (QEMU check counts it). */
  reserved: boolean;
  /** The offset field's low 32 bits: alignment is decided by them, whatever the offset's size. */
  offsetLow: number;
}

export const HI_COPIED = 0x80000000;
export const HI_COMPRESSED = 0x40000000;
export const LO_ZERO = 1;
/** Bits 32..55 of an offset field. */
const HI_OFFSET_MASK = 0x00ffffff;
/** Bits 9..31 of an offset field. */
const LO_OFFSET_MASK = 0xfffffe00;
const HI_L2_RESERVED = 0x3f000000;
const LO_L2_RESERVED = 0x1fe;
const HI_L1_RESERVED = 0x7f000000;
const LO_L1_RESERVED = 0x1ff;
const LO_REFTABLE_RESERVED = 0x1ff;

/** Bits 9..55 of `hi:lo` as a byte offset, or Infinity past 2^53. */
export function offsetField(hi: number, lo: number): number {
  const high = hi & HI_OFFSET_MASK;
  if (high >= 0x200000) return Infinity;
  return high * 2 ** 32 + ((lo & LO_OFFSET_MASK) >>> 0);
}

/** Decodes an L2 entry of an image with `clusterBits`. */
export function decodeL2(hi: number, lo: number, clusterBits: number): L2Entry {
  const copied = (hi & HI_COPIED) !== 0;
  if ((hi & HI_COMPRESSED) !== 0) return _decodeCompressed(hi, lo, clusterBits, copied);
  const offsetBytes = offsetField(hi, lo);
  const reserved = (hi & HI_L2_RESERVED) !== 0 || (lo & LO_L2_RESERVED) !== 0;
  let kind: ClusterKind;
  if ((lo & LO_ZERO) !== 0) kind = offsetBytes === 0 ? "zero-plain" : "zero-alloc";
  else kind = offsetBytes === 0 ? "unallocated" : "normal";
  const offsetLow = (lo & LO_OFFSET_MASK) >>> 0;
  return {
    kind,
    offsetBytes,
    copied,
    compressedBytes: 0,
    compressedSectors: 0,
    reserved,
    offsetLow,
  };
}

function _decodeCompressed(hi: number, lo: number, clusterBits: number, copied: boolean): L2Entry {
  const value = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
  const shift = BigInt(62 - (clusterBits - 8));
  const sectors = Number((value >> shift) & ((1n << BigInt(clusterBits - 8)) - 1n));
  const offset = value & ((1n << shift) - 1n);
  const offsetBytes = offset > BigInt(Number.MAX_SAFE_INTEGER) ? Infinity : Number(offset);
  // QEMU's qcow2_parse_compressed_l2_entry.
  const compressedBytes = (sectors + 1) * 512 - (Number(offset & 511n));
  return {
    kind: "compressed",
    offsetBytes,
    copied,
    compressedBytes,
    compressedSectors: sectors,
    reserved: false,
    offsetLow: lo >>> 0,
  };
}

/** `[hi, lo]` of a standard entry at `offsetBytes` (0: unallocated). */
export function standardEntry(
  offsetBytes: number,
  copied: boolean,
  zero = false,
): [number, number] {
  const hi = Math.floor(offsetBytes / 2 ** 32) | (copied ? HI_COPIED : 0);
  return [hi >>> 0, ((offsetBytes >>> 0) | (zero ? LO_ZERO : 0)) >>> 0];
}

/** `[hi, lo]` of a compressed entry: data at byte `offsetBytes`, `lengthBytes` long. */
export function compressedEntry(
  offsetBytes: number,
  lengthBytes: number,
  clusterBits: number,
): [number, number] {
  // QEMU: nb_csectors = last sector - first sector (the "additional" sectors).
  const sectors = Math.floor((offsetBytes + lengthBytes - 1) / 512) - Math.floor(offsetBytes / 512);
  const shift = BigInt(62 - (clusterBits - 8));
  const value = (1n << 62n) | (BigInt(sectors) << shift) | BigInt(offsetBytes);
  return [Number(value >> 32n), Number(value & 0xffffffffn)];
}

/** A decoded L1 entry. */
export interface L1Entry {
  offsetBytes: number;
  copied: boolean;
  reserved: boolean;
  /** See {@linkcode L2Entry.offsetLow}. */
  offsetLow: number;
}

export function decodeL1(hi: number, lo: number): L1Entry {
  return {
    offsetBytes: offsetField(hi, lo),
    copied: (hi & HI_COPIED) !== 0,
    reserved: (hi & HI_L1_RESERVED) !== 0 || (lo & LO_L1_RESERVED) !== 0,
    offsetLow: (lo & LO_OFFSET_MASK) >>> 0,
  };
}

/** A decoded refcount table entry (bits 9..63 offset; reserved bits 0..8). */
export function decodeReftable(hi: number, lo: number) {
  const offsetBytes = hi >= 0x200000 ? Infinity : hi * 2 ** 32 + ((lo & LO_OFFSET_MASK) >>> 0);
  return {
    offsetBytes,
    reserved: (lo & LO_REFTABLE_RESERVED) !== 0,
    offsetLow: (lo & LO_OFFSET_MASK) >>> 0,
  };
}

/** An entry's offset field (bits 9..55, or 9..63 with `wide`) in hex, exact at any size. */
export function offsetHex(hi: number, lo: number, wide = false): string {
  const high = BigInt((wide ? hi : hi & HI_OFFSET_MASK) >>> 0);
  return ((high << 32n) | BigInt((lo & LO_OFFSET_MASK) >>> 0)).toString(16);
}
