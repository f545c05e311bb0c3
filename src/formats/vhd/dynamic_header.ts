/**
 * The dynamic disk header (`cxsparse`, 1024 big-endian bytes) of dynamic
 * and differencing VHDs, the block allocation table (BAT) it points at,
 * and the parent locators of differencing disks: platform code `W2ru`
 * (relative Windows path, UTF-16LE), `W2ku` (absolute Windows path,
 * UTF-16LE) as Hyper-V writes them, and `MacX` (file URL, UTF-8) as Xen's
 * vhd-util writes it. The parent's name in the header is UTF-16BE.
 * @module
 */
import {
  NO_DATA_OFFSET,
  readU64,
  VHD_SECTOR_BYTES,
  vhdChecksum,
  VhdFormatError,
  writeU64,
} from "./footer.ts";

/** Bytes of the dynamic header. */
export const DYNAMIC_HEADER_BYTES = 1024;
/** A BAT entry of a block with no storage. */
export const BAT_UNUSED = 0xffffffff;
/** Default block size (2 MiB), as QEMU, Hyper-V and Xen create. */
export const DEFAULT_BLOCK_BYTES = 2 << 20;
/** Largest BAT held in memory (64 MiB of entries); larger tables are refused. */
export const bat_entries_max = 16 << 20;
/** Parent locator slots in the header. */
export const LOCATOR_SLOTS = 8;

/** Platform codes of parent locators. */
export const PLATFORM_W2RU = 0x57327275;
export const PLATFORM_W2KU = 0x57326b75;
export const PLATFORM_MACX = 0x4d616358;
/** Largest parent locator payload read (a path; 64 KiB is far beyond PATH_MAX in UTF-16). */
export const locator_bytes_max = 64 << 10;

const COOKIE = "cxsparse";

/** One parent locator entry. */
export interface ParentLocator {
  platformCode: number;
  /** As stored: sectors per the specification, bytes as Hyper-V and Xen write it. */
  dataSpace: number;
  dataLengthBytes: number;
  dataOffsetBytes: number;
}

/** The decoded dynamic header. */
export interface DynamicHeader {
  tableOffsetBytes: number;
  headerVersion: number;
  maxTableEntries: number;
  blockBytes: number;
  parentUuid: Uint8Array;
  parentTimestamp: number;
  /** The parent's name (UTF-16BE in the header), NULs stripped. */
  parentName: string;
  locators: ParentLocator[];
}

/** Bitmap bytes in front of each block: one bit per sector, padded to a sector. */
export function bitmapBytesOf(blockBytes: number): number {
  const bits = blockBytes / VHD_SECTOR_BYTES;
  return Math.ceil(bits / 8 / VHD_SECTOR_BYTES) * VHD_SECTOR_BYTES;
}

/** The bytes a locator's data occupies (Xen's rule: `data_space` below 512 counts sectors). */
export function locatorSpaceBytes(locator: ParentLocator): number {
  if (locator.dataSpace < VHD_SECTOR_BYTES) return locator.dataSpace * VHD_SECTOR_BYTES;
  return locator.dataSpace % VHD_SECTOR_BYTES === 0 ? locator.dataSpace : 0;
}

/** True when the locator names a path this driver understands. */
export function isPathLocator(code: number): boolean {
  return code === PLATFORM_W2RU || code === PLATFORM_W2KU || code === PLATFORM_MACX;
}

/** A platform code as its four characters (`W2ru`). */
export function platformName(code: number): string {
  const chars = [24, 16, 8, 0].map((shift) => (code >>> shift) & 0xff);
  return chars.every((c) => c >= 0x20 && c < 0x7f)
    ? String.fromCharCode(...chars)
    : `0x${code.toString(16)}`;
}

function utf16(bytes: Uint8Array, littleEndian: boolean): string {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const units: number[] = [];
  for (let i = 0; i + 1 < bytes.byteLength; i += 2) units.push(view.getUint16(i, littleEndian));
  return String.fromCharCode(...units).replace(/\0[\s\S]*$/, "");
}

function encodeUtf16(text: string, littleEndian: boolean): Uint8Array {
  const bytes = new Uint8Array(text.length * 2);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < text.length; i += 1) view.setUint16(i * 2, text.charCodeAt(i), littleEndian);
  return bytes;
}

