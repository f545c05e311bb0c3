/**
 * The dynamic and differencing VHD driver. Guest bytes live in blocks
 * (2 MiB by default) listed by the BAT; each block is a sector bitmap
 * followed by its data. Unallocated blocks, and sectors whose bit is
 * clear, read from the parent (differencing) or as zeros (dynamic).
 *
 * Write ordering (DESIGN.md §4). When a write is answered, its data and
 * every metadata write it needs are in the file (page cache): a killed
 * process loses nothing it answered. For power loss, block data is only
 * ever placed past the end of the file, so it reads as zeros until
 * written, and a block is allocated in barrier-separated groups:
 *   1. the footer at the new end of the file (its moved copy), barrier —
 *      the file's last 512 bytes are a valid footer at every instant;
 *   2. dynamic: data and bitmap (all sectors present), barrier, BAT entry —
 *      the BAT never names a bitmap place still holding the old footer's
 *      bytes: readers that follow the bitmap (Xen, libvhdi, us) and QEMU,
 *      which ignores it, read every crash image the same;
 *      differencing: data, barrier, bitmap, barrier, BAT entry — a set bit
 *      never shows bytes that were not written, and the BAT never names a
 *      bitmap place still holding the old footer's bytes.
 * Setting bits in an allocated block is data, barrier, bitmap. Barriers
 * are group commits (`GroupSync`): writes in flight share them. FLUSH is
 * one more barrier. Opened `unordered` (a tool filling a new image it
 * deletes on failure), barriers are skipped and the BAT and the moved
 * footer are written at FLUSH only, which still makes everything durable.
 *
 * Layout of a new block (Xen's page alignment, QEMU's reuse of the old
 * footer): bitmap over the old footer, data page aligned so O_DIRECT guest
 * pages map to file pages, the new footer ending on a page boundary so its
 * O_DIRECT write never leaves the file longer than the footer's end.
 * @module
 */
import {
  type BlockDriver,
  BlockDriverBase,
  BlockError,
  type DriverCapabilities,
  type Extent,
  imageFormatCapabilities,
} from "../driver.ts";
import type { ImageFile, ImageOpenOptions } from "../image_file.ts";
import type { OpenContext } from "../format_entry.ts";
import { RangeLock } from "../raw/range_lock.ts";
import { GroupSync } from "../group_commit.ts";
import { isZeroBytes } from "../zero_bytes.ts";
import {
  type MapRun,
  pushExtent,
  pushMapRun,
  readBeneath,
  statusBeneath,
  zeroBeneath,
} from "../beneath.ts";
import { perUnit } from "../per_unit.ts";
import { DISK_DIFFERENCING, FOOTER_BYTES, VHD_SECTOR_BYTES, VhdFormatError } from "./footer.ts";
import { BAT_UNUSED, encodeBatEntries } from "./dynamic_header.ts";
import { layoutProblems, readVhdImage, type VhdImage } from "./image.ts";
import { footerPlace, type Gap, layout_page_bytes, reclaimSpace, usedEnd } from "./free_space.ts";
import { allSet, BitmapCache, runEnd, setBits, testBit } from "./bitmap_cache.ts";
import { openParent } from "./parent.ts";

/** Memory for cached bitmaps of partly written blocks. */
const bitmap_cache_bytes_max = 32 << 20;
/** Bitmaps read at once when mapping (bounded: each takes a request and a cache slot). */
const bitmap_reads_in_flight_max = 64;
/** New data is made present in units of this size (whole pages, as Hyper-V). */
const present_unit_bytes = 4096;
/** BAT entries per 512-byte sector: the unit BAT updates are written in. */
const bat_entries_per_sector = VHD_SECTOR_BYTES / 4;
/** `unordered` images grow ahead of their blocks by steps from the first to the last size. */
const growth_step_bytes_min = 8 << 20;
const growth_step_bytes_max = 256 << 20;
/** Largest sector a BAT entry (u32) can name. */
const bat_sector_max = 0xfffffffe;

