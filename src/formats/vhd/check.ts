/**
 * The structural check of VHD images (`blktap check`; QEMU has none):
 * footers (the end one, the copy at 0 of dynamic disks, and that they
 * agree), the dynamic header, every BAT entry (inside the data area, clear
 * of metadata and of other blocks), parent locators, and Xen's batmap
 * where one exists (a block it calls full must be allocated with a full
 * bitmap). Unreferenced space of 4 KiB or more holding bytes is a leak
 * (what an interrupted allocation leaves), counted in blocks; zeroed gaps
 * are free space, smaller ones the page alignment of block data
 * (free_space.ts).
 *
 * `--repair` only does what cannot lose data: it copies a valid footer over
 * an invalid one (end or copy), cuts unreferenced space at the end of the
 * file and zeroes leaked gaps (free_space.ts; a read-write open of the
 * driver does the same). It never changes a BAT entry or a bitmap, and
 * cuts nothing while the layout is corrupt.
 * @module
 */
import type { CheckOptions, CheckReport } from "../inspect.ts";
import type { ImageFile } from "../image_file.ts";
import { checkOnFile } from "../beneath.ts";
import { DISK_DIFFERENCING, DISK_FIXED, VHD_SECTOR_BYTES } from "./footer.ts";
import { blockRange, layoutProblems, readVhdImage, usedBlocks, type VhdImage } from "./image.ts";
import { allSet, testBit } from "./bitmap_cache.ts";
import {
  type Gap,
  holdsData,
  innerGaps,
  layout_page_bytes,
  reclaimSpace,
  tailGap,
} from "./free_space.ts";
import { parentCandidates } from "./parent.ts";

/** Problems of one kind reported at most (a wild table could name millions). */
const check_messages_max = 100;

/** Checks `path`; writes only with `repair`. */
export function checkVhd(path: string, options: CheckOptions): Promise<CheckReport> {
  return checkOnFile(path, options.repair, (file) => checkVhdFile(file, options));
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
    // With the layout sound, blocks are distinct and inside the file: bounded work.
    if (layout.length === 0) corruptions.push(...(await batmapProblems(file, image)));
    corruptions.push(...(await locatorProblems(file, image)));
    const leaked = layout.length === 0 ? await leakedBlocks(file, image) : 0;
    const report: CheckReport = { corruptions, leakedClusters: leaked };
    if (options.repair) report.repaired = await repair(file, image, layout.length === 0);
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

/** Xen's batmap: a block it calls full must be allocated with a full bitmap. */
async function batmapProblems(file: ImageFile, image: VhdImage): Promise<string[]> {
  const batmap = image.batmap;
  if (!batmap) return [];
  if (batmap.mapAtBytes + batmap.mapBytes > image.dataEndBytes) {
    return [`Xen batmap at offset ${batmap.mapAtBytes} lies past the data area`];
  }
  const problems: string[] = [];
  const map = new Uint8Array(batmap.mapBytes);
  await file.read(batmap.mapAtBytes, map);
  const blocks = Math.min(usedBlocks(image), batmap.mapBytes * 8);
  const sectors = image.blockBytes / VHD_SECTOR_BYTES;
  for (let i = 0; i < blocks && problems.length < check_messages_max; i += 1) {
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
  return problems;
}

async function locatorProblems(file: ImageFile, image: VhdImage): Promise<string[]> {
  if (image.footer.diskType !== DISK_DIFFERENCING) return [];
  const candidates = await parentCandidates(file, image);
  return candidates.length > 0 ? [] : ["differencing disk without a parent locator naming a path"];
}

/** Unreferenced space holding bytes (a tail past the footer's place counts whole), in blocks. */
async function leakedBlocks(file: ImageFile, image: VhdImage): Promise<number> {
  // A lost block and its page padding count as one.
  const blocks = (gap: Gap) =>
    Math.max(1, Math.round((gap.end - gap.start) / (image.bitmapBytes + image.blockBytes)));
  let leaked = 0;
  for (const gap of innerGaps(image)) if (await holdsData(file, gap)) leaked += blocks(gap);
  const tail = tailGap(image);
  if (tail && tail.end - tail.start >= layout_page_bytes) leaked += blocks(tail);
  return leaked;
}

async function repair(file: ImageFile, image: VhdImage, layoutSound: boolean): Promise<string[]> {
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
  } else if (layoutSound) done.push(...(await reclaimSpace(file, image)).done);
  return done;
}