/** Decodes and validates the header; throws naming the file and the field. */
export function decodeDynamicHeader(path: string, bytes: Uint8Array): DynamicHeader {
  const cookie = String.fromCharCode(...bytes.subarray(0, 8));
  if (bytes.byteLength < DYNAMIC_HEADER_BYTES || cookie !== COOKIE) {
    throw new VhdFormatError(path, "dynamic disk header: no 'cxsparse' cookie");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, DYNAMIC_HEADER_BYTES);
  const checksum = view.getUint32(36);
  const computed = vhdChecksum(bytes.subarray(0, DYNAMIC_HEADER_BYTES), 36);
  if (checksum !== computed) {
    throw new VhdFormatError(
      path,
      `dynamic disk header: checksum field is 0x${checksum.toString(16)}, ` +
        `the bytes sum to 0x${computed.toString(16)}`,
    );
  }
  const blockBytes = view.getUint32(32);
  if (blockBytes < VHD_SECTOR_BYTES || (blockBytes & (blockBytes - 1)) !== 0) {
    throw new VhdFormatError(
      path,
      `dynamic disk header: block size ${blockBytes} is not a power of two of at least 512`,
    );
  }
  const locators: ParentLocator[] = [];
  for (let i = 0; i < LOCATOR_SLOTS; i += 1) {
    const at = 576 + i * 24;
    locators.push({
      platformCode: view.getUint32(at),
      dataSpace: view.getUint32(at + 4),
      dataLengthBytes: view.getUint32(at + 8),
      dataOffsetBytes: readU64(view, at + 16),
    });
  }
  return {
    tableOffsetBytes: readU64(view, 16),
    headerVersion: view.getUint32(24),
    maxTableEntries: view.getUint32(28),
    blockBytes,
    parentUuid: bytes.slice(40, 56),
    parentTimestamp: view.getUint32(56),
    parentName: utf16(bytes.subarray(64, 576), false),
    locators,
  };
}

/** Encodes a header (checksum computed); unused locator slots are zeros. */
export function encodeDynamicHeader(header: DynamicHeader): Uint8Array {
  const bytes = new Uint8Array(DYNAMIC_HEADER_BYTES);
  const view = new DataView(bytes.buffer);
  bytes.set(new TextEncoder().encode(COOKIE), 0);
  writeU64(view, 8, NO_DATA_OFFSET);
  writeU64(view, 16, header.tableOffsetBytes);
  view.setUint32(24, header.headerVersion);
  view.setUint32(28, header.maxTableEntries);
  view.setUint32(32, header.blockBytes);
  bytes.set(header.parentUuid.subarray(0, 16), 40);
  view.setUint32(56, header.parentTimestamp >>> 0);
  bytes.set(encodeUtf16(header.parentName, false).subarray(0, 512), 64);
  header.locators.slice(0, LOCATOR_SLOTS).forEach((locator, i) => {
    const at = 576 + i * 24;
    view.setUint32(at, locator.platformCode);
    view.setUint32(at + 4, locator.dataSpace);
    view.setUint32(at + 8, locator.dataLengthBytes);
    writeU64(view, at + 16, locator.dataOffsetBytes);
  });
  view.setUint32(36, vhdChecksum(bytes, 36));
  return bytes;
}

/**
 * The path a locator's payload names, as a POSIX path: `W2ru` and `W2ku`
 * (UTF-16LE Windows paths; drive letter and leading `.\` dropped) and `MacX`
 * (a `file://` URL). Relative or absolute as stored: Hyper-V writes W2ku
 * absolute, Xen's vhd-util writes every locator relative. Undefined for
 * what cannot be a local path (UNC shares, other hosts, NUL bytes, empty).
 */
export function decodeLocatorPath(code: number, payload: Uint8Array): string | undefined {
  let path: string;
  if (code === PLATFORM_MACX) {
    const text = new TextDecoder().decode(payload).replace(/\0[\s\S]*$/, "");
    const match = /^file:\/\/(localhost(?=\/))?(.*)$/.exec(text);
    if (!match) return undefined;
    try {
      path = decodeURIComponent(match[2]);
    } catch {
      return undefined;
    }
  } else if (code === PLATFORM_W2RU || code === PLATFORM_W2KU) {
    let text = utf16(payload, true);
    if (text.startsWith("\\\\")) return undefined; // a UNC share
    if (/^[A-Za-z]:/.test(text)) text = text.slice(2);
    path = text.replaceAll("\\", "/");
  } else return undefined;
  path = path.replace(/^(\.\/)+/, "");
  if (path === "" || path.includes("\0")) return undefined;
  return path;
}

/** A locator payload for `path`: `.\name` style for W2ru, `\dir\name` for W2ku. */
export function encodeLocatorPath(code: number, path: string): Uint8Array {
  if (code === PLATFORM_W2RU) {
    const relative = path.replace(/^(\.\/)+/, "");
    const windows = (relative.startsWith("../") ? relative : `./${relative}`).replaceAll("/", "\\");
    return encodeUtf16(windows, true);
  }
  if (code === PLATFORM_W2KU) return encodeUtf16(path.replaceAll("/", "\\"), true);
  throw new RangeError(`no encoder for platform code ${platformName(code)}`);
}

/** Reads the BAT (big-endian u32 entries). */
export function decodeBat(bytes: Uint8Array, entries: number): Uint32Array {
  const bat = new Uint32Array(entries);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < entries; i += 1) bat[i] = view.getUint32(i * 4);
  return bat;
}

/** Big-endian bytes of BAT entries `[first, first + count)`. */
export function encodeBatEntries(bat: Uint32Array, first: number, count: number): Uint8Array {
  const bytes = new Uint8Array(count * 4);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < count; i += 1) {
    view.setUint32(i * 4, first + i < bat.length ? bat[first + i] : BAT_UNUSED);
  }
  return bytes;
}
