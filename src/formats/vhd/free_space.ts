/**
 * The space of a dynamic VHD that nothing references: alignment padding
 * (under a page, ignored), gaps between blocks, and the tail past where
 * the footer belongs (ending on the first page boundary after the last
 * used byte, where the driver puts it). A crash that interrupted block
 * allocations leaves such space holding bytes of the lost allocation:
 * that is a leak. Reclaiming it (a read-write open, `check --repair`) cuts
 * the tail — footer written at its place, fdatasync, file cut behind it,
 * fdatasync, so a valid footer ends the file at every instant — and
 * punches the gaps to zeros, durably, after which they are free space the
 * driver may put new blocks in (they read as zeros, as fresh space does).
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import { isZeroBytes } from "../zero_bytes.ts";
import { FOOTER_BYTES } from "./footer.ts";
import { blockRange, metadataRanges, type NamedRange, type VhdImage } from "./image.ts";

/** Page of the layout: footers end on it, block data starts on it; smaller gaps are padding. */
export const layout_page_bytes = 4096;
/** Bytes of a gap read at once when looking for leaked bytes. */
const scan_chunk_bytes = 1 << 20;

/** A range of the file nothing references. */
export interface Gap {
  start: number;
  end: number;
}

/** Where the footer of an image whose last used byte ends at `usedEndBytes` goes. */
export function footerPlace(usedEndBytes: number): number {
  return Math.ceil((usedEndBytes + FOOTER_BYTES) / layout_page_bytes) * layout_page_bytes -
    FOOTER_BYTES;
}

/** Used ranges (metadata, blocks) inside the data area, sorted; what lies outside is corrupt. */
function usedRanges(image: VhdImage): NamedRange[] {
  const ranges = metadataRanges(image).filter((r) => r.end <= image.dataEndBytes);
  for (let i = 0; i < (image.bat?.length ?? 0); i += 1) {
    const block = blockRange(image, i);
    if (block && block.end <= image.dataEndBytes) ranges.push(block);
  }
  return ranges.sort((a, b) => a.start - b.start);
}

/** The end of the last byte metadata or a block uses. */
export function usedEnd(image: VhdImage): number {
  return usedRanges(image).reduce((end, r) => Math.max(end, r.end), 0);
}

/**
 * Gaps of a page or more between blocks (the tail excluded). Space before
 * the first block is left alone: other writers keep structures of their
 * own between the metadata and the blocks.
 */
export function innerGaps(image: VhdImage): Gap[] {
  const gaps: Gap[] = [];
  let covered = -1;
  for (const r of usedRanges(image)) {
    if (covered < 0 && r.block === undefined) continue;
    if (covered >= 0 && r.start - covered >= layout_page_bytes) {
      gaps.push({ start: covered, end: r.start });
    }
    covered = Math.max(covered, r.end);
  }
  return gaps;
}

/** The tail past the footer's place, when it is a page or more, or the end footer is bad. */
export function tailGap(image: VhdImage): Gap | undefined {
  const place = footerPlace(usedEnd(image));
  const long = image.dataEndBytes - place >= layout_page_bytes;
  if (!long && !image.endFooterProblem) return undefined;
  return { start: place, end: Math.max(place, image.dataEndBytes) };
}

/** True when `gap` holds a byte that is not zero (a leak, not free space). */
export async function holdsData(file: ImageFile, gap: Gap): Promise<boolean> {
  const end = Math.min(gap.end, file.lengthBytes());
  if (end <= gap.start) return false;
  const buffer = new Uint8Array(Math.min(scan_chunk_bytes, end - gap.start));
  for (let at = gap.start; at < end; at += buffer.byteLength) {
    const chunk = buffer.subarray(0, Math.min(buffer.byteLength, end - at));
    await file.read(at, chunk);
    if (!isZeroBytes(chunk)) return true;
  }
  return false;
}

/**
 * Reclaims unreferenced space of a dynamic image whose layout is sound
 * (see the module note). Returns what it did and the gaps now free.
 */
export async function reclaimSpace(
  file: ImageFile,
  image: VhdImage,
): Promise<{ done: string[]; free: Gap[] }> {
  const done: string[] = [];
  const free: Gap[] = [];
  let punched = false;
  for (const gap of innerGaps(image)) {
    if (await holdsData(file, gap)) {
      await file.punchHole(gap.start, gap.end - gap.start);
      punched = true;
      done.push(`unreferenced bytes at ${gap.start}..${gap.end} zeroed`);
    }
    free.push(gap);
  }
  if (punched) await file.flush();
  const tail = tailGap(image);
  if (tail) {
    await file.write(tail.start, image.footer.bytes);
    await file.flush();
    if (file.lengthBytes() > tail.start + FOOTER_BYTES) {
      await file.truncate(tail.start + FOOTER_BYTES);
      await file.flush();
    }
    done.push(
      image.endFooterProblem
        ? `footer rewritten at offset ${tail.start} from the copy at offset 0`
        : `unreferenced space after offset ${tail.start} cut, footer moved there`,
    );
  }
  return { done, free };
}
