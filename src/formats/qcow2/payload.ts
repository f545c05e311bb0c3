/**
 * The guest bytes of one request as one range over several buffers (a
 * blkif request's segments are separate pages), so a request is mapped
 * once and host-contiguous runs go out as one vectored I/O, uncopied.
 * @module
 */
import { isZeroBytes } from "../zero_bytes.ts";

/** Consecutive guest bytes held in `buffers` in order. */
export class Payload {
  readonly buffers: Uint8Array[];
  readonly lengthBytes: number;
  /** Start of each buffer inside the payload. */
  readonly #starts: number[];

  constructor(buffers: Uint8Array[]) {
    this.buffers = buffers;
    this.#starts = new Array(buffers.length);
    let at = 0;
    for (let i = 0; i < buffers.length; i += 1) {
      this.#starts[i] = at;
      at += buffers[i].byteLength;
    }
    this.lengthBytes = at;
  }

  /** Index of the buffer holding payload byte `at`. */
  #find(at: number): number {
    let lo = 0;
    let hi = this.buffers.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.#starts[mid] <= at) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** Views of payload bytes `[start, end)` (no copy). */
  slice(start: number, end: number): Uint8Array[] {
    if (this.buffers.length === 1) return [this.buffers[0].subarray(start, end)];
    const out: Uint8Array[] = [];
    for (let i = this.#find(start); i < this.buffers.length && this.#starts[i] < end; i += 1) {
      const s = this.#starts[i];
      const b = this.buffers[i];
      const from = Math.max(0, start - s);
      const to = Math.min(b.byteLength, end - s);
      if (to > from) out.push(b.subarray(from, to));
    }
    return out;
  }

  /** Copies payload bytes `[start, end)` into `target` at `targetOffset`. */
  copyTo(start: number, end: number, target: Uint8Array, targetOffset: number): void {
    let at = targetOffset;
    for (const part of this.slice(start, end)) {
      target.set(part, at);
      at += part.byteLength;
    }
  }

  /** Copies `source` into payload bytes from `start`. */
  copyFrom(start: number, source: Uint8Array): void {
    let at = 0;
    for (const part of this.slice(start, start + source.byteLength)) {
      part.set(source.subarray(at, at + part.byteLength));
      at += part.byteLength;
    }
  }

  /** Sets payload bytes `[start, end)` to zero. */
  fill(start: number, end: number): void {
    for (const part of this.slice(start, end)) part.fill(0);
  }

  /** True when payload bytes `[start, end)` are all zero. */
  isZero(start: number, end: number): boolean {
    return this.slice(start, end).every(isZeroBytes);
  }
}
