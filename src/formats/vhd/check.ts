/**
 * The structural check of VHD images (`blktap check`; QEMU has none):
 * footers (the end one, the copy at 0 of dynamic disks, and that they
 * agree), the dynamic header, every BAT entry (inside the data area, clear
 * of metadata and of other blocks), parent locators, and Xen's batmap
 * where one exists (a block it calls full must be allocated with a full
 * bitmap). Unreferenced space of 4 KiB or more is a leak (what an
 * interrupted allocation leaves), counted in blocks; smaller gaps are the
 * page alignment of block data.
 *
 * `--repair` only does what cannot lose data: it copies a valid footer over
 * an invalid one (end or copy), and cuts unreferenced space at the end of
 * the file (footer written at the new end, fdatasync, truncate). It never
 * changes a BAT entry or a bitmap, and repairs nothing while the layout is
 * corrupt.
 * @module
 */
import type { CheckOptions, CheckReport } from "../inspect.ts";
import type { ImageFile } from "../image_file.ts";
import { openImageFile } from "../raw/open_file.ts";
import {
  DISK_DIFFERENCING,
  DISK_FIXED,
  FOOTER_BYTES,
  readU64,
  VHD_SECTOR_BYTES,
} from "./footer.ts";
import {
  blockRange,
  layoutProblems,
  metadataRanges,
  type NamedRange,
  readVhdImage,
  usedBlocks,
  type VhdImage,
} from "./image.ts";
import { allSet, testBit } from "./bitmap_cache.ts";
import { parentCandidates } from "./parent.ts";

/** Gaps smaller than this are alignment padding, not leaks. */
const leak_bytes_min = 4096;
/** Largest Xen batmap read (one bit per block: 2 MiB covers 16 Mi blocks). */
const batmap_bytes_max = 2 << 20;

/** Checks `path`; writes only with `repair`. */
export async function checkVhd(path: string, options: CheckOptions): Promise<CheckReport> {
  let file: ImageFile;
  try {
    file = await openImageFile(path, { readOnly: !options.repair, engine: "sync" });
  } catch (error) {
    return { corruptions: [], leakedClusters: 0, unusable: (error as Error).message };
  }
  try {
    return await checkVhdFile(file, options);
  } finally {
    await file.close();
  }
}

/** Checks an open file (the crash simulator passes its in-memory images). */
export async function checkVhdFile(file: ImageFile, options: CheckOptions): Promise<CheckReport> {
  const path = file.path;
  try {
    let image: VhdImage;
    try {
      image = await readVhdImage(file);
    } catch (error) {
      return { corruptions: [], leakedClusters: 0, unusable: (error as Error).message };
    }
    const corruptions = footerProblems(image);
    if (image.footer.diskType === DISK_FIXED) return { corruptions, leakedClusters: 0 };
    const layout = layoutProblems(image);
    corruptions.push(...layout);
    const ranges = [...metadataRanges(image), ...(await batmapRanges(file, image, corruptions))];
    corruptions.push(...(await locatorProblems(file, image)));
    const { leakedBlocks, trailingFrom } = leaks(image, ranges);
    const report: CheckReport = { corruptions, leakedClusters: leakedBlocks };
    if (options.repair) {
      report.repaired = await repair(file, image, layout.length === 0, trailingFrom);
    }
    return report;
  } catch (error) {
    return { corruptions: [], leakedClusters: 0, unusable: `${path}: ${(error as Error).message}` };
  }
}

function footerProblems(image: VhdImage): string[] {
  const problems: string[] = [];
  const strip = (m: string) => m.replace(`${image.path}: `, "");
  if (image.endFooterProblem) problems.push(strip(image.endFooterProblem));
  if (image.footer.diskType === DISK_FIXED) return problems;
  if (image.copyFooterProblem) problems.push(strip(image.copyFooterProblem));
  const copy = image.copyFooter;
  if (!image.endFooterProblem && copy && !copy.bytes.every((b, i) => b === image.footer.bytes[i])) {
    problems.push("the footer copy at offset 0 differs from the footer at the end");
  }
  return problems;
}

