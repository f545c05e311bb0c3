/**
 * Reading a VHD's structure from its file: which footer to trust, the
 * dynamic header, the BAT, and the layout rules every block must obey
 * (inside the file, clear of metadata and of each other). Shared by the
 * driver (which refuses an image breaking them), `info` and `check` (which
 * reports every breach).
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import {
  decodeFooter,
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  FOOTER_BYTES,
  hasFooterCookie,
  NO_DATA_OFFSET,
  readU64,
  VHD_SECTOR_BYTES,
  vhd_sectors_max,
  type VhdFooter,
  VhdFormatError,
  virtualSizeOf,
} from "./footer.ts";
import {
  bat_entries_max,
  BAT_UNUSED,
  bitmapBytesOf,
  decodeBat,
  decodeDynamicHeader,
  DYNAMIC_HEADER_BYTES,
  type DynamicHeader,
  isPathLocator,
  locatorSpaceBytes,
  platformName,
} from "./dynamic_header.ts";

/** What a VHD file holds, as read at open. */
export interface VhdImage {
  path: string;
  fileBytes: number;
  /** The footer in use: the one at the end, else (dynamic disks) the copy at 0. */
  footer: VhdFooter;
  /** Why the last 512 bytes are not a valid footer; undefined when they are. */
  endFooterProblem?: string;
  /** The copy at offset 0 of a dynamic disk, when valid. */
  copyFooter?: VhdFooter;
  /** Why the copy at offset 0 of a dynamic disk is not valid. */
  copyFooterProblem?: string;
  /** Guest-visible size. */
  sizeBytes: number;
  /** Dynamic and differencing disks only. */
  header?: DynamicHeader;
  bat?: Uint32Array;
  blockBytes: number;
  bitmapBytes: number;
  /** End of the space blocks may use: the end footer's offset, or the file's end without one. */
  dataEndBytes: number;
  /** Xen's batmap (one bit per block: "bitmap full"), where an image has one. */
  batmap?: { headerAtBytes: number; mapAtBytes: number; mapBytes: number };
}

/** A byte range with a name, for layout checks. */
export interface NamedRange {
  start: number;
  end: number;
  what: string;
  /** The BAT index, for a block's range. */
  block?: number;
}

async function readAt(file: ImageFile, offset: number, length: number): Promise<Uint8Array> {
  const bytes = new Uint8Array(length);
  await file.read(offset, bytes);
  return bytes;
}

function tryFooter(path: string, bytes: Uint8Array, where: string) {
  try {
    return { footer: decodeFooter(path, bytes, where) };
  } catch (error) {
    return { problem: (error as Error).message };
  }
}

/**
 * Reads footers, header and BAT. Throws {@linkcode VhdFormatError} when the
 * file is not a usable VHD (no valid footer, bad header, BAT outside the
 * file, unsupported type or size); per-block problems are left to
 * {@linkcode layoutProblems}.
 */
export async function readVhdImage(file: ImageFile): Promise<VhdImage> {
  const path = file.path;
  const fileBytes = file.lengthBytes();
  if (fileBytes < FOOTER_BYTES) {
    throw new VhdFormatError(path, `file is ${fileBytes} bytes, too small for a VHD footer`);
  }
  const end = tryFooter(
    path,
    await readAt(file, fileBytes - FOOTER_BYTES, FOOTER_BYTES),
    `footer at offset ${fileBytes - FOOTER_BYTES}`,
  );
  let footer = end.footer;
  let copy: ReturnType<typeof tryFooter> | undefined;
  if (!footer || footer.diskType !== DISK_FIXED) {
    const head = await readAt(file, 0, FOOTER_BYTES);
    copy = hasFooterCookie(head) || !footer
      ? tryFooter(path, head, "footer copy at offset 0")
      : { problem: `${path}: footer copy at offset 0: no 'conectix' cookie` };
    if (!footer && copy.footer && copy.footer.diskType !== DISK_FIXED) footer = copy.footer;
  }
  if (!footer) {
    throw new VhdFormatError(
      path,
      `no valid footer (${_strip(path, end.problem)}; ${_strip(path, copy?.problem)})`,
    );
  }
  const image = await _readLayout(
    file,
    footer,
    fileBytes,
    end.footer ? fileBytes - FOOTER_BYTES : fileBytes,
  );
  image.endFooterProblem = end.problem;
  image.copyFooter = copy?.footer;
  image.copyFooterProblem = footer.diskType === DISK_FIXED ? undefined : copy?.problem;
  return image;
}

