/**
 * The write plan shared by the crash test and its child writer: the same
 * seed yields the same batches in both processes.
 * @module
 */
import type { Random } from "../../_helpers/random.ts";

export const crash_batches_per_flush = 3;
export const crash_batches_max = 600;

/** One write of a batch. */
export interface PlannedWrite {
  offset: number;
  data: Uint8Array;
}

/** The next batch: 1–4 non-overlapping writes, some unaligned or grain-straddling. */
export function crashBatch(rng: Random, sizeBytes: number): PlannedWrite[] {
  const batch: PlannedWrite[] = [];
  const count = rng.int(1, 4);
  for (let i = 0; i < count; i += 1) {
    const length = rng.pick([rng.int(1, 600), rng.int(1, 70_000), rng.int(60_000, 140_000)]);
    const offset = rng.int(0, sizeBytes - length);
    const end = offset + length;
    const data = rng.bytes(length);
    if (batch.some((w) => w.offset < end && offset < w.offset + w.data.byteLength)) continue;
    batch.push({ offset, data });
  }
  return batch;
}
