/**
 * The refcounts of an open qcow2 image: the refcount table in memory and
 * refcount blocks in a bounded cache of slices (4 KiB, or a whole block
 * when clusters are smaller), written through {@linkcode MetadataWriter}.
 *
 * Invariant (crash safety): what memory holds may reach the file at any
 * moment. Increments are made before the data and L2 entries that need
 * them; decrements only after the L2 change that dropped the reference
 * is durable (the allocator defers them behind a barrier).
 * @module
 */
import { BlockError } from "../driver.ts";
import type { ImageFile } from "../image_file.ts";
import { table_block_bytes } from "../table_cache.ts";
import { decodeReftable } from "./entries.ts";
import type { Qcow2Geometry } from "./header.ts";
import type { MetadataWriter } from "./metadata_writer.ts";
import { observed } from "./observed.ts";
import { getRefcount, setRefcount } from "./refcount_width.ts";
import { SliceCache } from "./slice_cache.ts";

/** The refcount structures of one image. */
export class RefcountStore {
  readonly g: Qcow2Geometry;
  readonly #file: ImageFile;
  readonly #writer: MetadataWriter;
  readonly #slices: SliceCache;
  readonly sliceBytes: number;
  readonly entriesPerSlice: number;
  tableOffsetBytes: number;
  tableClusters: number;
  #table: Uint8Array;
  #tableView: DataView;

  constructor(
    file: ImageFile,
    g: Qcow2Geometry,
    writer: MetadataWriter,
    table: { offsetBytes: number; clusters: number; bytes: Uint8Array },
    cacheBytesMax: number,
  ) {
    this.#file = file;
    this.g = g;
    this.#writer = writer;
    this.#slices = new SliceCache(file, writer, g.clusterBytes, cacheBytesMax);
    this.sliceBytes = this.#slices.sliceBytes;
    this.entriesPerSlice = (this.sliceBytes * 8) / g.refcountBits;
    this.tableOffsetBytes = table.offsetBytes;
    this.tableClusters = table.clusters;
    this.#table = table.bytes;
    this.#tableView = new DataView(table.bytes.buffer, table.bytes.byteOffset);
  }

  /** Metadata writes are deferred (an unordered open). */
  get deferred(): boolean {
    return this.#writer.deferred;
  }

  /** Bytes of refcount slices cached now. */
  get cachedBytes(): number {
    return this.#slices.cachedBytes;
  }

  /** Entries of the refcount table. */
  get tableEntries(): number {
    return this.#table.byteLength / 8;
  }

  /** The refcount table as stored (for growth and checks). */
  get tableBytes(): Uint8Array {
    return this.#table;
  }

  /** Offset of refcount block `index`, 0 when it has none; throws on a corrupt entry. */
  blockOffset(index: number): number {
    if (index >= this.tableEntries) return 0;
    const e = decodeReftable(
      this.#tableView.getUint32(index * 8),
      this.#tableView.getUint32(index * 8 + 4),
    );
    if (e.offsetBytes === 0) return 0;
    if (
      e.reserved || e.offsetBytes % this.g.clusterBytes !== 0 || !Number.isFinite(e.offsetBytes)
    ) {
      throw new BlockError(
        "EIO",
        `${this.#file.path}: refcount table entry ${index} is corrupt (offset ${e.offsetBytes})`,
      );
    }
    return e.offsetBytes;
  }

