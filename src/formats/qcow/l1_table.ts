/**
 * The L1 table of a qcow image: u64 L2-table offsets (0 = none), big-endian
 * as QEMU writes them, or little-endian in images the 2006 tapdisk left.
 *
 * A table of up to `l1_cache_bytes_max` is read whole at open. A larger one
 * (a 16 TiB image has 64 MiB of L1) is paged in 4 KiB blocks kept in a
 * bounded LRU cache, so memory follows the cache, not the virtual size.
 *
 * Changes are written through: {@linkcode L1Table.set} resolves once the
 * block holding the entry is in the file (a group commit per block, so
 * entries set together share one write). The caller sets an entry only
 * once what it points at may be referenced (DESIGN.md §4).
 * @module
 */
import { Md5 } from "./md5.ts";
import type { ImageFile } from "../image_file.ts";
import { GroupCommit } from "../group_commit.ts";
import { checksumOfDigest } from "./header.ts";
import { isZeroBytes } from "../zero_bytes.ts";

/** Bytes of one cached block of the table (512 entries). */
export const l1_block_bytes = 4096;
/** A table up to this size is read whole at open; larger ones are paged. */
export const l1_cache_bytes_max = 4 << 20;
/** Bytes read at once when the whole table is scanned (checksum, check). */
const l1_scan_chunk_bytes = 1 << 20;

interface Block {
  bytes: Uint8Array;
  view: DataView;
  /** Entries changed since the block was last captured for writing. */
  dirty: boolean;
  /** Writes of the block in flight (it must not be evicted meanwhile). */
  writing: number;
  writer?: GroupCommit;
}

/** Decodes one entry; offsets beyond 2^53 come back as `Infinity` (outside any file). */
function decode(view: DataView, at: number, bigEndian: boolean): number {
  const hi = view.getUint32(at + (bigEndian ? 0 : 4), !bigEndian);
  const lo = view.getUint32(at + (bigEndian ? 4 : 0), !bigEndian);
  return hi >= 0x200000 ? Infinity : hi * 2 ** 32 + lo;
}

/** The L1 table of an open image file. */
export class L1Table {
  readonly entries: number;
  readonly offsetBytes: number;
  readonly bigEndian: boolean;
  readonly #file: ImageFile;
  readonly #blocks = new Map<number, Block>();
  readonly #loading = new Map<number, Promise<Block>>();
  readonly #blocksMax: number;
  readonly #whole: boolean;

  private constructor(file: ImageFile, offsetBytes: number, entries: number, bigEndian: boolean) {
    this.#file = file;
    this.offsetBytes = offsetBytes;
    this.entries = entries;
    this.bigEndian = bigEndian;
    this.#whole = entries * 8 <= l1_cache_bytes_max;
    this.#blocksMax = Math.max(2, Math.floor(l1_cache_bytes_max / l1_block_bytes));
  }

  /** Opens the table at `offsetBytes`; small tables are read whole now. */
  static async open(
    file: ImageFile,
    offsetBytes: number,
    entries: number,
    bigEndian: boolean,
  ): Promise<L1Table> {
    const table = new L1Table(file, offsetBytes, entries, bigEndian);
    if (table.#whole) {
      const bytes = new Uint8Array(entries * 8);
      await file.read(offsetBytes, bytes);
      for (let b = 0; b * l1_block_bytes < bytes.byteLength; b += 1) {
        const start = b * l1_block_bytes;
        const slice = bytes.slice(start, Math.min(start + l1_block_bytes, bytes.byteLength));
        table.#blocks.set(b, _block(slice));
      }
    }
    return table;
  }

  /** True when every entry is in memory (tables up to `l1_cache_bytes_max`). */
  get whole(): boolean {
    return this.#whole;
  }

