/**
 * Creating VHD images as `qemu-img create -f vpc` and Hyper-V lay them out.
 *
 * Dynamic: footer copy at 0, dynamic header at 512, BAT at 1536 (every
 * entry unused), footer at the end. Differencing: the same, plus the
 * parent's UUID, timestamp and name in the header and two locators after
 * the BAT, `W2ru` (relative path) and `W2ku` (absolute path), as Hyper-V
 * writes them. Fixed: the data area (a hole), then the footer.
 *
 * Sizes follow QEMU: rounded up to the smallest CHS geometry unless
 * `force_size`; a differencing disk takes its size exactly (its parent's
 * by default). Written, then fdatasync; a failure removes the file.
 * @module
 */
import { createImageFile } from "../raw/open_file.ts";
import type { ImageFile } from "../image_file.ts";
import {
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  encodeFooter,
  FOOTER_BYTES,
  type Geometry,
  geometryForExactSize,
  NO_DATA_OFFSET,
  planSize,
  VHD_SECTOR_BYTES,
  vhdTimestamp,
} from "./footer.ts";
import {
  BAT_UNUSED,
  DEFAULT_BLOCK_BYTES,
  DYNAMIC_HEADER_BYTES,
  encodeDynamicHeader,
  encodeLocatorPath,
  type ParentLocator,
  PLATFORM_W2KU,
  PLATFORM_W2RU,
} from "./dynamic_header.ts";

/** The parent of a new differencing disk. */
export interface VhdParentSpec {
  /** Path relative to the new image's folder (for `W2ru`). */
  relativePath: string;
  /** Absolute path (for `W2ku`). */
  absolutePath: string;
  /** Footer UUID of a VHD parent; all zeros for a raw parent. */
  uuid: Uint8Array;
  /** Parent's modification time. */
  mtime: Date;
  sizeBytes: number;
}

/** What to create. */
export interface VhdCreateOptions {
  /** Requested virtual size (0 with a parent: the parent's size). */
  sizeBytes: number;
  subformat: "dynamic" | "fixed";
  /** Block size of a dynamic disk (power of two, 512 B to 256 MiB). */
  blockBytes?: number;
  /** Keep the size exactly, with the maximum geometry (QEMU's `force_size`). */
  forceSize?: boolean;
  parent?: VhdParentSpec;
}

/** Largest block size accepted on creation. */
export const block_bytes_max = 256 << 20;
const bat_offset_bytes = 3 * VHD_SECTOR_BYTES;

function alignSector(bytes: number): number {
  return Math.ceil(bytes / VHD_SECTOR_BYTES) * VHD_SECTOR_BYTES;
}

/** The size and geometry `options` give; throws RangeError for an impossible request. */
export function plannedVhdSize(
  options: VhdCreateOptions,
): { sizeBytes: number; geometry: Geometry } {
  const parent = options.parent;
  if (!parent) return planSize(options.sizeBytes, options.forceSize ?? false);
  const sizeBytes = alignSector(options.sizeBytes || parent.sizeBytes);
  if (sizeBytes < parent.sizeBytes) {
    throw new RangeError(`size ${sizeBytes} is smaller than the parent's ${parent.sizeBytes}`);
  }
  planSize(sizeBytes, true); // the 2040 GiB limit
  return { sizeBytes, geometry: geometryForExactSize(sizeBytes) };
}

/** Creates `path` (which must not exist). */
export async function createVhd(path: string, options: VhdCreateOptions): Promise<void> {
  const blockBytes = options.blockBytes ?? DEFAULT_BLOCK_BYTES;
  if (
    blockBytes < VHD_SECTOR_BYTES || blockBytes > block_bytes_max ||
    (blockBytes & (blockBytes - 1)) !== 0
  ) {
    throw new RangeError(`block size ${blockBytes} is not a power of two from 512 to 256M`);
  }
  if (options.subformat === "fixed" && options.parent) {
    throw new RangeError("a fixed VHD cannot have a parent");
  }
  const { sizeBytes, geometry } = plannedVhdSize(options);
  const fields = {
    diskType: options.subformat === "fixed"
      ? DISK_FIXED
      : options.parent
      ? DISK_DIFFERENCING
      : DISK_DYNAMIC,
    dataOffset: options.subformat === "fixed" ? NO_DATA_OFFSET : FOOTER_BYTES,
    sizeBytes,
    geometry,
    uuid: crypto.getRandomValues(new Uint8Array(16)),
    timestamp: vhdTimestamp(new Date()),
  };
  const footer = encodeFooter(fields);
  await createImageFile(path, async (file) => {
    if (options.subformat === "fixed") {
      await file.truncate(sizeBytes);
      await file.write(sizeBytes, footer);
    } else await _writeDynamic(file, footer, sizeBytes, blockBytes, options.parent);
    await file.flush();
  });
}

async function _writeDynamic(
  file: ImageFile,
  footer: Uint8Array,
  sizeBytes: number,
  blockBytes: number,
  parent?: VhdParentSpec,
): Promise<void> {
  const entries = Math.ceil(sizeBytes / blockBytes);
  const bat = new Uint8Array(alignSector(entries * 4)).fill(0xff);
  console.assert(BAT_UNUSED === 0xffffffff);
  let at = bat_offset_bytes + bat.byteLength;
  const locators: ParentLocator[] = [];
  const payloads: [number, Uint8Array][] = [];
  if (parent) {
    for (
      const [code, name] of [[PLATFORM_W2RU, parent.relativePath], [
        PLATFORM_W2KU,
        parent.absolutePath,
      ]] as const
    ) {
      const payload = encodeLocatorPath(code, name);
      const space = alignSector(payload.byteLength);
      // data_space in bytes, as Hyper-V and Xen write it (readers accept both).
      locators.push({
        platformCode: code,
        dataSpace: space,
        dataLengthBytes: payload.byteLength,
        dataOffsetBytes: at,
      });
      payloads.push([at, payload]);
      at += space;
    }
  }
  const header = encodeDynamicHeader({
    tableOffsetBytes: bat_offset_bytes,
    headerVersion: 0x00010000,
    maxTableEntries: entries,
    blockBytes,
    parentUuid: parent?.uuid ?? new Uint8Array(16),
    parentTimestamp: parent ? vhdTimestamp(parent.mtime) : 0,
    parentName: parent ? parent.absolutePath.slice(parent.absolutePath.lastIndexOf("/") + 1) : "",
    locators,
  });
  console.assert(FOOTER_BYTES + DYNAMIC_HEADER_BYTES === bat_offset_bytes);
  await file.write(0, footer);
  await file.write(FOOTER_BYTES, header);
  await file.write(bat_offset_bytes, bat);
  for (const [offset, payload] of payloads) {
    const padded = new Uint8Array(alignSector(payload.byteLength));
    padded.set(payload);
    await file.write(offset, padded);
  }
  await file.write(at, footer);
}