  /** Where cluster `cluster`'s refcount lives: slice key and index, or undefined (no block). */
  #locate(cluster: number): { key: number; index: number } | undefined {
    const block = Math.floor(cluster / this.g.refblockEntries);
    const offset = this.blockOffset(block);
    if (offset === 0) return undefined;
    const within = cluster % this.g.refblockEntries;
    const slice = Math.floor(within / this.entriesPerSlice);
    return { key: offset / this.sliceBytes + slice, index: within % this.entriesPerSlice };
  }

  /** True when cluster `cluster` has a refcount block. */
  covered(cluster: number): boolean {
    return this.#locate(cluster) !== undefined;
  }

  /** The refcount of cluster `cluster` (0 without a refcount block). */
  async get(cluster: number): Promise<number> {
    const at = this.#locate(cluster);
    if (!at) return 0;
    const slice = await this.#slices.cache.get(at.key);
    return getRefcount(slice.view, at.index, this.g.refcountOrder);
  }

  /**
   * Calls `visit` for every cluster of the slice holding `cluster` with its
   * refcount, synchronously once the slice is loaded. Nothing without a block.
   */
  async visitSlice(cluster: number, visit: (cluster: number, refcount: number) => void) {
    const at = this.#locate(cluster);
    if (!at) return;
    const slice = await this.#slices.cache.get(at.key);
    const first = cluster - at.index;
    for (let i = 0; i < this.entriesPerSlice; i += 1) {
      visit(first + i, getRefcount(slice.view, i, this.g.refcountOrder));
    }
  }

  /**
   * Changes the refcounts of clusters `[first, first + count)` (which must
   * lie in one refcount block that exists): `change(old, cluster)` returns
   * the new value, or undefined to leave it. Changes are made in memory at
   * once; `written` resolves when they are in the file.
   */
  async change(
    first: number,
    count: number,
    change: (old: number, cluster: number) => number | undefined,
  ): Promise<{ written: Promise<void> }> {
    const writes: Promise<void>[] = [];
    for (let c = first; c < first + count;) {
      const at = this.#locate(c);
      if (!at) throw new Error(`refcount block missing for cluster ${c}`);
      const n = Math.min(first + count - c, this.entriesPerSlice - at.index);
      const start = c;
      // Wrapped: a promise returned from the callback would be awaited here.
      const { write } = await this.#slices.cache.update(at.key, (slice) => {
        let changed = false;
        for (let i = 0; i < n; i += 1) {
          const old = getRefcount(slice.view, at.index + i, this.g.refcountOrder);
          const value = change(old, start + i);
          if (value === undefined || value === old) continue;
          if (value < 0 || value > this.g.refcountMax) {
            throw new BlockError(
              "EIO",
              `${this.#file.path}: refcount of cluster ${start + i} would become ${value}`,
            );
          }
          setRefcount(slice.view, at.index + i, this.g.refcountOrder, value);
          changed = true;
        }
        return { write: changed ? this.#slices.persist(slice) : undefined };
      });
      if (write) writes.push(write);
      c += n;
    }
    return { written: observed(Promise.all(writes).then(() => {})) };
  }

  /** Points refcount table entry `index` at `offsetBytes` and writes that entry's block. */
  setTableEntry(index: number, offsetBytes: number): Promise<void> {
    this.#tableView.setUint32(index * 8, Math.floor(offsetBytes / 2 ** 32));
    this.#tableView.setUint32(index * 8 + 4, offsetBytes >>> 0);
    const block = Math.min(this.g.clusterBytes, table_block_bytes);
    const start = Math.floor((index * 8) / block) * block;
    const end = Math.min(start + block, this.#table.byteLength);
    const table = this.#table; // a deferred capture must not see a table that replaced it
    return observed(
      this.#writer.persist(this.tableOffsetBytes + start, () => table.slice(start, end)),
    );
  }

  /**
   * Writes deferred metadata first when any lies in clusters
   * `[first, first + count)` (before they are freed: a late write-back
   * would land on whatever reuses them). Nothing to do when not deferred.
   */
  async settleClusters(first: number, count: number): Promise<void> {
    const c = this.g.clusterBytes;
    if (this.#writer.pendingWithin(first * c, (first + count) * c)) await this.#writer.writeBack();
  }

  /** Switches to a new refcount table (already written and made durable by the caller). */
  replaceTable(offsetBytes: number, clusters: number, bytes: Uint8Array): void {
    this.tableOffsetBytes = offsetBytes;
    this.tableClusters = clusters;
    this.#table = bytes;
    this.#tableView = new DataView(bytes.buffer, bytes.byteOffset);
  }

  /** Drops cached slices of a cluster about to become a refcount block. */
  forgetCluster(offsetBytes: number): void {
    for (let s = 0; s < this.g.clusterBytes / this.sliceBytes; s += 1) {
      this.#slices.cache.forget(offsetBytes / this.sliceBytes + s);
    }
  }
}
