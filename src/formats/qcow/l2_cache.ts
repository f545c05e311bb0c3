/**
 * qcow's L2 tables in memory, cached in a bounded `TableCache` (table_cache.ts)
 * keyed by L1 index (which overshoots its bound briefly when every table is
 * in use). Tables are written through: an
 * entry is set once the cluster it names may be referenced (its data
 * written, and durable where a crash could otherwise show wrong bytes),
 * then {@linkcode L2Table.writeOut} puts the changed blocks in the file
 * before the write that set it is answered (DESIGN.md §4). Tables with
 * unwritten changes, writes in flight or users are never evicted.
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import { GroupCommit } from "../group_commit.ts";
import { CachedTable, table_block_bytes } from "../table_cache.ts";

/** One L2 table: its on-disk bytes (big-endian u64 entries) and its write state. */
export class L2Table extends CachedTable {
  /** Blocks being written now. */
  readonly #writing = new Set<number>();
  /** Writes using the table now (it must stay cached). */
  pins = 0;
  /** A new table whose L1 entry (or first content) is not yet in the file. */
  unlinked = false;
  #writer?: GroupCommit;

  /** The L1 entry that points at this table. */
  get l1Index(): number {
    return this.key;
  }

  /** Marks every block dirty (a new table written whole). */
  markAllDirty(): void {
    for (let b = 0; b * table_block_bytes < this.bytes.byteLength; b += 1) this.dirtyBlocks.add(b);
  }

  /** Entry `index` was changed and its block is not yet (completely) in the file. */
  unsettled(index: number): boolean {
    const block = Math.floor((index * 8) / table_block_bytes);
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
        const start = b * table_block_bytes;
        const end = Math.min(start + table_block_bytes, this.bytes.byteLength);
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
  override get evictable(): boolean {
    return super.evictable && this.#writing.size === 0 && this.pins === 0 && !this.unlinked;
  }
}
