/**
 * The guest-to-host mapping of an open qcow2 image: the active L1 table in
 * memory (QEMU's limit is 32 MiB) and L2 tables in a bounded cache of 4 KiB
 * slices (a whole table when clusters are smaller), as QEMU's
 * `l2-cache-entry-size`: memory is bounded by configuration, not by the
 * image, and a cache miss reads one slice, not a 2 MiB table.
 *
 * Changes are made in memory only when they may reach the file at any
 * moment (the data and refcounts they need are durable), then written
 * through {@linkcode MetadataWriter}.
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import { CachedTable, table_block_bytes } from "../table_cache.ts";
import { decodeL1, decodeL2, HI_COPIED, type L1Entry, type L2Entry } from "./entries.ts";
import type { Qcow2Geometry } from "./header.ts";
import type { MetadataWriter } from "./metadata_writer.ts";
import { observed } from "./observed.ts";
import { SliceCache } from "./slice_cache.ts";

/** L1 in memory, L2 slices cached. */
export class MappingTables {
  readonly g: Qcow2Geometry;
  readonly sliceBytes: number;
  readonly entriesPerSlice: number;
  readonly l1Offset: number;
  readonly l1Size: number;
  readonly #l1: Uint8Array;
  readonly #l1View: DataView;
  readonly #writer: MetadataWriter;
  readonly #slices: SliceCache;

  constructor(
    file: ImageFile,
    g: Qcow2Geometry,
    writer: MetadataWriter,
    l1: { offsetBytes: number; size: number; bytes: Uint8Array },
    cacheBytesMax: number,
  ) {
    this.g = g;
    this.#writer = writer;
    this.#slices = new SliceCache(file, writer, g.clusterBytes, cacheBytesMax);
    this.sliceBytes = this.#slices.sliceBytes;
    this.entriesPerSlice = this.sliceBytes / 8;
    this.l1Offset = l1.offsetBytes;
    this.l1Size = l1.size;
    this.#l1 = l1.bytes;
    this.#l1View = new DataView(l1.bytes.buffer, l1.bytes.byteOffset, l1.bytes.byteLength);
  }

  /** Metadata writes are deferred (an unordered open). */
  get deferred(): boolean {
    return this.#writer.deferred;
  }

  /** Bytes of L2 slices cached now. */
  get cachedBytes(): number {
    return this.#slices.cachedBytes;
  }

  l1Entry(index: number): L1Entry {
    if (index >= this.l1Size) {
      return { offsetBytes: 0, copied: false, reserved: false, offsetLow: 0 };
    }
    return decodeL1(this.#l1View.getUint32(index * 8), this.#l1View.getUint32(index * 8 + 4));
  }

  /** Keys of the slices holding entries `[first, first + count)` of the table at `tableOffset`. */
  #sliceKeys(tableOffset: number, first: number, count: number): number[] {
    const keys: number[] = [];
    const base = tableOffset / this.sliceBytes;
    const last = Math.floor((first + count - 1) / this.entriesPerSlice);
    for (let s = Math.floor(first / this.entriesPerSlice); s <= last; s += 1) keys.push(base + s);
    return keys;
  }

