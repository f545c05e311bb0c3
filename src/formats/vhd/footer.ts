/**
 * The VHD hard disk footer (Microsoft's VHD specification; QEMU
 * `block/vpc.c`): 512 big-endian bytes at the end of every image, and a copy
 * at offset 0 of dynamic and differencing images. Also the disk geometry
 * (CHS) and which size a reader believes: Virtual PC and old QEMU size a
 * disk by its geometry, every other creator by `current_size` (QEMU's
 * `vpc_ignore_current_size` since 9.2, which also reads Azure images right).
 * @module
 */

/** Bytes of a sector, the unit of every VHD offset and bitmap bit. */
export const VHD_SECTOR_BYTES = 512;
/** Bytes of the footer (and of its copy). */
export const FOOTER_BYTES = 512;
/** Disk types of the footer's `disk_type`. */
export const DISK_FIXED = 2;
export const DISK_DYNAMIC = 3;
export const DISK_DIFFERENCING = 4;
/** Largest virtual size QEMU accepts (2040 GiB), in sectors. */
export const vhd_sectors_max = 0xff000000;
/** The geometry that tells readers to use `current_size` (65535 x 16 x 255). */
export const CHS_MAX = { cylinders: 65535, heads: 16, sectorsPerTrack: 255 } as const;
const chs_max_sectors = 65535 * 16 * 255;
/** VHD timestamps count seconds from 2000-01-01T00:00:00Z. */
export const VHD_EPOCH_SECONDS = 946684800;
/** `data_offset` of a fixed disk: no further structure. */
export const NO_DATA_OFFSET = Number.MAX_SAFE_INTEGER;

const COOKIE = "conectix";

/** A bad or unsupported VHD structure, named with its file and field. */
export class VhdFormatError extends Error {
  constructor(path: string, message: string) {
    super(`${path}: ${message}`);
    this.name = "VhdFormatError";
  }
}

/** Cylinders, heads and sectors per track, as the footer stores them. */
export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

/** The decoded footer; `bytes` is the footer as stored (rewritten verbatim). */
export interface VhdFooter {
  features: number;
  formatVersion: number;
  /** Offset of the dynamic header; {@linkcode NO_DATA_OFFSET} when none. */
  dataOffset: number;
  timestamp: number;
  creatorApp: string;
  creatorVersion: number;
  creatorOs: string;
  originalSizeBytes: number;
  currentSizeBytes: number;
  geometry: Geometry;
  diskType: number;
  checksum: number;
  uuid: Uint8Array;
  savedState: number;
  bytes: Uint8Array;
}

/** True when `bytes` starts with the footer cookie `conectix`. */
export function hasFooterCookie(bytes: Uint8Array): boolean {
  if (bytes.byteLength < COOKIE.length) return false;
  for (let i = 0; i < COOKIE.length; i += 1) {
    if (bytes[i] !== COOKIE.charCodeAt(i)) return false;
  }
  return true;
}

/** One's complement of the byte sum, skipping the 4 checksum bytes at `checksumAt`. */
export function vhdChecksum(bytes: Uint8Array, checksumAt: number): number {
  let sum = 0;
  for (let i = 0; i < bytes.byteLength; i += 1) {
    if (i < checksumAt || i >= checksumAt + 4) sum += bytes[i];
  }
  return (~sum) >>> 0;
}

/** Reads a big-endian u64; values past 2^53 become {@linkcode NO_DATA_OFFSET}. */
export function readU64(view: DataView, at: number): number {
  const hi = view.getUint32(at);
  if (hi >= 0x200000) return NO_DATA_OFFSET;
  return hi * 2 ** 32 + view.getUint32(at + 4);
}

/** Writes a big-endian u64 (`NO_DATA_OFFSET` is written as all ones). */
export function writeU64(view: DataView, at: number, value: number): void {
  if (value === NO_DATA_OFFSET) {
    view.setUint32(at, 0xffffffff);
    view.setUint32(at + 4, 0xffffffff);
    return;
  }
  view.setUint32(at, Math.floor(value / 2 ** 32));
  view.setUint32(at + 4, value >>> 0);
}