  #blockBytes(b: number): number {
    return Math.min(l1_block_bytes, this.entries * 8 - b * l1_block_bytes);
  }

  #cached(b: number): Block | undefined {
    const block = this.#blocks.get(b);
    if (block && !this.#whole) {
      this.#blocks.delete(b); // most recently used goes last
      this.#blocks.set(b, block);
    }
    return block;
  }

  async #block(b: number): Promise<Block> {
    for (;;) {
      const cached = this.#cached(b);
      if (cached) return cached;
      let loading = this.#loading.get(b);
      if (!loading) {
        loading = this.#load(b).finally(() => this.#loading.delete(b));
        this.#loading.set(b, loading);
      }
      await loading;
    }
  }

  async #load(b: number): Promise<Block> {
    const bytes = new Uint8Array(this.#blockBytes(b));
    await this.#file.read(this.offsetBytes + b * l1_block_bytes, bytes);
    const block = _block(bytes);
    this.#evict();
    this.#blocks.set(b, block);
    return block;
  }

  #evict(): void {
    for (const [b, block] of this.#blocks) {
      if (this.#blocks.size < this.#blocksMax) return;
      if (!block.dirty && block.writing === 0) this.#blocks.delete(b);
    }
  }

  /** The L2 table offset of entry `index` (0: none). */
  get(index: number): number | Promise<number> {
    const b = Math.floor((index * 8) / l1_block_bytes);
    const at = (index * 8) % l1_block_bytes;
    const block = this.#cached(b);
    if (block) return decode(block.view, at, this.bigEndian);
    return this.#block(b).then((loaded) => decode(loaded.view, at, this.bigEndian));
  }

  /**
   * Sets entry `index` in memory (lookups see it at once); the file gets it
   * with the next {@linkcode L1Table.writeOut} of its block. A staged
   * entry may travel with any write of its block: stage an entry only once
   * what it points at may be referenced.
   */
  async stage(index: number, value: number): Promise<void> {
    const b = Math.floor((index * 8) / l1_block_bytes);
    const at = (index * 8) % l1_block_bytes;
    const block = await this.#block(b);
    const hi = Math.floor(value / 2 ** 32);
    block.view.setUint32(at + (this.bigEndian ? 0 : 4), hi, !this.bigEndian);
    block.view.setUint32(at + (this.bigEndian ? 4 : 0), value >>> 0, !this.bigEndian);
    block.dirty = true;
  }

  /** Resolves once a write of entry `index`'s block that started after this call completed. */
  writeOut(index: number): Promise<void> {
    const b = Math.floor((index * 8) / l1_block_bytes);
    const block = this.#blocks.get(b);
    if (!block) return Promise.resolve(); // never staged: nothing to write
    block.writer ??= new GroupCommit(() => this.#writeBlock(b, block));
    return block.writer.run();
  }

  /** {@linkcode L1Table.stage} then {@linkcode L1Table.writeOut}. */
  async set(index: number, value: number): Promise<void> {
    await this.stage(index, value);
    await this.writeOut(index);
  }

  async #writeBlock(b: number, block: Block): Promise<void> {
    if (!block.dirty) return;
    block.dirty = false;
    block.writing += 1;
    try {
      await this.#file.write(this.offsetBytes + b * l1_block_bytes, block.bytes.slice());
    } catch (error) {
      block.dirty = true;
      throw error;
    } finally {
      block.writing -= 1;
    }
  }

  /**
   * Calls `visit` for every allocated entry in index order, reading the
   * table in chunks (cached blocks are newer than the file and win). Holes
   * of the file and all-zero blocks are skipped unread or undecoded, so a
   * mostly empty table of a huge image scans quickly.
   */
  async scan(visit: (index: number, offsetBytes: number) => void | Promise<void>): Promise<void> {
    await this.#chunks(async (firstIndex, view) => {
      const bytes = new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
      for (let at = 0; at < bytes.byteLength; at += l1_block_bytes) {
        const block = bytes.subarray(at, Math.min(at + l1_block_bytes, bytes.byteLength));
        if (isZeroBytes(block)) continue;
        for (let i = at / 8; i < (at + block.byteLength) / 8; i += 1) {
          const value = decode(view, i * 8, this.bigEndian);
          if (value !== 0) await visit(firstIndex + i, value);
        }
      }
    }, true);
  }

  /** blktap's Xen checksum of the table as stored (see `l1Checksum`). */
  async checksum(): Promise<number> {
    const md5 = new Md5();
    await this.#chunks((_, view) => {
      md5.update(new Uint8Array(view.buffer, view.byteOffset, view.byteLength));
    });
    return checksumOfDigest(md5.digest());
  }

  // The table in order, as views of at most l1_scan_chunk_bytes; with
  // `skipHoles`, chunks the file stores as holes (all zeros) are left out.
  async #chunks(
    each: (firstIndex: number, view: DataView) => void | Promise<void>,
    skipHoles = false,
  ) {
    const total = this.entries * 8;
    const holes = skipHoles && !this.#whole
      ? (await this.#file.extents(this.offsetBytes, total)).filter((e) => !e.data)
      : [];
    for (let start = 0; start < total; start += l1_scan_chunk_bytes) {
      const length = Math.min(l1_scan_chunk_bytes, total - start);
      const at = this.offsetBytes + start;
      if (holes.some((h) => h.offsetBytes <= at && at + length <= h.offsetBytes + h.lengthBytes)) {
        if (
          ![...this.#blocks.keys()].some((b) =>
            b * l1_block_bytes >= start && b * l1_block_bytes < start + length
          )
        ) continue;
      }
      const bytes = new Uint8Array(length);
      if (!this.#whole) await this.#file.read(this.offsetBytes + start, bytes);
      for (let at = 0; at < bytes.byteLength; at += l1_block_bytes) {
        const block = this.#blocks.get((start + at) / l1_block_bytes);
        if (block) bytes.set(block.bytes, at);
      }
      await each(start / 8, new DataView(bytes.buffer));
    }
  }
}

function _block(bytes: Uint8Array): Block {
  return { bytes, view: new DataView(bytes.buffer), dirty: false, writing: 0 };
}
