/**
 * Copies the contents of one block driver into another, sparsely: ranges
 * the source reports as zero (holes, zero clusters) are not read, and
 * 4 KiB blocks of zeros are not written, so the target leaves them
 * unallocated. Large page-aligned chunks, several in flight. With
 * `compressClusterBytes`, data goes out cluster by cluster, in guest
 * order, through the target's `writeCompressed` (the last cluster of a
 * disk whose size is not a multiple of it is passed short). The caller
 * flushes the target.
 * @module
 */
import type { BlockDriver } from "../formats/driver.ts";
import { isZeroBytes } from "../formats/zero_bytes.ts";
import { NativeMemory } from "../../ffi/memory.ts";
import type { Progress } from "./progress.ts";

/** Bytes read per request (and buffer per worker). */
const chunk_bytes = 2 << 20;
/** Requests in flight. */
const chunks_in_flight_max = 8;
/** Zero detection unit: blocks of zeros are not written. */
const zero_block_bytes = 4096;
/** Guest bytes whose block status is asked at once (bounds the extent list). */
const status_window_bytes = 1 << 30;

/** Options of {@linkcode copyImage}. */
export interface CopyOptions {
  /** Write whole clusters of this size through `target.writeCompressed`. */
  compressClusterBytes?: number;
  progress?: Progress;
}

/** Data ranges of `source` in one window, cut at chunk boundaries. */
async function _chunks(source: BlockDriver, start: number, length: number, unit: number) {
  const chunks: [number, number][] = [];
  for (const e of await source.blockStatus(start, length)) {
    if (e.zero) continue;
    const end = e.offsetBytes + e.lengthBytes;
    // Compressed clusters are written whole: widen to cluster boundaries.
    let pos = Math.floor(e.offsetBytes / unit) * unit;
    const stop = Math.min(source.sizeBytes, Math.ceil(end / unit) * unit);
    while (pos < stop) {
      const next = Math.min(stop, (Math.floor(pos / chunk_bytes) + 1) * chunk_bytes);
      const last = chunks[chunks.length - 1];
      if (last && last[1] > pos) last[1] = Math.max(last[1], next);
      else chunks.push([pos, next]);
      pos = next;
    }
  }
  return chunks;
}

/** Copies every byte of `source` that is not known to be zero into `target`. */
export async function copyImage(
  source: BlockDriver,
  target: BlockDriver,
  options: CopyOptions = {},
) {
  const unit = options.compressClusterBytes ?? 1;
  // Compressed clusters are appended in guest order, as writeCompressed expects.
  const workers = options.compressClusterBytes ? 1 : chunks_in_flight_max;
  let doneBytes = 0;
  for (let start = 0; start < source.sizeBytes; start += status_window_bytes) {
    const length = Math.min(status_window_bytes, source.sizeBytes - start);
    const chunks = await _chunks(source, start, length, unit);
    let next = 0;
    const worker = async () => {
      const memory = NativeMemory.allocate(chunk_bytes);
      try {
        while (next < chunks.length) {
          const [from, to] = chunks[next++];
          const buffer = memory.bytes.subarray(0, to - from);
          await source.read(from, buffer);
          if (options.compressClusterBytes) await _writeClusters(target, from, buffer, unit);
          else await _writeNonZero(target, from, buffer);
          doneBytes = Math.max(doneBytes, to);
          options.progress?.update(doneBytes);
        }
      } finally {
        memory.release();
      }
    };
    await Promise.all(Array.from({ length: workers }, worker));
    doneBytes = start + length;
    options.progress?.update(doneBytes);
  }
}

/** Writes the runs of `buffer` (at guest `offsetBytes`) that are not whole zero blocks. */
async function _writeNonZero(target: BlockDriver, offsetBytes: number, buffer: Uint8Array) {
  const writes: Promise<void>[] = [];
  const end = offsetBytes + buffer.byteLength;
  const blockEnd = (pos: number) =>
    Math.min(end, (Math.floor(pos / zero_block_bytes) + 1) * zero_block_bytes);
  const zero = (pos: number) =>
    isZeroBytes(buffer.subarray(pos - offsetBytes, blockEnd(pos) - offsetBytes));
  for (let pos = offsetBytes; pos < end;) {
    if (zero(pos)) {
      pos = blockEnd(pos);
      continue;
    }
    let stop = blockEnd(pos);
    while (stop < end && !zero(stop)) stop = blockEnd(stop);
    writes.push(target.write(pos, buffer.subarray(pos - offsetBytes, stop - offsetBytes)));
    pos = stop;
  }
  await Promise.all(writes);
}

/** Compressed clusters, in order (compressed writes append to the image). */
async function _writeClusters(
  target: BlockDriver,
  offsetBytes: number,
  buffer: Uint8Array,
  clusterBytes: number,
) {
  for (let at = 0; at < buffer.byteLength; at += clusterBytes) {
    const cluster = buffer.subarray(at, Math.min(buffer.byteLength, at + clusterBytes));
    if (isZeroBytes(cluster)) continue;
    await target.writeCompressed!(offsetBytes + at, cluster);
  }
}
