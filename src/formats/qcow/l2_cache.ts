/**
 * L2 tables in memory: a bounded LRU cache. Tables are written through: an
 * entry is set once the cluster it names may be referenced (its data
 * written, and durable where a crash could otherwise show wrong bytes),
 * then {@linkcode L2Table.writeOut} puts the changed blocks in the file
 * before the write that set it is answered (DESIGN.md §4). Tables with
 * unwritten changes, writes in flight or users are never evicted.
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import { GroupCommit } from "../group_commit.ts";

/** Bytes per write-back block of a table (the O_DIRECT unit). */
export const l2_block_bytes = 4096;

/** One L2 table: its on-disk bytes (big-endian u64 entries) and its write state. */
export class L2Table {
  readonly l1Index: number;
  readonly offsetBytes: number;
  readonly bytes: Uint8Array;
  readonly #view: DataView;
  /** Blocks changed since they were last captured for writing. */
  readonly dirtyBlocks = new Set<number>();
  /** Blocks being written now. */
  readonly #writing = new Set<number>();
  /** Set once dropped from the cache: holders must look the table up again. */
  evicted = false;
  /** Writes using the table now (it must stay cached). */
  pins = 0;
  /** A new table whose L1 entry (or first content) is not yet in the file. */
  unlinked = false;
  #writer?: GroupCommit;

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

  /** Marks every block dirty (a new table written whole). */
  markAllDirty(): void {
    for (let b = 0; b * l2_block_bytes < this.bytes.byteLength; b += 1) this.dirtyBlocks.add(b);
  }

  /** Entry `index` was changed and its block is not yet (completely) in the file. */
  unsettled(index: number): boolean {
    const block = Math.floor((index * 8) / l2_block_bytes);
    return this.dirtyBlocks.has(block) || this.#writing.has(block);
  }

  /** Writes the changed blocks; resolves once a write started after this call completed. */
  writeOut(file: ImageFile): Promise<void> {
    this.#writer ??= new GroupCommit(() => this.#writeDirty(file));
    return this.#writer.run();
  }

  async #writeDirty(file: ImageFile): Promise<void> {
    const blocks = [...this.dirtyBlocks];
    this.dirtyBlocks.clear();
    for (const b of blocks) this.#writing.add(b);
    try {
      await Promise.all(blocks.map((b) => {
        const start = b * l2_block_bytes;
        const end = Math.min(start + l2_block_bytes, this.bytes.byteLength);
        return file.write(this.offsetBytes + start, this.bytes.slice(start, end));
      }));
    } catch (error) {
      for (const b of blocks) this.dirtyBlocks.add(b);
      throw error;
    } finally {
      for (const b of blocks) this.#writing.delete(b);
    }
  }

  /** May be dropped: nothing unwritten, nothing in flight, nobody using it. */
  get evictable(): boolean {
    return this.dirtyBlocks.size === 0 && this.#writing.size === 0 && this.pins === 0 &&
      !this.unlinked;
  }
}

/** The cache. `load` reads a table from the file. */
export class L2Cache {
  readonly tablesMax: number;
  readonly #tables = new Map<number, L2Table>();
  readonly #loading = new Map<number, Promise<L2Table>>();
  readonly #load: (l1Index: number) => Promise<L2Table>;

  constructor(tablesMax: number, load: (l1Index: number) => Promise<L2Table>) {
    this.tablesMax = Math.max(2, tablesMax);
    this.#load = load;
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
    const table = await this.#load(l1Index);
    this.insert(table);
    return table;
  }

  /** Adds a table (new or loaded); evicts unused tables to stay within the bound. */
  insert(table: L2Table): void {
    this.#makeRoom();
    this.#tables.set(table.l1Index, table);
  }

  #makeRoom(): void {
    if (this.#tables.size < this.tablesMax) return;
    for (const table of this.#tables.values()) {
      if (this.#tables.size < this.tablesMax) return;
      if (!table.evictable) continue;
      this.#tables.delete(table.l1Index);
      table.evicted = true;
    }
    // Every table is in use: a brief overshoot, bounded by the writes in flight.
  }
}