/** Xen's batmap: its ranges (metadata), and blocks it calls full that are not. */
async function batmapRanges(
  file: ImageFile,
  image: VhdImage,
  problems: string[],
): Promise<NamedRange[]> {
  const header = image.header!;
  const at = header.tableOffsetBytes +
    Math.ceil((header.maxTableEntries * 4) / VHD_SECTOR_BYTES) * VHD_SECTOR_BYTES;
  if (at + VHD_SECTOR_BYTES > image.dataEndBytes) return [];
  const head = new Uint8Array(VHD_SECTOR_BYTES);
  await file.read(at, head);
  if (new TextDecoder().decode(head.subarray(0, 8)) !== "tdbatmap") return [];
  const view = new DataView(head.buffer);
  const mapAt = readU64(view, 8);
  const mapBytes = Math.min(view.getUint32(16) * VHD_SECTOR_BYTES, batmap_bytes_max);
  const ranges: NamedRange[] = [{ start: at, end: at + VHD_SECTOR_BYTES, what: "batmap header" }];
  if (mapAt + mapBytes > image.dataEndBytes) {
    problems.push(`Xen batmap at offset ${mapAt} lies past the data area`);
    return ranges;
  }
  ranges.push({ start: mapAt, end: mapAt + mapBytes, what: "batmap" });
  const map = new Uint8Array(mapBytes);
  await file.read(mapAt, map);
  const blocks = Math.min(usedBlocks(image), mapBytes * 8);
  const sectors = image.blockBytes / VHD_SECTOR_BYTES;
  for (let i = 0; i < blocks; i += 1) {
    if (!testBit(map, i)) continue;
    const block = blockRange(image, i);
    if (!block || block.end > image.dataEndBytes) {
      problems.push(`Xen batmap marks block ${i} full, but the BAT has no valid entry for it`);
      continue;
    }
    const bits = new Uint8Array(image.bitmapBytes);
    await file.read(block.start, bits);
    if (!allSet(bits, 0, sectors)) {
      problems.push(`Xen batmap marks block ${i} full, but its bitmap is not`);
    }
  }
  return ranges;
}

async function locatorProblems(file: ImageFile, image: VhdImage): Promise<string[]> {
  if (image.footer.diskType !== DISK_DIFFERENCING) return [];
  const candidates = await parentCandidates(file, image);
  return candidates.length > 0 ? [] : ["differencing disk without a parent locator naming a path"];
}

/** Unreferenced space: gaps of at least `leak_bytes_min`, counted in blocks. */
function leaks(
  image: VhdImage,
  metadata: NamedRange[],
): { leakedBlocks: number; trailingFrom?: number } {
  const ranges = [...metadata];
  for (let i = 0; i < image.bat!.length; i += 1) {
    const block = blockRange(image, i);
    if (block && block.end <= image.dataEndBytes) ranges.push(block);
  }
  ranges.sort((a, b) => a.start - b.start);
  const unit = image.bitmapBytes + image.blockBytes;
  let leaked = 0;
  let covered = 0;
  for (const r of ranges) {
    if (r.start - covered >= leak_bytes_min) leaked += Math.ceil((r.start - covered) / unit);
    covered = Math.max(covered, r.end);
  }
  const trailing = image.dataEndBytes - covered;
  if (trailing >= leak_bytes_min) leaked += Math.ceil(trailing / unit);
  const needsFooterMove = trailing >= leak_bytes_min || image.endFooterProblem !== undefined;
  // Where the driver puts a footer after the last block: ending on a page boundary.
  const footerAt = Math.ceil((covered + FOOTER_BYTES) / leak_bytes_min) * leak_bytes_min -
    FOOTER_BYTES;
  return { leakedBlocks: leaked, trailingFrom: needsFooterMove ? footerAt : undefined };
}

async function repair(
  file: ImageFile,
  image: VhdImage,
  layoutSound: boolean,
  trailingFrom?: number,
): Promise<string[]> {
  const done: string[] = [];
  const good = image.footer.bytes;
  if (image.copyFooterProblem && !image.endFooterProblem) {
    await file.write(0, good);
    await file.flush();
    done.push("footer copy at offset 0 rewritten from the footer at the end");
  }
  if (image.endFooterProblem && !layoutSound) {
    // Nothing may be cut while the layout is in doubt: append the footer.
    const at = Math.ceil(image.fileBytes / VHD_SECTOR_BYTES) * VHD_SECTOR_BYTES;
    await file.write(at, good);
    await file.flush();
    done.push(`footer appended at offset ${at} from the copy at offset 0`);
  } else if (trailingFrom !== undefined) {
    // Footer first, durable, then the cut: a valid footer ends the file at every instant.
    await file.write(trailingFrom, good);
    await file.flush();
    await file.truncate(trailingFrom + FOOTER_BYTES);
    await file.flush();
    done.push(
      image.endFooterProblem
        ? `footer rewritten at offset ${trailingFrom} from the copy at offset 0`
        : `unreferenced space after offset ${trailingFrom} cut, footer moved there`,
    );
  }
  return done;
}
