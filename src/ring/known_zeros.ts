/**
 * What ctrl knows reads as zeros on a minor, so a read of never-written
 * space is answered without a trip over the ring (QEMU answers such reads
 * from its L2 tables without I/O; here the tables are in another process).
 *
 * Knowledge comes only from the disk process's block status (unallocated
 * and reading as zeros) and is kept per granule in a bitmap of bounded
 * size: a granule's bit says all of it reads as zeros. Every request that
 * can change bytes clears the bits it touches before it is issued, so a
 * read issued after a write was answered never sees the zeros it replaced.
 *
 * Learning is only trusted when nothing could have changed under the
 * answer: no modifying request was in flight when the query was issued and
 * none was issued before its answer (an epoch that every modification
 * moves). Otherwise the answer is dropped, and queries are spaced out so a
 * busy writer costs at most one extra round trip per
 * `misses_per_retry` reads.
 * @module
 */
import type { Extent } from "../formats/driver.ts";

/** The bitmap never exceeds this many granules (2 MiB of bits). */
export const known_zero_granules_max = 1 << 24;
/** Smallest granule: one page, the unit reads come in. */
const granule_bytes_min = 4096;
/** Block status is asked for this much at once (aligned), once per window. */
export const learn_window_bytes = 1 << 30;
/** After an answer was dropped, reads that miss before the next query. */
export const misses_per_retry = 64;

/** A block-status question the caller should ask the disk process. */
export interface ZeroQuery {
  offsetBytes: number;
  lengthBytes: number;
  /** The epoch it was issued in: an answer from an older one is dropped. */
  epoch: number;
  /** The learning window it asks about (queries made by {@linkcode KnownZeros.missed}). */
  window?: number;
}

/** Known-zero granules of one disk, and when to learn more. */
export class KnownZeros {
  #sizeBytes = 0;
  #granuleBytes = granule_bytes_min;
  #bits: Uint32Array | undefined;
  /** Windows learned since the last reset. */
  #askedWindows = new Set<number>();
  /** Moves at every modification and reset: an answer from an older epoch may be stale. */
  #epoch = 0;
  /** Modifying requests issued and not yet answered; survives resets (they are replayed). */
  #modifying = 0;
  #queriesInFlight = 0;
  #missesUntilQuery = 0;

  constructor(sizeBytes: number) {
    this.reset(sizeBytes);
  }

  get granuleBytes(): number {
    return this.#granuleBytes;
  }

  /** True when every byte of the range is known to read as zeros. */
  covers(offsetBytes: number, lengthBytes: number): boolean {
    const bits = this.#bits;
    if (!bits || lengthBytes === 0) return false;
    const first = Math.floor(offsetBytes / this.#granuleBytes);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / this.#granuleBytes);
    for (let g = first; g <= last; g++) {
      if ((bits[g >>> 5] & (1 << (g & 31))) === 0) return false;
    }
    return true;
  }

  /**
   * A request that may change the range is about to be issued: the range
   * is no longer known. Call the returned function once it was answered
   * or failed.
   */
  modify(offsetBytes: number, lengthBytes: number): () => void {
    this.#epoch++;
    this.#modifying++;
    if (this.#bits && lengthBytes > 0) {
      const first = Math.floor(offsetBytes / this.#granuleBytes);
      const last = Math.floor((offsetBytes + lengthBytes - 1) / this.#granuleBytes);
      this.#setRange(first, last + 1, false);
    }
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.#modifying--;
    };
  }

  /**
   * A read at `offsetBytes` missed: the block status worth asking now, or
   * undefined (one query at a time, none while a modification is in
   * flight, each window once).
   */
  missed(offsetBytes: number): ZeroQuery | undefined {
    if (this.#missesUntilQuery > 0) this.#missesUntilQuery--;
    if (this.#queriesInFlight > 0 || this.#missesUntilQuery > 0) return undefined;
    const window = Math.floor(offsetBytes / learn_window_bytes);
    if (this.#askedWindows.has(window)) return undefined;
    const start = window * learn_window_bytes;
    const query = this.asking(start, Math.min(learn_window_bytes, this.#sizeBytes - start));
    if (query) query.window = window;
    return query;
  }

  /**
   * A block status query for the range is about to be issued (by
   * {@linkcode missed} or for a client): give its answer to
   * {@linkcode learn}. Undefined when no answer could be trusted.
   */
  asking(offsetBytes: number, lengthBytes: number): ZeroQuery | undefined {
    if (this.#modifying > 0) return undefined;
    this.#queriesInFlight++;
    return { offsetBytes, lengthBytes, epoch: this.#epoch };
  }

  /**
   * The answer to `query` arrived (`extents` undefined: it failed).
   * Learned only if nothing was modified since the query was issued.
   */
  learn(query: ZeroQuery, extents: Extent[] | undefined): void {
    this.#queriesInFlight--;
    if (!extents || query.epoch !== this.#epoch) {
      if (query.window !== undefined) this.#missesUntilQuery = misses_per_retry;
      return;
    }
    const granules = Math.ceil(this.#sizeBytes / this.#granuleBytes);
    for (const e of extents) {
      if (!(e.hole && e.zero)) continue;
      // Only granules wholly inside the extent; the disk's last granule may be short.
      const end = e.offsetBytes + e.lengthBytes;
      const first = Math.ceil(e.offsetBytes / this.#granuleBytes);
      const stop = end >= this.#sizeBytes ? granules : Math.floor(end / this.#granuleBytes);
      if (stop > first) this.#setRange(first, stop, true);
    }
    if (query.window !== undefined) this.#askedWindows.add(query.window);
  }

  /**
   * Everything forgotten (another disk process, maybe another image, is
   * behind the ring now); modifications in flight stay counted.
   */
  reset(sizeBytes: number): void {
    this.#epoch++;
    this.#sizeBytes = sizeBytes;
    let granule = granule_bytes_min;
    while (Math.ceil(sizeBytes / granule) > known_zero_granules_max) granule *= 2;
    this.#granuleBytes = granule;
    this.#bits = undefined;
    this.#askedWindows.clear();
    this.#missesUntilQuery = 0;
  }

  #setRange(first: number, end: number, value: boolean): void {
    const bits = this.#bits ??= new Uint32Array(
      Math.ceil(Math.ceil(this.#sizeBytes / this.#granuleBytes) / 32),
    );
    let g = first;
    for (; g < end && (g & 31) !== 0; g++) this.#setBit(bits, g, value);
    const wordsEnd = end - ((end - g) & 31);
    if (wordsEnd > g) bits.fill(value ? 0xffffffff : 0, g >>> 5, wordsEnd >>> 5);
    for (g = Math.max(g, wordsEnd); g < end; g++) this.#setBit(bits, g, value);
  }

  #setBit(bits: Uint32Array, g: number, value: boolean): void {
    if (value) bits[g >>> 5] |= 1 << (g & 31);
    else bits[g >>> 5] &= ~(1 << (g & 31));
  }
}
