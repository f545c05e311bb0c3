/**
 * Metadata tables in memory (qcow's L2 tables, qcow2's L2 and refcount
 * block slices): a bounded LRU cache keyed by a number the format chooses,
 * with one load per key at a time and eviction of clean tables only.
 *
 * A table is changed in memory, its changed blocks remembered; the format
 * writes them through (qcow: before the write that changed them is
 * answered; qcow2: right after the change, behind a barrier). A table with
 * unwritten changes or writes in flight is never evicted, so a change can
 * never be lost by reloading a stale copy.
 * @module
 */

/** Bytes per write-back block of a table (the O_DIRECT unit). */
export const table_block_bytes = 4096;

/** One cached table: its on-disk bytes (big-endian u64 entries where used as such). */
export class CachedTable {
  /** The cache key (qcow: L1 index; qcow2: file block number). */
  readonly key: number;
  /** Where the table lives in the image file. */
  readonly offsetBytes: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;
  /** Indexes of blocks changed since they were last captured for writing. */
  readonly dirtyBlocks = new Set<number>();
  /** Set once dropped from the cache: holders must look the table up again. */
  evicted = false;
  /** Writes of this table in flight: it must not be evicted and reloaded meanwhile. */
  writesInFlight = 0;

  constructor(key: number, offsetBytes: number, bytes: Uint8Array) {
    this.key = key;
    this.offsetBytes = offsetBytes;
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  /** Number of u64 entries. */
  get entries(): number {
    return this.bytes.byteLength / 8;
  }

  /** High 32 bits of u64 entry `index`. */
  hi(index: number): number {
    return this.view.getUint32(index * 8);
  }

  /** Low 32 bits of u64 entry `index`. */
  lo(index: number): number {
    return this.view.getUint32(index * 8 + 4);
  }

  /** True when u64 entry `index` is 0. */
  isZero(index: number): boolean {
    return this.view.getUint32(index * 8) === 0 && this.view.getUint32(index * 8 + 4) === 0;
  }

  /** Sets u64 entry `index` from its halves; marks its block dirty. */
  setEntry(index: number, hi: number, lo: number): void {
    if (this.evicted) throw new Error("table changed after eviction");
    this.view.setUint32(index * 8, hi >>> 0);
    this.view.setUint32(index * 8 + 4, lo >>> 0);
    this.markDirty(index * 8);
  }

  /** Sets u64 entry `index` to a plain file offset (below 2^53). */
  set(index: number, offsetBytes: number): void {
    this.setEntry(index, Math.floor(offsetBytes / 2 ** 32), offsetBytes >>> 0);
  }

  /** Marks the block holding byte `byteOffset` dirty. */
  markDirty(byteOffset: number): void {
    this.dirtyBlocks.add(Math.floor(byteOffset / table_block_bytes));
  }

  get dirty(): boolean {
    return this.dirtyBlocks.size > 0;
  }

  /** May be dropped: nothing unwritten and no write of it in flight. */
  get evictable(): boolean {
    return this.dirtyBlocks.size === 0 && this.writesInFlight === 0;
  }
}

/**
 * The cache. `load` reads a table from the file; `makeClean`, if given, is
 * called when every cached table is pinned (dirty or being written) and
 * room is needed: it should write tables back, or wait for writes in
 * flight. Without it (or when tables stay pinned) the cache overshoots
 * its bound briefly.
 */
export class TableCache<T extends CachedTable = CachedTable> {
  readonly tablesMax: number;
  readonly #tables = new Map<number, T>();
  readonly #loading = new Map<number, Promise<T>>();
  readonly #load: (key: number) => Promise<T>;
  readonly #makeClean: (() => Promise<void>) | undefined;

  constructor(
    tablesMax: number,
    load: (key: number) => Promise<T>,
    makeClean?: () => Promise<void>,
  ) {
    this.tablesMax = Math.max(2, tablesMax);
    this.#load = load;
    this.#makeClean = makeClean;
  }

  get size(): number {
    return this.#tables.size;
  }

  /** The cached table for `key`, marked most recently used. */
  peek(key: number): T | undefined {
    const table = this.#tables.get(key);
    if (table) {
      this.#tables.delete(key);
      this.#tables.set(key, table);
    }
    return table;
  }

  /** The table for `key`, from the cache or loaded (one load per key at a time). */
  async get(key: number): Promise<T> {
    for (;;) {
      const cached = this.peek(key);
      if (cached) return cached;
      const pending = this.#loading.get(key);
      if (pending) {
        await pending;
        continue;
      }
      const loading = this.#loadAndInsert(key);
      this.#loading.set(key, loading);
      try {
        await loading;
      } finally {
        this.#loading.delete(key);
      }
    }
  }

  /**
   * Runs `change` on the live (not evicted) table for `key`. The liveness
   * check and the change happen in one synchronous step: between an `await`
   * returning a table and the code after it, other tasks may evict that
   * table, and a change to an evicted copy would be lost.
   */
  async update<R>(key: number, change: (table: T) => R): Promise<R> {
    for (;;) {
      const table = await this.get(key);
      if (!table.evicted) return change(table);
    }
  }

  async #loadAndInsert(key: number): Promise<T> {
    await this.#makeRoom();
    const table = await this.#load(key);
    await this.insert(table);
    return table;
  }

  /** Adds a table (new or loaded); evicts clean tables to stay within the bound. */
  async insert(table: T): Promise<void> {
    await this.#makeRoom();
    const old = this.#tables.get(table.key);
    if (old && old !== table) old.evicted = true;
    this.#tables.set(table.key, table);
  }

  /** Drops the table for `key` if it is cached and clean (its file block is about to change meaning). */
  forget(key: number): void {
    const table = this.#tables.get(key);
    if (table && table.evictable) {
      this.#tables.delete(key);
      table.evicted = true;
    }
  }

  async #makeRoom(): Promise<void> {
    for (let attempt = 0; this.#tables.size >= this.tablesMax; attempt += 1) {
      let victim: T | undefined;
      for (const table of this.#tables.values()) {
        if (table.evictable) {
          victim = table;
          break;
        }
      }
      if (victim) {
        this.#tables.delete(victim.key);
        victim.evicted = true;
        continue;
      }
      // Every table is pinned: let them be written (they stay cached, then clean).
      if (!this.#makeClean || attempt > 8) return; // pinned: allow a brief overshoot
      await this.#makeClean();
    }
  }
}
