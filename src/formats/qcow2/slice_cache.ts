/**
 * Cached slices of qcow2 metadata tables (L2 tables, refcount blocks): a
 * bounded {@linkcode TableCache} of blocks of the image file, keyed by
 * their block number, loaded on demand and written through a
 * {@linkcode MetadataWriter} (a slice is pinned while its write is in
 * flight, so it is never evicted and reloaded stale).
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import { CachedTable, TableCache } from "../table_cache.ts";
import type { MetadataWriter } from "./metadata_writer.ts";
import { observed } from "./observed.ts";

/** Bytes of one slice at most (the O_DIRECT unit); a cluster when clusters are smaller. */
export const slice_bytes_max = 4096;

/** Slices of `sliceBytes` at file offsets that are multiples of it. */
export class SliceCache {
  readonly sliceBytes: number;
  readonly #file: ImageFile;
  readonly #writer: MetadataWriter;
  readonly cache: TableCache;
  /** Slices changed and waiting for a deferred write-back (pinned: dirty). */
  readonly #deferred = new Set<CachedTable>();

  constructor(
    file: ImageFile,
    writer: MetadataWriter,
    clusterBytes: number,
    cacheBytesMax: number,
  ) {
    this.#file = file;
    this.#writer = writer;
    this.sliceBytes = Math.min(clusterBytes, slice_bytes_max);
    this.cache = new TableCache(
      Math.floor(cacheBytesMax / this.sliceBytes),
      (key) => this.#load(key),
      // Full of pinned slices: write them (deferred: the whole backlog, sorted).
      () => this.#writer.idle(),
    );
  }

  /** Bytes of slices cached now. */
  get cachedBytes(): number {
    return this.cache.size * this.sliceBytes;
  }

  /** The key of the slice holding file byte `offsetBytes`. */
  keyOf(offsetBytes: number): number {
    return Math.floor(offsetBytes / this.sliceBytes);
  }

  async #load(key: number): Promise<CachedTable> {
    const bytes = new Uint8Array(this.sliceBytes);
    await this.#file.read(key * this.sliceBytes, bytes);
    return new CachedTable(key, key * this.sliceBytes, bytes);
  }

  /**
   * Writes `slice` whole (an aligned block: no read-modify-write under
   * O_DIRECT; unchanged sectors rewritten with the same bytes are harmless
   * if torn); pins it until the write completes. Deferred (unordered
   * opens): resolves at once; the slice stays dirty, so pinned, until a
   * write-back captures it, and pinned until that write ends.
   */
  persist(slice: CachedTable): Promise<void> {
    if (this.#writer.deferred) {
      // Dirty, so pinned in the cache, until the write-back captures it
      // (refcount changes write the view directly: mark it here).
      slice.markDirty(0);
      this.#deferred.add(slice);
      const deferred = this.#writer.persist(slice.offsetBytes, () => {
        this.#deferred.delete(slice);
        slice.dirtyBlocks.clear();
        slice.writesInFlight += 1;
        return slice.bytes.slice();
      }, () => {
        slice.writesInFlight -= 1;
      });
      // At most half the cache pinned dirty: the rest keeps serving loads
      // (a cache full of pinned slices makes concurrent loads evict each other).
      if (this.#deferred.size < this.cache.tablesMax / 2) return deferred;
      return this.#writer.writeBack();
    }
    slice.dirtyBlocks.clear(); // written through, not at a commit
    slice.writesInFlight += 1;
    return observed(
      this.#writer.persist(slice.offsetBytes, () => slice.bytes.slice()).finally(() => {
        slice.writesInFlight -= 1;
      }),
    );
  }
}