/** Per-block state; 0 (not yet known) until the bitmap is read. */
const STATE_FULL = 1;
const STATE_PARTIAL = 2;

/** A dynamic or differencing VHD served as a block device. */
export class DynamicVhdDriver extends BlockDriverBase {
  readonly format = "vhd";
  readonly sizeBytes: number;
  readonly capabilities: DriverCapabilities;
  readonly image: VhdImage;
  readonly #file: ImageFile;
  readonly #parent?: BlockDriver;
  readonly #blockBytes: number;
  readonly #bitmapBytes: number;
  readonly #sectorsPerBlock: number;
  /** Sectors made present together (4 KiB, or the block when smaller). */
  readonly #unitSectors: number;
  readonly #batOffset: number;
  /** Published BAT: what reads and writes follow. */
  readonly #bat: Uint32Array;
  /** BAT as it is to be on disk: entries enter it only when their data may be referenced. */
  readonly #batStaged: Uint32Array;
  readonly #state: Uint8Array;
  readonly #bitmaps: BitmapCache;
  readonly #allocating = new Map<number, Promise<void>>();
  /** Writes that set bits hold their sectors (global sector numbers). */
  readonly #sectorLocks = new RangeLock();
  readonly #batChains = new Map<number, Promise<void>>();
  /** `unordered`: BAT sectors staged and not yet written. */
  readonly #batDirty = new Set<number>();
  /** `unordered`: the file grew; its footer is written at the next flush. */
  #footerMoved = false;
  /** `unordered`: the next step the file is extended by ahead of its blocks. */
  #growthBytes = growth_step_bytes_min;
  readonly #bitmapChains = new Map<number, Promise<void>>();
  readonly #barrier: GroupSync;
  readonly #ordered: boolean;
  readonly #footerBytes: Uint8Array;
  /** End of the file as this driver has extended it: new block data goes past it. */
  #endBytes: number;
  /** End of the last block or metadata: a new bitmap may start there, not before. */
  #usedEndBytes: number;
  /** Zeroed, durable gaps between blocks (reclaimed at open): new blocks go there first. */
  readonly #freeGaps: Gap[];
  #closed = false;

