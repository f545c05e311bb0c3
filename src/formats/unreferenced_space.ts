/**
 * Leak finding for allocating formats (qcow, vmdk; qcow2 and vhd can use
 * it too): which stored data of an image file no metadata references.
 * That is what a crash between writing a cluster and linking it leaves,
 * and what `check` reports as leaked and a read-write open reclaims.
 *
 * Memory is bounded by a bitmap of at most `window_units_max` allocation
 * units, whatever the file's size: a larger file is scanned in windows,
 * the format's references enumerated once per window that holds data.
 * @module
 */
import type { ImageFile } from "./image_file.ts";

/** Units per bitmap window: 64 Mi units (8 MiB of bitmap; 256 GiB of 4 KiB units). */
export const window_units_max = 64 << 20;

/** Marks `[startBytes, endBytes)` of the file as referenced. */
export type MarkReferenced = (startBytes: number, endBytes: number) => void;

/** A byte range of the file. */
export interface FileRange {
  startBytes: number;
  endBytes: number;
}

/**
 * The units of `file` at or past `fromBytes` that hold data (not holes)
 * and that no reference touches, merged into ranges. A unit is
 * `unitBytes` (file systems report data per block, so callers use at
 * least 4 KiB); units touched by any referenced byte are in use.
 * `visitReferences(mark)` must call `mark` for every referenced range.
 */
export async function unreferencedRanges(
  file: ImageFile,
  fromBytes: number,
  unitBytes: number,
  visitReferences: (mark: MarkReferenced) => Promise<void>,
  windowUnits = window_units_max,
): Promise<FileRange[]> {
  const fileBytes = file.lengthBytes();
  const firstUnit = Math.ceil(fromBytes / unitBytes);
  const endUnit = Math.ceil(fileBytes / unitBytes);
  const ranges: FileRange[] = [];
  for (let w = firstUnit; w < endUnit; w += windowUnits) {
    const wEnd = Math.min(endUnit, w + windowUnits);
    const start = w * unitBytes;
    const data = (await file.extents(start, Math.min(fileBytes, wEnd * unitBytes) - start))
      .filter((e) => e.data);
    if (data.length === 0) continue;
    const used = new Uint8Array(Math.ceil((wEnd - w) / 8));
    await visitReferences((s, e) => {
      const from = Math.max(w, Math.floor(s / unitBytes));
      const to = Math.min(wEnd, Math.ceil(e / unitBytes));
      for (let u = from; u < to; u += 1) used[(u - w) >> 3] |= 1 << ((u - w) & 7);
    });
    let done = w; // units below this were looked at (extents may share a unit)
    for (const extent of data) {
      const from = Math.max(done, Math.floor(extent.offsetBytes / unitBytes));
      const to = Math.min(wEnd, Math.ceil((extent.offsetBytes + extent.lengthBytes) / unitBytes));
      for (let u = from; u < to; u += 1) {
        if (used[(u - w) >> 3] & (1 << ((u - w) & 7))) continue;
        _append(ranges, u * unitBytes, Math.min(fileBytes, (u + 1) * unitBytes));
      }
      done = Math.max(done, to);
    }
  }
  return ranges;
}

function _append(ranges: FileRange[], startBytes: number, endBytes: number): void {
  const last = ranges[ranges.length - 1];
  if (last && last.endBytes === startBytes) last.endBytes = endBytes;
  else ranges.push({ startBytes, endBytes });
}

/** Total bytes of `ranges`. */
export function rangesBytes(ranges: FileRange[]): number {
  return ranges.reduce((n, r) => n + r.endBytes - r.startBytes, 0);
}
