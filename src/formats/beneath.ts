/**
 * What lies beneath a layer of a backing chain (qcow, qcow2): where the
 * layer has nothing, reads see the backing image, clipped to its size,
 * and zeros past it (or everywhere without one). Also what both formats
 * share around that: merging the allocation runs they report, opening a
 * layer and its parent, opening a file for their check.
 * @module
 */
import { type BlockDriver, BlockError, type Extent } from "./driver.ts";
import type { ImageFile } from "./image_file.ts";
import type { CheckReport } from "./inspect.ts";
import { openImageFile } from "./raw/open_file.ts";

/** Fills `buffers` (consecutive guest bytes from `offsetBytes`) from `parent`, zeros past its end. */
export async function readBeneath(
  parent: BlockDriver | undefined,
  offsetBytes: number,
  buffers: Uint8Array[],
): Promise<void> {
  const lengthBytes = buffers.reduce((n, b) => n + b.byteLength, 0);
  const inParent = Math.max(0, Math.min(lengthBytes, (parent?.sizeBytes ?? 0) - offsetBytes));
  let at = 0;
  const fromParent: Uint8Array[] = [];
  for (const b of buffers) {
    const take = Math.max(0, Math.min(b.byteLength, inParent - at));
    if (take > 0) fromParent.push(b.subarray(0, take));
    b.fill(0, take);
    at += b.byteLength;
  }
  if (fromParent.length === 1) await parent!.read(offsetBytes, fromParent[0]);
  else if (fromParent.length > 1) {
    if (parent!.readv) await parent!.readv(offsetBytes, fromParent);
    else {
      let pos = offsetBytes;
      for (const b of fromParent) {
        await parent!.read(pos, b);
        pos += b.byteLength;
      }
    }
  }
}

/** True when the range reads as zeros beneath the layer (per the parent's block status). */
export async function zeroBeneath(
  parent: BlockDriver | undefined,
  offsetBytes: number,
  lengthBytes: number,
): Promise<boolean> {
  const inParent = Math.min(lengthBytes, (parent?.sizeBytes ?? 0) - offsetBytes);
  if (inParent <= 0) return true;
  const extents = await parent!.blockStatus(offsetBytes, inParent);
  return extents.every((e) => e.zero);
}

/** Allocation beneath the layer: the parent's extents, a zero hole past its end. */
export async function statusBeneath(
  parent: BlockDriver | undefined,
  offsetBytes: number,
  lengthBytes: number,
): Promise<Extent[]> {
  const inParent = Math.max(0, Math.min(lengthBytes, (parent?.sizeBytes ?? 0) - offsetBytes));
  const extents = inParent > 0 ? await parent!.blockStatus(offsetBytes, inParent) : [];
  if (inParent < lengthBytes) {
    extents.push({
      offsetBytes: offsetBytes + inParent,
      lengthBytes: lengthBytes - inParent,
      hole: true,
      zero: true,
    });
  }
  return extents;
}

/** Appends `e` to `extents`, merged into the last one when its state is the same. */
export function pushExtent(extents: Extent[], e: Extent): void {
  const last = extents[extents.length - 1];
  if (last && last.hole === e.hole && last.zero === e.zero) last.lengthBytes += e.lengthBytes;
  else extents.push({ ...e });
}

/** One run of a layer's own allocation, as `blktap map` asks formats for it. */
export interface MapRun {
  offsetBytes: number;
  lengthBytes: number;
  kind: "hole" | "data" | "compressed" | "zero";
  /** Where the bytes are in the image file (data, and preallocated zeros). */
  hostOffsetBytes?: number;
}

/** Appends `run`, merged into the last one when of the same kind and contiguous in the file. */
export function pushMapRun(runs: MapRun[], run: MapRun): void {
  const last = runs[runs.length - 1];
  const joins = last && last.kind === run.kind &&
    (last.hostOffsetBytes === undefined
      ? run.hostOffsetBytes === undefined
      : last.hostOffsetBytes + last.lengthBytes === run.hostOffsetBytes);
  if (joins) last.lengthBytes += run.lengthBytes;
  else runs.push(run);
}

/**
 * Opens one layer of a chain over its open `file`: `body` parses it and may
 * open the parent through `adopt`; if anything fails, the parent and the
 * file are closed again, and the format's own error (`formatError`) becomes
 * a BlockError (EINVAL) naming the problem.
 */
export async function openLayer<D>(
  file: ImageFile,
  formatError: abstract new (...args: never[]) => Error,
  body: (adopt: (open: () => Promise<BlockDriver>) => Promise<BlockDriver>) => Promise<D>,
): Promise<D> {
  let parent: BlockDriver | undefined;
  try {
    return await body(async (open) => (parent = await open()));
  } catch (error) {
    await parent?.close();
    await file.close();
    if (error instanceof formatError) throw new BlockError("EINVAL", error.message);
    throw error;
  }
}

/**
 * Runs a format's check on `path` opened for it (read-only unless
 * `repair`); a file that cannot be opened is reported unusable.
 */
export async function checkOnFile(
  path: string,
  repair: boolean,
  check: (file: ImageFile) => Promise<CheckReport>,
): Promise<CheckReport> {
  let file: ImageFile;
  try {
    file = await openImageFile(path, { readOnly: !repair, engine: "sync" });
  } catch (error) {
    return { corruptions: [], leakedClusters: 0, unusable: (error as Error).message };
  }
  try {
    return await check(file);
  } finally {
    await file.close();
  }
}