  private constructor(
    file: ImageFile,
    image: VhdImage,
    ordered: boolean,
    freeGaps: Gap[],
    parent?: BlockDriver,
  ) {
    super();
    this.#file = file;
    this.image = image;
    this.#parent = parent;
    this.sizeBytes = image.sizeBytes;
    this.#blockBytes = image.blockBytes;
    this.#bitmapBytes = image.bitmapBytes;
    this.#sectorsPerBlock = image.blockBytes / VHD_SECTOR_BYTES;
    this.#unitSectors = Math.min(present_unit_bytes / VHD_SECTOR_BYTES, this.#sectorsPerBlock);
    this.#batOffset = image.header!.tableOffsetBytes;
    this.#bat = image.bat!.slice();
    this.#batStaged = image.bat!.slice();
    this.#state = new Uint8Array(this.#bat.length);
    this.#bitmaps = new BitmapCache(
      Math.floor(bitmap_cache_bytes_max / image.bitmapBytes),
      (block) => this.#loadBitmap(block),
    );
    this.#barrier = new GroupSync(() => file.flush());
    this.#ordered = ordered;
    this.#footerBytes = image.footer.bytes;
    this.#endBytes = file.lengthBytes();
    this.#usedEndBytes = usedEnd(image);
    this.#freeGaps = freeGaps;
    this.capabilities = imageFormatCapabilities(file.writable);
  }

  /**
   * Opens a dynamic or differencing image already read into `read`. Opened
   * read-write, it first cuts space a dead writer left past its last block.
   */
  static async openImage(
    file: ImageFile,
    read: VhdImage,
    options: ImageOpenOptions,
    context: OpenContext,
  ): Promise<DynamicVhdDriver> {
    let image = read;
    const problem = layoutProblems(image, 1)[0];
    if (problem) throw new VhdFormatError(file.path, problem);
    // A writer that died mid-allocation left space it never referenced: take it back.
    let free: Gap[] = [];
    if (file.writable) {
      const reclaimed = await reclaimSpace(file, image);
      free = reclaimed.free;
      if (reclaimed.done.length > 0) image = await readVhdImage(file);
    }
    const parent = image.footer.diskType === DISK_DIFFERENCING
      ? await openParent(file, image, context)
      : undefined;
    return new DynamicVhdDriver(file, image, !options.unordered, free, parent);
  }

  get path(): string {
    return this.#file.path;
  }

  /** The footer UUID (a child's parent UUID names it). */
  get vhdUuid(): Uint8Array {
    return this.image.footer.uuid;
  }

  /** The opened parent of a differencing disk. */
  get parent(): BlockDriver | undefined {
    return this.#parent;
  }

  /** fdatasyncs issued so far (barriers and flushes). */
  get barriers(): number {
    return this.#barrier.syncs;
  }

  // ---- reads ----------------------------------------------------------------

  protected _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    return perUnit(
      offsetBytes,
      buffer,
      this.#blockBytes,
      (b, at, out) => this.#readInBlock(b, at, out),
    );
  }

  #dataOffset(block: number): number {
    return this.#bat[block] * VHD_SECTOR_BYTES + this.#bitmapBytes;
  }

  async #readInBlock(block: number, offsetBytes: number, out: Uint8Array): Promise<void> {
    if (this.#bat[block] === BAT_UNUSED) return await readBeneath(this.#parent, offsetBytes, [out]);
    const inBlock = offsetBytes - block * this.#blockBytes;
    const dataAt = this.#dataOffset(block);
    if (this.#state[block] === STATE_FULL) return await this.#file.read(dataAt + inBlock, out);
    const bits = await this.#bitmaps.acquire(block);
    try {
      const tasks: Promise<void>[] = [];
      this.#forRuns(bits, inBlock, out.byteLength, (start, end, present) => {
        const slice = out.subarray(start - inBlock, end - inBlock);
        const guest = block * this.#blockBytes + start;
        tasks.push(
          present
            ? this.#file.read(dataAt + start, slice)
            : readBeneath(this.#parent, guest, [slice]),
        );
      });
      await Promise.all(tasks);
    } finally {
      this.#bitmaps.release(block);
    }
  }

  /** Calls `run` for each stretch of `[inBlock, inBlock + length)` whose sectors share a bit. */
  #forRuns(
    bits: Uint8Array,
    inBlock: number,
    length: number,
    run: (start: number, end: number, present: boolean) => void,
  ): void {
    const end = inBlock + length;
    for (let pos = inBlock; pos < end;) {
      const sector = Math.floor(pos / VHD_SECTOR_BYTES);
      const stop = Math.min(
        end,
        runEnd(bits, sector, Math.ceil(end / VHD_SECTOR_BYTES)) * VHD_SECTOR_BYTES,
      );
      run(pos, stop, testBit(bits, sector));
      pos = stop;
    }
  }

  async #loadBitmap(block: number): Promise<Uint8Array> {
    const bits = new Uint8Array(this.#bitmapBytes);
    await this.#file.read(this.#bat[block] * VHD_SECTOR_BYTES, bits);
    this.#state[block] = allSet(bits, 0, this.#sectorsPerBlock) ? STATE_FULL : STATE_PARTIAL;
    return bits;
  }

  // ---- writes -----------------------------------------------------------------

  protected _write(offsetBytes: number, data: Uint8Array): Promise<void> {
    return perUnit(
      offsetBytes,
      data,
      this.#blockBytes,
      (b, at, bytes) => this.#writeInBlock(b, at, bytes),
    );
  }

  async #writeInBlock(block: number, offsetBytes: number, data: Uint8Array): Promise<void> {
    let zeroChecked = false;
    for (;;) {
      const pending = this.#allocating.get(block);
      if (pending) {
        await pending.catch(() => {});
        continue;
      }
      if (this.#bat[block] !== BAT_UNUSED) {
        return await this.#writeAllocated(block, offsetBytes, data);
      }
      if (!zeroChecked && isZeroBytes(data)) {
        zeroChecked = true;
        // Zeros over zeros need no block; recheck: the block may have appeared meanwhile.
        if (await zeroBeneath(this.#parent, offsetBytes, data.byteLength)) {
          if (this.#bat[block] === BAT_UNUSED && !this.#allocating.has(block)) return;
        }
        continue;
      }
      const allocation = this.#allocate(block, offsetBytes, data);
      this.#allocating.set(block, allocation);
      try {
        return await allocation;
      } finally {
        this.#allocating.delete(block);
      }
    }
  }

  /**
   * Reserves a block: in free space a reclaim zeroed if one fits (no
   * footer move then), else at the end. Its data page aligned, in zeros;
   * its bitmap just before, over the old footer or unused space; at the
   * end, the moved footer ending on a page boundary, so an O_DIRECT write
   * of it never leaves the file longer than the footer's end.
   */
  #reserveBlock(): { start: number; footerAt?: number } {
    const page = layout_page_bytes;
    const inGap = this.#takeFreeSpace();
    if (inGap !== undefined) return { start: inGap };
    const from = Math.max(this.#endBytes, this.#usedEndBytes + this.#bitmapBytes);
    const dataAt = Math.ceil(from / page) * page;
    const start = dataAt - this.#bitmapBytes;
    if (start / VHD_SECTOR_BYTES > bat_sector_max) {
      throw new BlockError(
        "ENOSPC",
        `${this.path}: no room for a new block (VHD files end at 2 TiB)`,
      );
    }
    // Data in fresh space only (reads zeros until written); nothing used is overwritten.
    console.assert(dataAt >= this.#endBytes && start >= this.#usedEndBytes, "block overlaps");
    this.#usedEndBytes = dataAt + this.#blockBytes;
    const footerAt = footerPlace(this.#usedEndBytes);
    this.#endBytes = footerAt + FOOTER_BYTES;
    return { start, footerAt };
  }

  /** The bitmap offset of a block placed in free space, or undefined when none fits. */
  #takeFreeSpace(): number | undefined {
    const page = layout_page_bytes;
    for (let i = 0; i < this.#freeGaps.length; i += 1) {
      const gap = this.#freeGaps[i];
      const dataAt = Math.ceil((gap.start + this.#bitmapBytes) / page) * page;
      const end = dataAt + this.#blockBytes;
      if (end > gap.end) continue;
      const rest = { start: end, end: gap.end };
      this.#freeGaps.splice(i, 1, ...(rest.end - rest.start >= page ? [rest] : []));
      return dataAt - this.#bitmapBytes;
    }
    return undefined;
  }

  async #allocate(block: number, offsetBytes: number, data: Uint8Array): Promise<void> {
    try {
      await this.#allocateAt(block, offsetBytes, data);
    } catch (error) {
      // The reserved space stays a leak; the entry must not reach disk with another one.
      this.#batStaged[block] = this.#bat[block];
      throw error;
    }
  }

  async #allocateAt(block: number, offsetBytes: number, data: Uint8Array): Promise<void> {
    const { start, footerAt } = this.#reserveBlock();
    if (footerAt !== undefined && this.#ordered) {
      await this.#file.write(footerAt, this.#footerBytes);
      await this.#order();
    } else if (footerAt !== undefined) await this.#growAhead();
    const entry = start / VHD_SECTOR_BYTES;
    const inBlock = offsetBytes - block * this.#blockBytes;
    const dataAt = start + this.#bitmapBytes;
    const bits = new Uint8Array(this.#bitmapBytes);
    if (!this.#parent) {
      bits.fill(0xff);
      await Promise.all([this.#file.write(dataAt + inBlock, data), this.#file.write(start, bits)]);
      await this.#order();
      this.#batStaged[block] = entry;
      await this.#writeBatEntry(block);
      this.#state[block] = STATE_FULL;
    } else {
      const [first, end] = await this.#writeUnits(dataAt, block, inBlock, data, () => false);
      await this.#order();
      setBits(bits, first, end);
      // The bitmap may land on the old footer: durable before the BAT names it.
      await this.#file.write(start, bits);
      await this.#order();
      this.#batStaged[block] = entry;
      await this.#writeBatEntry(block);
      const full = allSet(bits, 0, this.#sectorsPerBlock);
      this.#state[block] = full ? STATE_FULL : STATE_PARTIAL;
      if (!full) this.#bitmaps.insert(block, bits);
    }
    this.#bat[block] = entry;
  }

  /** The sectors a write at `inBlock` makes present: whole 4 KiB units around it. */
  #unitRange(inBlock: number, lengthBytes: number): [number, number] {
    const unit = this.#unitSectors;
    const first = Math.floor(inBlock / VHD_SECTOR_BYTES / unit) * unit;
    const end = Math.ceil((inBlock + lengthBytes) / VHD_SECTOR_BYTES / unit) * unit;
    return [first, Math.min(end, this.#sectorsPerBlock)];
  }

  /**
   * Writes `data` at `inBlock` of a block whose data starts at `dataAt`, and
   * completes the 4 KiB units it touches: their sectors not yet `present`
   * get what lies beneath (the parent, or zeros); present ones are left as
   * they are. Afterwards every sector of the returned range may be marked
   * present. Whole units, as Hyper-V writes them: libvhdi reads a unit from
   * one layer.
   */
  async #writeUnits(
    dataAt: number,
    block: number,
    inBlock: number,
    data: Uint8Array,
    present: (sector: number) => boolean,
  ): Promise<[number, number]> {
    const [first, end] = this.#unitRange(inBlock, data.byteLength);
    const dataEnd = inBlock + data.byteLength;
    const writes: Promise<void>[] = [];
    for (let s = first; s < end;) {
      const here = present(s);
      let stop = s + 1;
      while (stop < end && present(stop) === here) stop += 1;
      const from = s * VHD_SECTOR_BYTES;
      const to = stop * VHD_SECTOR_BYTES;
      const lo = Math.max(from, inBlock);
      const hi = Math.min(to, dataEnd);
      if (here || (lo === from && hi === to)) {
        // Present sectors keep their other bytes; a fully covered run needs nothing beneath.
        if (hi > lo) {
          writes.push(this.#file.write(dataAt + lo, data.subarray(lo - inBlock, hi - inBlock)));
        }
      } else writes.push(this.#completeRun(dataAt, block, from, to, data, inBlock));
      s = stop;
    }
    await Promise.all(writes);
    return [first, end];
  }

  /** Writes sectors `[from, to)` (bytes in the block) from beneath, overlaid with `data`. */
  async #completeRun(
    dataAt: number,
    block: number,
    from: number,
    to: number,
    data: Uint8Array,
    inBlock: number,
  ) {
    const run = new Uint8Array(to - from);
    const guest = block * this.#blockBytes;
    const lo = Math.min(Math.max(from, inBlock), to);
    const hi = Math.max(Math.min(to, inBlock + data.byteLength), lo);
    const reads: Promise<void>[] = [];
    if (lo > from) {
      reads.push(readBeneath(this.#parent, guest + from, [run.subarray(0, lo - from)]));
    }
    if (to > hi) reads.push(readBeneath(this.#parent, guest + hi, [run.subarray(hi - from)]));
    await Promise.all(reads);
    if (hi > lo) run.set(data.subarray(lo - inBlock, hi - inBlock), lo - from);
    await this.#file.write(dataAt + from, run);
  }

  /** A write into an allocated block; makes the units it touches present. */
  async #writeAllocated(block: number, offsetBytes: number, data: Uint8Array): Promise<void> {
    const inBlock = offsetBytes - block * this.#blockBytes;
    const dataAt = this.#dataOffset(block);
    if (this.#state[block] === STATE_FULL) return await this.#file.write(dataAt + inBlock, data);
    const first = Math.floor(inBlock / VHD_SECTOR_BYTES);
    const end = Math.ceil((inBlock + data.byteLength) / VHD_SECTOR_BYTES);
    const bits = await this.#bitmaps.acquire(block);
    try {
      if (allSet(bits, first, end)) return await this.#file.write(dataAt + inBlock, data);
      const base = block * this.#sectorsPerBlock;
      const [unitFirst, unitEnd] = this.#unitRange(inBlock, data.byteLength);
      const release = await this.#sectorLocks.acquire(base + unitFirst, base + unitEnd);
      try {
        // Bits only ever get set: recheck now that these sectors are ours.
        if (allSet(bits, first, end)) return await this.#file.write(dataAt + inBlock, data);
        const present = (s: number) => testBit(bits, s);
        await this.#writeUnits(dataAt, block, inBlock, data, present);
        await this.#order();
        setBits(bits, unitFirst, unitEnd);
        await this.#writeBitmap(block, bits);
        if (allSet(bits, 0, this.#sectorsPerBlock)) this.#state[block] = STATE_FULL;
      } finally {
        release();
      }
    } finally {
      this.#bitmaps.release(block);
      if (this.#state[block] === STATE_FULL) this.#bitmaps.drop(block);
    }
  }

  /** A barrier between dependent write groups (skipped for `unsafe` images). */
  #order(): Promise<void> {
    return this.#ordered ? this.#barrier.sync() : Promise.resolve();
  }

  /**
   * Writes the BAT sector holding `block`'s staged entry. Writes of one
   * sector are chained and each takes the staged entries when it runs, so
   * the last one carries every entry staged before it.
   */
  #writeBatEntry(block: number): Promise<void> {
    const sector = Math.floor(block / bat_entries_per_sector);
    if (!this.#ordered) {
      this.#batDirty.add(sector); // written by the next flush
      return Promise.resolve();
    }
    return this.#writeBatSector(sector);
  }

  #writeBatSector(sector: number): Promise<void> {
    const first = sector * bat_entries_per_sector;
    const count = Math.min(bat_entries_per_sector, this.#batStaged.length - first);
    const previous = this.#batChains.get(sector) ?? Promise.resolve();
    const next = previous.catch(() => {}).then(() =>
      this.#file.write(this.#batOffset + first * 4, encodeBatEntries(this.#batStaged, first, count))
    );
    this.#batChains.set(sector, next);
    next.finally(() => {
      if (this.#batChains.get(sector) === next) this.#batChains.delete(sector);
    }).catch(() => {});
    return next;
  }

  /** Writes a block's bitmap, chained per block like BAT sectors. */
  #writeBitmap(block: number, bits: Uint8Array): Promise<void> {
    const previous = this.#bitmapChains.get(block) ?? Promise.resolve();
    const next = previous.catch(() => {}).then(() =>
      this.#file.write(this.#bat[block] * VHD_SECTOR_BYTES, bits.slice())
    );
    this.#bitmapChains.set(block, next);
    next.finally(() => {
      if (this.#bitmapChains.get(block) === next) this.#bitmapChains.delete(block);
    }).catch(() => {});
    return next;
  }

  protected async _flush(): Promise<void> {
    if (!this.#file.writable) return;
    if (!this.#ordered) await this.#writeDeferred();
    await this.#barrier.sync();
  }

  /** What an `unordered` image keeps until flush: dirty BAT sectors, the moved footer. */
  async #writeDeferred(): Promise<void> {
    const sectors = [...this.#batDirty];
    this.#batDirty.clear();
    await Promise.all(sectors.map((sector) => this.#writeBatSector(sector)));
    if (this.#footerMoved) {
      this.#footerMoved = false;
      await this.#file.write(this.#endBytes - FOOTER_BYTES, this.#footerBytes);
      if (this.#file.lengthBytes() > this.#endBytes) await this.#file.truncate(this.#endBytes);
    }
  }

  /**
   * `unordered`: the file is extended ahead of the blocks, in growing
   * steps, so data writes land inside it (file systems serialize O_DIRECT
   * writes that extend a file); flush cuts it back behind the footer.
   */
  async #growAhead(): Promise<void> {
    this.#footerMoved = true;
    if (this.#endBytes <= this.#file.lengthBytes()) return;
    const step = Math.min(this.#growthBytes, growth_step_bytes_max);
    this.#growthBytes = step * 2;
    await this.#file.truncate(Math.max(this.#endBytes, this.#file.lengthBytes() + step));
  }

  // ---- block status -----------------------------------------------------------

  protected override async _blockStatus(
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<Extent[]> {
    const extents: Extent[] = [];
    const push = (e: Extent) => pushExtent(extents, e);
    for (const run of await this.mapRuns(offsetBytes, lengthBytes)) {
      if (run.kind === "data") {
        push({
          offsetBytes: run.offsetBytes,
          lengthBytes: run.lengthBytes,
          hole: false,
          zero: false,
        });
      } else {for (const e of await statusBeneath(this.#parent, run.offsetBytes, run.lengthBytes)) {
          push(e);
        }}
    }
    return extents;
  }

  /**
   * This layer alone, at bitmap granularity, with host offsets (for `blktap
   * map`): `data` where the sectors are present here, `hole` elsewhere.
   */
  async mapRuns(offsetBytes: number, lengthBytes: number): Promise<MapRun[]> {
    this.checkRange(offsetBytes, lengthBytes);
    const runs: MapRun[] = [];
    const push = (run: MapRun) => pushMapRun(runs, run);
    const end = offsetBytes + lengthBytes;
    await this.#learnStates(
      Math.floor(offsetBytes / this.#blockBytes),
      Math.ceil(end / this.#blockBytes),
    );
    for (let pos = offsetBytes; pos < end;) {
      const block = Math.floor(pos / this.#blockBytes);
      const blockEnd = Math.min(end, (block + 1) * this.#blockBytes);
      await this.#mapBlock(block, pos, blockEnd, push);
      pos = blockEnd;
    }
    return runs;
  }

  /**
   * Reads the bitmaps of the allocated blocks in `[first, end)` whose state
   * is not known yet, many at a time (one after the other, a map of a large
   * disk waited ~100 ms before convert's first read); full blocks keep none.
   */
  async #learnStates(first: number, end: number): Promise<void> {
    const unknown: number[] = [];
    for (let block = first; block < end; block += 1) {
      if (this.#bat[block] !== BAT_UNUSED && this.#state[block] === 0) unknown.push(block);
    }
    for (let at = 0; at < unknown.length; at += bitmap_reads_in_flight_max) {
      await Promise.all(
        unknown.slice(at, at + bitmap_reads_in_flight_max).map(async (block) => {
          await this.#bitmaps.acquire(block);
          this.#bitmaps.release(block);
          if (this.#state[block] === STATE_FULL) this.#bitmaps.drop(block);
        }),
      );
    }
  }

  async #mapBlock(block: number, pos: number, end: number, push: (run: MapRun) => void) {
    const base = block * this.#blockBytes;
    if (this.#bat[block] === BAT_UNUSED) {
      return push({ offsetBytes: pos, lengthBytes: end - pos, kind: "hole" });
    }
    const dataAt = this.#dataOffset(block);
    const data = (start: number, stop: number) =>
      push({
        offsetBytes: start,
        lengthBytes: stop - start,
        kind: "data",
        hostOffsetBytes: dataAt + start - base,
      });
    if (this.#state[block] === STATE_FULL) return data(pos, end);
    const bits = await this.#bitmaps.acquire(block);
    try {
      this.#forRuns(bits, pos - base, end - pos, (start, stop, present) => {
        if (present) data(base + start, base + stop);
        else push({ offsetBytes: base + start, lengthBytes: stop - start, kind: "hole" });
      });
    } finally {
      this.#bitmaps.release(block);
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      if (this.#file.writable) await this._flush();
    } finally {
      await this.#parent?.close();
      await this.#file.close();
    }
  }
}
