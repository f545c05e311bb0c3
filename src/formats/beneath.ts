/**
 * What lies beneath an image's unallocated ranges: its parent (backing
 * file) up to the parent's size, zeros past it or without one. Shared by
 * the formats with backing files (qcow, vhd), and the extent merging their
 * block status uses.
 * @module
 */
import type { BlockDriver, Extent } from "./driver.ts";

function inParent(parent: BlockDriver | undefined, offsetBytes: number, lengthBytes: number) {
  return Math.max(0, Math.min(lengthBytes, (parent?.sizeBytes ?? 0) - offsetBytes));
}

/** Fills `out` with what lies beneath `offsetBytes`. */
export async function readBeneath(
  parent: BlockDriver | undefined,
  offsetBytes: number,
  out: Uint8Array,
): Promise<void> {
  const covered = inParent(parent, offsetBytes, out.byteLength);
  if (covered > 0) await parent!.read(offsetBytes, out.subarray(0, covered));
  out.fill(0, covered);
}

/** True when the range reads as zeros beneath (by the parent's block status). */
export async function zeroBeneath(
  parent: BlockDriver | undefined,
  offsetBytes: number,
  lengthBytes: number,
): Promise<boolean> {
  const covered = inParent(parent, offsetBytes, lengthBytes);
  if (covered === 0) return true;
  const extents = await parent!.blockStatus(offsetBytes, covered);
  return extents.every((e) => e.zero);
}

/** Block status beneath: the parent's, then an unallocated zero hole past its end. */
export async function statusBeneath(
  parent: BlockDriver | undefined,
  offsetBytes: number,
  lengthBytes: number,
): Promise<Extent[]> {
  const covered = inParent(parent, offsetBytes, lengthBytes);
  const extents = covered > 0 ? await parent!.blockStatus(offsetBytes, covered) : [];
  if (covered < lengthBytes) {
    extents.push({
      offsetBytes: offsetBytes + covered,
      lengthBytes: lengthBytes - covered,
      hole: true,
      zero: true,
    });
  }
  return extents;
}

/** Appends `extent` to `extents`, merged into the last one when their state is the same. */
export function pushExtent(extents: Extent[], extent: Extent): void {
  const last = extents[extents.length - 1];
  if (last && last.hole === extent.hole && last.zero === extent.zero) {
    last.lengthBytes += extent.lengthBytes;
  } else extents.push({ ...extent });
}