  /** Decodes entries `[first, first + count)` from their slices (`slices[0]` holds `first`). */
  #decode(first: number, count: number, slices: CachedTable[]): L2Entry[] {
    const out: L2Entry[] = new Array(count);
    const firstSlice = Math.floor(first / this.entriesPerSlice);
    for (let i = 0; i < count; i += 1) {
      const index = first + i;
      const slice = slices[Math.floor(index / this.entriesPerSlice) - firstSlice];
      const within = index % this.entriesPerSlice;
      out[i] = decodeL2(slice.hi(within), slice.lo(within), this.g.clusterBits);
    }
    return out;
  }

  /**
   * Entries `[first, first + count)` of the L2 table at `tableOffset` when
   * their slices are cached (the hot path, without an await); else undefined.
   */
  cachedEntries(tableOffset: number, first: number, count: number): L2Entry[] | undefined {
    const slices: CachedTable[] = [];
    for (const key of this.#sliceKeys(tableOffset, first, count)) {
      const slice = this.#slices.cache.peek(key);
      if (!slice) return undefined;
      slices.push(slice);
    }
    return this.#decode(first, count, slices);
  }

  /** Entries `[first, first + count)` of the L2 table at `tableOffset` (one table). */
  async entries(tableOffset: number, first: number, count: number): Promise<L2Entry[]> {
    const cached = this.cachedEntries(tableOffset, first, count);
    if (cached) return cached;
    const slices: CachedTable[] = [];
    for (const key of this.#sliceKeys(tableOffset, first, count)) {
      slices.push(await this.#slices.cache.get(key));
    }
    return this.#decode(first, count, slices);
  }

  /**
   * Sets entries of the L2 table at `tableOffset` (`values[k]` is entry
   * `first + k` as `[hi, lo]`) and writes the changed slices. Resolves
   * when they are in the file.
   */
  async setEntries(tableOffset: number, first: number, values: [number, number][]): Promise<void> {
    const writes: Promise<void>[] = [];
    for (let i = 0; i < values.length;) {
      const index = first + i;
      const key = tableOffset / this.sliceBytes + Math.floor(index / this.entriesPerSlice);
      const within = index % this.entriesPerSlice;
      const n = Math.min(values.length - i, this.entriesPerSlice - within);
      const from = i;
      // Wrapped: a promise returned from the callback would be awaited here.
      const { written } = await this.#slices.cache.update(key, (slice) => {
        for (let k = 0; k < n; k += 1) {
          slice.setEntry(within + k, values[from + k][0], values[from + k][1]);
        }
        return { written: this.#slices.persist(slice) };
      });
      writes.push(written);
      i += n;
    }
    await Promise.all(writes);
  }

  /**
   * Puts the slices of a table about to be written at `tableOffset` in the
   * cache (zeros or a copy), pinned until `written` settles, so nothing
   * reads the cluster's old bytes as this table meanwhile.
   */
  async installTable(tableOffset: number, content: Uint8Array, written: Promise<void>) {
    const slices: CachedTable[] = [];
    for (let s = 0; s * this.sliceBytes < content.byteLength; s += 1) {
      const bytes = content.slice(s * this.sliceBytes, (s + 1) * this.sliceBytes);
      const key = tableOffset / this.sliceBytes + s;
      const slice = new CachedTable(key, tableOffset + s * this.sliceBytes, bytes);
      slice.writesInFlight += 1;
      slices.push(slice);
      await this.#slices.cache.insert(slice);
    }
    written.catch(() => {}).finally(() => {
      for (const slice of slices) slice.writesInFlight -= 1;
    });
  }

  /** Writes deferred changes of the table at `tableOffset` first, so the file holds it whole (before it is read raw). */
  async settleTable(tableOffset: number): Promise<void> {
    if (this.#writer.pendingWithin(tableOffset, tableOffset + this.g.clusterBytes)) {
      await this.#writer.writeBack();
    }
  }

  /** Points L1 entry `index` at the table at `tableOffset` (refcount 1) and writes its block. */
  setL1(index: number, tableOffset: number): Promise<void> {
    this.#l1View.setUint32(index * 8, (Math.floor(tableOffset / 2 ** 32) | HI_COPIED) >>> 0);
    this.#l1View.setUint32(index * 8 + 4, tableOffset >>> 0);
    const block = Math.min(this.g.clusterBytes, table_block_bytes);
    const start = Math.floor((index * 8) / block) * block;
    const end = Math.min(start + block, this.#l1.byteLength);
    return observed(
      this.#writer.persist(this.l1Offset + start, () => this.#l1.slice(start, end)),
    );
  }
}