function _strip(path: string, message: string | undefined): string {
  return (message ?? "").replace(`${path}: `, "");
}

async function _readLayout(
  file: ImageFile,
  footer: VhdFooter,
  fileBytes: number,
  dataEndBytes: number,
): Promise<VhdImage> {
  const path = file.path;
  const sizeBytes = virtualSizeOf(footer);
  if (sizeBytes > vhd_sectors_max * VHD_SECTOR_BYTES) {
    throw new VhdFormatError(path, `virtual size ${sizeBytes} exceeds the VHD maximum of 2040 GiB`);
  }
  const image: VhdImage = {
    path,
    fileBytes,
    footer,
    sizeBytes,
    blockBytes: 0,
    bitmapBytes: 0,
    dataEndBytes,
  };
  if (footer.diskType === DISK_FIXED) {
    if (sizeBytes > dataEndBytes) {
      throw new VhdFormatError(
        path,
        `fixed disk: data area of ${dataEndBytes} bytes is smaller than the virtual size ${sizeBytes}`,
      );
    }
    return image;
  }
  if (footer.diskType !== DISK_DYNAMIC && footer.diskType !== DISK_DIFFERENCING) {
    throw new VhdFormatError(path, `footer: unsupported disk type ${footer.diskType}`);
  }
  const headerAt = footer.dataOffset;
  if (
    headerAt === NO_DATA_OFFSET || headerAt < FOOTER_BYTES ||
    headerAt + DYNAMIC_HEADER_BYTES > dataEndBytes
  ) {
    throw new VhdFormatError(
      path,
      `footer: data offset ${
        headerAt === NO_DATA_OFFSET ? "(none)" : headerAt
      } does not point at a dynamic header inside the file`,
    );
  }
  const header = decodeDynamicHeader(path, await readAt(file, headerAt, DYNAMIC_HEADER_BYTES));
  const entries = header.maxTableEntries;
  if (entries > bat_entries_max) {
    throw new VhdFormatError(
      path,
      `dynamic disk header: ${entries} BAT entries, more than the ${bat_entries_max} supported`,
    );
  }
  if (entries * header.blockBytes < sizeBytes) {
    throw new VhdFormatError(
      path,
      `dynamic disk header: ${entries} blocks of ${header.blockBytes} bytes cannot hold the virtual size ${sizeBytes}`,
    );
  }
  const batAt = header.tableOffsetBytes;
  if (batAt === NO_DATA_OFFSET || batAt < FOOTER_BYTES || batAt + entries * 4 > dataEndBytes) {
    throw new VhdFormatError(
      path,
      `dynamic disk header: BAT at offset ${
        batAt === NO_DATA_OFFSET ? "(none)" : batAt
      } with ${entries} entries lies outside the file`,
    );
  }
  image.header = header;
  image.bat = decodeBat(await readAt(file, batAt, entries * 4), entries);
  image.blockBytes = header.blockBytes;
  image.bitmapBytes = bitmapBytesOf(header.blockBytes);
  image.batmap = await _readBatmap(file, image);
  return image;
}

/** Bytes of Xen's batmap read at most (a bit per block: 16 Mi blocks). */
export const batmap_bytes_max = 2 << 20;

/** Xen's batmap header sits right after the BAT (cookie `tdbatmap`). */
async function _readBatmap(file: ImageFile, image: VhdImage): Promise<VhdImage["batmap"]> {
  const header = image.header!;
  const at = header.tableOffsetBytes +
    Math.ceil((header.maxTableEntries * 4) / VHD_SECTOR_BYTES) * VHD_SECTOR_BYTES;
  if (at + VHD_SECTOR_BYTES > image.dataEndBytes) return undefined;
  const head = await readAt(file, at, VHD_SECTOR_BYTES);
  if (String.fromCharCode(...head.subarray(0, 8)) !== "tdbatmap") return undefined;
  const view = new DataView(head.buffer);
  const mapBytes = Math.min(view.getUint32(16) * VHD_SECTOR_BYTES, batmap_bytes_max);
  return { headerAtBytes: at, mapAtBytes: readU64(view, 8), mapBytes };
}