function ascii(bytes: Uint8Array): string {
  return String.fromCharCode(...bytes);
}

/**
 * Decodes 512 footer bytes. Throws {@linkcode VhdFormatError} for a missing
 * cookie or a bad checksum, naming `where` ("footer at offset N").
 */
export function decodeFooter(path: string, bytes: Uint8Array, where: string): VhdFooter {
  if (bytes.byteLength < FOOTER_BYTES || !hasFooterCookie(bytes)) {
    throw new VhdFormatError(path, `${where}: no 'conectix' cookie (not a VHD footer)`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, FOOTER_BYTES);
  const checksum = view.getUint32(64);
  const computed = vhdChecksum(bytes.subarray(0, FOOTER_BYTES), 64);
  if (checksum !== computed) {
    throw new VhdFormatError(
      path,
      `${where}: checksum field is 0x${hex(checksum)}, the bytes sum to 0x${hex(computed)}`,
    );
  }
  return {
    features: view.getUint32(8),
    formatVersion: view.getUint32(12),
    dataOffset: readU64(view, 16),
    timestamp: view.getUint32(24),
    creatorApp: ascii(bytes.subarray(28, 32)),
    creatorVersion: view.getUint32(32),
    creatorOs: ascii(bytes.subarray(36, 40)),
    originalSizeBytes: readU64(view, 40),
    currentSizeBytes: readU64(view, 48),
    geometry: {
      cylinders: view.getUint16(56),
      heads: view.getUint8(58),
      sectorsPerTrack: view.getUint8(59),
    },
    diskType: view.getUint32(60),
    checksum,
    uuid: bytes.slice(68, 84),
    savedState: bytes[84],
    bytes: bytes.slice(0, FOOTER_BYTES),
  };
}

/** What {@linkcode encodeFooter} needs. */
export interface FooterFields {
  diskType: number;
  dataOffset: number;
  sizeBytes: number;
  geometry: Geometry;
  uuid: Uint8Array;
  /** Seconds since the VHD epoch. */
  timestamp: number;
}

/**
 * A new footer as blktap writes it: creator `tap\0` version 1.3 (Xen's
 * blktap, whose images every QEMU version sizes by `current_size`), the
 * reserved feature bit set, checksum computed.
 */
export function encodeFooter(fields: FooterFields): Uint8Array {
  const bytes = new Uint8Array(FOOTER_BYTES);
  const view = new DataView(bytes.buffer);
  bytes.set(new TextEncoder().encode(COOKIE), 0);
  view.setUint32(8, 0x00000002);
  view.setUint32(12, 0x00010000);
  writeU64(view, 16, fields.dataOffset);
  view.setUint32(24, fields.timestamp >>> 0);
  bytes.set([0x74, 0x61, 0x70, 0x00], 28); // "tap\0"
  view.setUint32(32, 0x00010003);
  bytes.set(new TextEncoder().encode("Wi2k"), 36);
  writeU64(view, 40, fields.sizeBytes);
  writeU64(view, 48, fields.sizeBytes);
  view.setUint16(56, fields.geometry.cylinders);
  view.setUint8(58, fields.geometry.heads);
  view.setUint8(59, fields.geometry.sectorsPerTrack);
  view.setUint32(60, fields.diskType);
  bytes.set(fields.uuid.subarray(0, 16), 68);
  view.setUint32(64, vhdChecksum(bytes, 64));
  return bytes;
}

function hex(value: number): string {
  return value.toString(16).padStart(8, "0");
}

/** Sectors the geometry describes. */
export function geometrySectors(g: Geometry): number {
  return g.cylinders * g.heads * g.sectorsPerTrack;
}

/**
 * The disk size a reader believes: the geometry for Virtual PC (`vpc `) and
 * old QEMU (`qemu`) images, unless the geometry is the maximum; otherwise
 * `current_size` (Hyper-V, disk2vhd, XenServer, QEMU's `qem2`, Azure...).
 * Whole sectors, as QEMU counts.
 */
export function virtualSizeOf(footer: VhdFooter): number {
  const chs = geometrySectors(footer.geometry);
  const byGeometry = (footer.creatorApp === "vpc " || footer.creatorApp === "qemu") &&
    chs !== chs_max_sectors;
  const sectors = byGeometry ? chs : Math.floor(footer.currentSizeBytes / VHD_SECTOR_BYTES);
  return sectors * VHD_SECTOR_BYTES;
}

/**
 * The geometry of `totalSectors` by the VHD specification's algorithm (as
 * QEMU's `calculate_geometry`): may describe fewer sectors than asked.
 */
export function calculateGeometry(totalSectors: number): Geometry {
  const sectors = Math.min(totalSectors, chs_max_sectors);
  let spt: number;
  let heads: number;
  let cth: number;
  if (sectors >= 65535 * 16 * 63) {
    spt = 255;
    heads = 16;
    cth = Math.floor(sectors / spt);
  } else {
    spt = 17;
    cth = Math.floor(sectors / spt);
    heads = Math.max(4, Math.ceil(cth / 1024));
    if (cth >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cth = Math.floor(sectors / spt);
    }
    if (cth >= heads * 1024) {
      spt = 63;
      heads = 16;
      cth = Math.floor(sectors / spt);
    }
  }
  return { cylinders: Math.floor(cth / heads), heads, sectorsPerTrack: spt };
}

/** Size and geometry of a new image (QEMU's `calculate_rounded_image_size`). */
export interface PlannedSize {
  sizeBytes: number;
  geometry: Geometry;
}

/**
 * The size a new image gets for a requested `sizeBytes` (rounded up to a
 * sector): without `forceSize`, the smallest geometry holding it, and that
 * geometry's size, so Virtual PC, Hyper-V and every QEMU agree (as
 * `qemu-img create -f vpc` rounds); with `forceSize`, exactly the size, and
 * the maximum geometry that makes readers use `current_size`. Throws
 * RangeError past 2040 GiB.
 */
export function planSize(sizeBytes: number, forceSize: boolean): PlannedSize {
  const requested = Math.ceil(sizeBytes / VHD_SECTOR_BYTES);
  let geometry: Geometry = { cylinders: 0, heads: 0, sectorsPerTrack: 0 };
  if (forceSize) geometry = { ...CHS_MAX };
  else {
    const wanted = Math.min(chs_max_sectors, requested);
    for (let i = 0; wanted > geometrySectors(geometry); i += 1) {
      geometry = calculateGeometry(wanted + i);
    }
  }
  const sectors = geometrySectors(geometry) === chs_max_sectors
    ? requested
    : geometrySectors(geometry);
  if (sectors > vhd_sectors_max) {
    throw new RangeError(`VHD size ${sizeBytes} is too large (at most 2040 GiB)`);
  }
  return { sizeBytes: sectors * VHD_SECTOR_BYTES, geometry };
}

/**
 * The geometry to store for an image whose size is fixed by something else
 * (a parent): the exact geometry when one exists, else the maximum one so
 * readers use `current_size`.
 */
export function geometryForExactSize(sizeBytes: number): Geometry {
  const sectors = sizeBytes / VHD_SECTOR_BYTES;
  const planned = planSize(sizeBytes, false);
  return planned.sizeBytes === sizeBytes && Number.isInteger(sectors)
    ? planned.geometry
    : { ...CHS_MAX };
}

/** Seconds since the VHD epoch for a Date (0 before it). */
export function vhdTimestamp(date: Date): number {
  return Math.max(0, Math.floor(date.getTime() / 1000) - VHD_EPOCH_SECONDS) >>> 0;
}

/** The footer's disk type as a name (`fixed`, `dynamic`, `differencing`). */
export function diskTypeName(diskType: number): string {
  switch (diskType) {
    case DISK_FIXED:
      return "fixed";
    case DISK_DYNAMIC:
      return "dynamic";
    case DISK_DIFFERENCING:
      return "differencing";
    default:
      return `unknown (${diskType})`;
  }
}
