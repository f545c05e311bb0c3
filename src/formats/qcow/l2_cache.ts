/**
 * L2 tables in memory: a bounded LRU cache with write-back. A table is
 * changed in memory when a cluster is published (after its data was
 * written); the change reaches the file only at the next commit, after an
 * fdatasync made the data durable (DESIGN.md §4: data before L2 before L1).
 * @module
 */

/** Bytes per write-back block of a table (the O_DIRECT unit). */
export const l2_block_bytes = 4096;

/** One L2 table: its on-disk bytes (big-endian u64 entries) and dirty blocks. */
export class L2Table {
  readonly l1Index: number;
  readonly offsetBytes: number;
  readonly bytes: Uint8Array;
  readonly #view: DataView;
  /** Indexes of blocks changed since they were last snapshotted for writing. */
  readonly dirtyBlocks = new Set<number>();
  /** Set once dropped from the cache: holders must look the table up again. */
  evicted = false;
  /** Snapshots of this table being written: it must not be evicted and reloaded meanwhile. */
  writesInFlight = 0;

  constructor(l1Index: number, offsetBytes: number, bytes: Uint8Array) {
    this.l1Index = l1Index;
    this.offsetBytes = offsetBytes;
    this.bytes = bytes;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get entries(): number {
    return this.bytes.byteLength / 8;
  }

  hi(index: number): number {
    return this.#view.getUint32(index * 8);
  }

  lo(index: number): number {
    return this.#view.getUint32(index * 8 + 4);
  }

  /** True when entry `index` is 0 (unallocated). */
  isZero(index: number): boolean {
    return this.#view.getUint32(index * 8) === 0 && this.#view.getUint32(index * 8 + 4) === 0;
  }

  /** Publishes a plain cluster at `offsetBytes`; marks its block dirty. */
  set(index: number, offsetBytes: number): void {
    if (this.evicted) throw new Error("L2 table changed after eviction");
    this.#view.setUint32(index * 8, Math.floor(offsetBytes / 2 ** 32));
    this.#view.setUint32(index * 8 + 4, offsetBytes >>> 0);
    this.dirtyBlocks.add(Math.floor((index * 8) / l2_block_bytes));
  }

  get dirty(): boolean {
    return this.dirtyBlocks.size > 0;
  }

  /** May be dropped: nothing unwritten and no write of it in flight. */
  get evictable(): boolean {
    return this.dirtyBlocks.size === 0 && this.writesInFlight === 0;
  }
}

/** A block of a table captured for writing. */
export interface BlockSnapshot {
  table: L2Table;
  block: number;
  fileOffsetBytes: number;
  bytes: Uint8Array;
}

/**
 * The cache. `load` reads a table from the file; `makeClean` writes every
 * dirty table back (a metadata commit) when the cache is full of dirty ones.
 */
export class L2Cache {
  readonly tablesMax: number;
  readonly #tables = new Map<number, L2Table>();
  readonly #loading = new Map<number, Promise<L2Table>>();
  readonly #load: (l1Index: number) => Promise<L2Table>;
  readonly #makeClean: () => Promise<void>;

  constructor(
    tablesMax: number,
    load: (l1Index: number) => Promise<L2Table>,
    makeClean: () => Promise<void>,
  ) {
    this.tablesMax = Math.max(2, tablesMax);
    this.#load = load;
    this.#makeClean = makeClean;
  }

  get size(): number {
    return this.#tables.size;
  }

  /** The cached table for `l1Index`, marked most recently used. */
  peek(l1Index: number): L2Table | undefined {
    const table = this.#tables.get(l1Index);
    if (table) {
      this.#tables.delete(l1Index);
      this.#tables.set(l1Index, table);
    }
    return table;
  }

  /** The table for `l1Index`, from the cache or loaded (one load per table at a time). */
  async get(l1Index: number): Promise<L2Table> {
    for (;;) {
      const cached = this.peek(l1Index);
      if (cached) return cached;
      const pending = this.#loading.get(l1Index);
      if (pending) {
        await pending;
        continue;
      }
      const loading = this.#loadAndInsert(l1Index);
      this.#loading.set(l1Index, loading);
      try {
        await loading;
      } finally {
        this.#loading.delete(l1Index);
      }
    }
  }

  async #loadAndInsert(l1Index: number): Promise<L2Table> {
    await this.#makeRoom();
    const table = await this.#load(l1Index);
    await this.insert(table);
    return table;
  }

  /** Adds a table (new or loaded); evicts clean tables to stay within the bound. */
  async insert(table: L2Table): Promise<void> {
    await this.#makeRoom();
    this.#tables.set(table.l1Index, table);
  }

  async #makeRoom(): Promise<void> {
    for (let attempt = 0; this.#tables.size >= this.tablesMax; attempt += 1) {
      let victim: L2Table | undefined;
      for (const table of this.#tables.values()) {
        if (table.evictable) {
          victim = table;
          break;
        }
      }
      if (victim) {
        this.#tables.delete(victim.l1Index);
        victim.evicted = true;
        continue;
      }
      // Every table is dirty: commit them (they stay cached, now clean).
      if (attempt > 8) return; // tables keep being dirtied: allow a brief overshoot
      await this.#makeClean();
    }
  }

  /** Captures every dirty block for writing and marks it clean. */
  snapshotDirty(): BlockSnapshot[] {
    const snapshots: BlockSnapshot[] = [];
    for (const table of this.#tables.values()) {
      for (const block of table.dirtyBlocks) {
        const start = block * l2_block_bytes;
        const end = Math.min(start + l2_block_bytes, table.bytes.byteLength);
        snapshots.push({
          table,
          block,
          fileOffsetBytes: table.offsetBytes + start,
          bytes: table.bytes.slice(start, end),
        });
      }
      table.writesInFlight += table.dirtyBlocks.size;
      table.dirtyBlocks.clear();
    }
    return snapshots;
  }

  /** Ends the writes of `snapshots`; failed ones are marked dirty again. */
  settle(snapshots: BlockSnapshot[], failed: boolean): void {
    for (const s of snapshots) {
      s.table.writesInFlight -= 1;
      if (failed) s.table.dirtyBlocks.add(s.block);
    }
  }
}