/** Metadata ranges of a dynamic image: footer copy, header, BAT, parent locator data. */
export function metadataRanges(image: VhdImage): NamedRange[] {
  const ranges: NamedRange[] = [{ start: 0, end: FOOTER_BYTES, what: "footer copy" }];
  const header = image.header;
  if (!header) return ranges;
  const headerAt = image.footer.dataOffset;
  ranges.push({ start: headerAt, end: headerAt + DYNAMIC_HEADER_BYTES, what: "dynamic header" });
  const batBytes = Math.ceil((header.maxTableEntries * 4) / VHD_SECTOR_BYTES) * VHD_SECTOR_BYTES;
  ranges.push({
    start: header.tableOffsetBytes,
    end: header.tableOffsetBytes + batBytes,
    what: "BAT",
  });
  const batmap = image.batmap;
  if (batmap) {
    const { headerAtBytes: at, mapAtBytes: map, mapBytes } = batmap;
    ranges.push({ start: at, end: at + VHD_SECTOR_BYTES, what: "batmap header" });
    ranges.push({ start: map, end: map + mapBytes, what: "batmap" });
  }
  if (image.footer.diskType === DISK_DIFFERENCING) {
    header.locators.forEach((locator, i) => {
      const space = locatorSpaceBytes(locator);
      if (!isPathLocator(locator.platformCode) || space === 0) return;
      const start = locator.dataOffsetBytes;
      ranges.push({
        start,
        end: start + space,
        what: `parent locator ${i} (${platformName(locator.platformCode)})`,
      });
    });
  }
  return ranges;
}

/** The file range block `index` occupies (bitmap and data), or undefined when unallocated. */
export function blockRange(image: VhdImage, index: number): NamedRange | undefined {
  const entry = image.bat![index];
  if (entry === BAT_UNUSED) return undefined;
  const start = entry * VHD_SECTOR_BYTES;
  return {
    start,
    end: start + image.bitmapBytes + image.blockBytes,
    what: `block ${index}`,
    block: index,
  };
}

/** Blocks of a dynamic image that cover guest bytes (the rest of the BAT is padding). */
export function usedBlocks(image: VhdImage): number {
  return image.blockBytes === 0 ? 0 : Math.ceil(image.sizeBytes / image.blockBytes);
}

/**
 * Everything wrong with the block layout: BAT entries pointing past the
 * data area or into metadata, blocks overlapping each other, entries past
 * the disk's size, metadata ranges outside the file. Empty for a sound
 * image. At most `max` messages.
 */
export function layoutProblems(image: VhdImage, max = 100): string[] {
  const problems: string[] = [];
  if (!image.bat) return problems;
  const note = (message: string) => {
    if (problems.length < max) problems.push(message);
  };
  const metadata = metadataRanges(image);
  for (const m of metadata) {
    if (m.end > image.dataEndBytes) {
      note(
        `${m.what} at ${m.start}..${m.end} lies past the data area (${image.dataEndBytes} bytes)`,
      );
    }
  }
  const blocks: NamedRange[] = [];
  const used = usedBlocks(image);
  for (let i = 0; i < image.bat.length; i += 1) {
    const block = blockRange(image, i);
    if (!block) continue;
    if (i >= used) {
      note(`BAT entry ${i} is set, but the disk has only ${used} blocks`);
      continue;
    }
    if (block.end > image.dataEndBytes) {
      note(
        `BAT entry ${i} points at offset ${block.start}: block ends at ${block.end}, past the data area (${image.dataEndBytes} bytes)`,
      );
      continue;
    }
    const hit = metadata.find((m) => m.start < block.end && block.start < m.end);
    if (hit) note(`BAT entry ${i} points at offset ${block.start}: block overlaps the ${hit.what}`);
    else blocks.push(block);
  }
  blocks.sort((a, b) => a.start - b.start);
  for (let k = 1; k < blocks.length; k += 1) {
    if (blocks[k].start < blocks[k - 1].end) {
      note(`${blocks[k - 1].what} and ${blocks[k].what} overlap at offset ${blocks[k].start}`);
    }
  }
  return problems;
}
