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
 * An answer is not trusted where a modification could have overtaken it:
 * the ranges of modifications in flight when the query was issued, or
 * issued before its answer came, are left unknown. A query that saw more
 * of them than it can hold is dropped, and queries are then spaced out so
 * a busy writer costs at most one extra round trip per `misses_per_retry`
 * reads.
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
/** Overtaking modifications one query remembers; past that its answer is dropped. */
export const overtaking_ranges_max = 256;

/** A block-status question the caller should ask the disk process. */
export interface ZeroQuery {
  offsetBytes: number;
  lengthBytes: number;
  /** The generation it was issued in: an answer from before a reset is dropped. */
  generation: number;
  /** The learning window it asks about (queries made by {@linkcode KnownZeros.missed}). */
  window?: number;
  /** Ranges (offset, length pairs) modifications may have changed under the answer. */
  overtaken: number[];
  /** More than `overtaking_ranges_max` of them: the answer is dropped. */
  overflow: boolean;
}

/** Known-zero granules of one disk, and when to learn more. */
export class KnownZeros {
  #sizeBytes = 0;
  #granuleBytes = granule_bytes_min;
  #bits: Uint32Array | undefined;
  /** Windows learned since the last reset. */
  #askedWindows = new Set<number>();
  /** Moves at every reset: an answer from an older generation is stale. */
  #generation = 0;
  /** Ranges of modifications issued and not yet answered; survive resets (they are replayed). */
  readonly #modifying = new Map<number, [offset: number, length: number]>();
  #nextModification = 0;
  readonly #queries = new Set<ZeroQuery>();
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
    const id = this.#nextModification++;
    this.#modifying.set(id, [offsetBytes, lengthBytes]);
    this.#forget(offsetBytes, lengthBytes);
    for (const query of this.#queries) overtake(query, offsetBytes, lengthBytes);
    return () => this.#modifying.delete(id);
  }

  /**
   * A read at `offsetBytes` missed: the block status worth asking now, or
   * undefined (one query at a time, none while a modification is in
   * flight, each window once).
   */
  missed(offsetBytes: number): ZeroQuery | undefined {
    if (this.#missesUntilQuery > 0) this.#missesUntilQuery--;
    if (this.#queries.size > 0 || this.#missesUntilQuery > 0) return undefined;
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
   * {@linkcode learn}. Undefined when too many modifications are in
   * flight for its answer to be of use.
   */
  asking(offsetBytes: number, lengthBytes: number): ZeroQuery | undefined {
    if (this.#modifying.size > overtaking_ranges_max) return undefined;
    const query: ZeroQuery = {
      offsetBytes,
      lengthBytes,
      generation: this.#generation,
      overtaken: [],
      overflow: false,
    };
    for (const [offset, length] of this.#modifying.values()) overtake(query, offset, length);
    this.#queries.add(query);
    return query;
  }

  /**
   * The answer to `query` arrived (`extents` undefined: it failed).
   * Learned except where a modification may have overtaken it.
   */
  learn(query: ZeroQuery, extents: Extent[] | undefined): void {
    this.#queries.delete(query);
    if (!extents || query.generation !== this.#generation || query.overflow) {
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
    const overtaken = query.overtaken;
    for (let i = 0; i < overtaken.length; i += 2) this.#forget(overtaken[i], overtaken[i + 1]);
    if (query.window !== undefined) this.#askedWindows.add(query.window);
  }

  /**
   * Everything forgotten (another disk process, maybe another image, is
   * behind the ring now); modifications in flight stay counted.
   */
  reset(sizeBytes: number): void {
    this.#generation++;
    this.#sizeBytes = sizeBytes;
    let granule = granule_bytes_min;
    while (Math.ceil(sizeBytes / granule) > known_zero_granules_max) granule *= 2;
    this.#granuleBytes = granule;
    this.#bits = undefined;
    this.#askedWindows.clear();
    this.#missesUntilQuery = 0;
  }

  // Granules touching the range are no longer known.
  #forget(offsetBytes: number, lengthBytes: number): void {
    if (!this.#bits || lengthBytes === 0) return;
    const first = Math.floor(offsetBytes / this.#granuleBytes);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / this.#granuleBytes);
    this.#setRange(first, last + 1, false);
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

function overtake(query: ZeroQuery, offsetBytes: number, lengthBytes: number): void {
  if (query.overtaken.length >= 2 * overtaking_ranges_max) query.overflow = true;
  else query.overtaken.push(offsetBytes, lengthBytes);
}
