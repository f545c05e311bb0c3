/**
 * One hosted sparse extent (`KDMV`): a grain directory (GD) of grain table
 * (GT) sectors, each GT mapping `grainTableEntries` grains to file sectors;
 * 0 means unallocated, 1 (with the zero-grain flag) a zeroed grain.
 *
 * Writes allocate grains at the end of the file (src/formats/append_space.ts:
 * space that reads as zeros until written, durably part of the file before
 * anything points into it). The whole grain (new bytes, zeros elsewhere) is
 * written, then its entry is set in the cached table and the table is
 * written before the write is answered: a killed process loses nothing it
 * answered (driver.ts, `write`). The redundant copies of tables and
 * directory entries (a backup only readers of a damaged primary use) follow
 * at the next flush, which halves the metadata writes of allocation.
 * vmdk has no backing files here, so a new grain's previous content was
 * zeros: if its entry reaches the disk before its data (power loss), it
 * reads as zeros or as the bytes written — nothing never written — and no
 * fdatasync is needed between the two (the crash simulator checks every
 * such point). FLUSH is one fdatasync, group-committed.
 *
 * A crash may leave an entry on one side only (primary or redundant):
 * `check` accepts that and a read-write open repairs it. The header's
 * `uncleanShutdown` byte is set while the extent is open for writing; a
 * read-write open that finds it set (the last writer died) reclaims what
 * that writer allocated and never linked (sparse_check.ts). Grain tables
 * are preallocated when the image is created (as QEMU and VMware do);
 * where a directory entry is 0, a table pair is allocated like a grain.
 *
 * Concurrency: one allocation per grain (`#allocating`) and per table
 * (`#allocatingTables`) at a time; a second write to the same new grain
 * waits, then overwrites in place. Tables in use are pinned, and tables
 * with unwritten changes are never evicted, so the cache cannot reload a
 * stale copy.
 * @module
 */
import { zlib } from "../cluster_compress.ts";
import { BlockError } from "../driver.ts";
import type { ImageFile } from "../image_file.ts";
import { giveBounce, takeBounce } from "../raw/bounce_pool.ts";
import { AppendSpace } from "../append_space.ts";
import { GroupCommit, GroupSync } from "../group_commit.ts";
import {
  decodeSparseHeader,
  directoryAtEnd,
  encodeSparseHeader,
  hasSparseMagic,
  HEADER_BYTES,
  HeaderError,
  SECTOR_BYTES,
  type SparseHeader,
  type SparseLayout,
  validateSparseHeader,
} from "./sparse_header.ts";

/** Grain tables kept in memory per extent (2 KiB each: 8 MiB, 128 GiB of 64 KiB grains). */
const grain_table_cache_tables_max = 4096;
/** Tables whose redundant copy may lag (they stay cached) before it is written unasked. */
const redundant_stale_max = 1024;
/** Decompressed grains kept for sequential reads of streamOptimized images. */
const compressed_grain_cache_max = 4;
/** Size of a grain marker's fixed part: lba u64, size u32. */
const grain_marker_bytes = 12;

/**
 * What a run of guest bytes is inside one extent: unallocated, a zeroed
 * grain, stored data, a compressed grain, or a hole of a flat extent file
 * (stored but reading as zeros; QEMU maps it as both data and zero).
 */
export type RunKind = "hole" | "zero" | "data" | "compressed" | "flat-hole";

/** One run of an extent's allocation map (offsets inside the extent). */
export interface ExtentRun {
  offsetBytes: number;
  lengthBytes: number;
  kind: RunKind;
  /** Where the bytes are in the extent file (uncompressed data only). */
  hostOffsetBytes?: number;
}

/** Reads the header, or the footer copy when the header says "GD at end". */
export async function readSparseHeader(file: ImageFile): Promise<SparseHeader> {
  const length = file.lengthBytes();
  if (length < HEADER_BYTES) throw new HeaderError(`file is too small (${length} bytes)`);
  const bytes = new Uint8Array(HEADER_BYTES);
  await file.read(0, bytes);
  if (!hasSparseMagic(bytes) || !directoryAtEnd(bytes)) return decodeSparseHeader(bytes);
  // streamOptimized as VMware streams it: footer marker, footer header, end-of-stream marker.
  if (length < 3 * SECTOR_BYTES) throw new HeaderError("file too small for a footer");
  const footer = new Uint8Array(3 * SECTOR_BYTES);
  await file.read(length - 3 * SECTOR_BYTES, footer);
  const view = new DataView(footer.buffer);
  const footerType = view.getUint32(12, true);
  const eosType = view.getUint32(2 * SECTOR_BYTES + 12, true);
  if (footerType !== 3 || eosType !== 0 || view.getBigUint64(2 * SECTOR_BYTES, true) !== 0n) {
    throw new HeaderError("grain directory at end but no valid footer");
  }
  const footerHeader = footer.subarray(SECTOR_BYTES, 2 * SECTOR_BYTES);
  if (directoryAtEnd(footerHeader)) throw new HeaderError("footer has no grain directory offset");
  return decodeSparseHeader(footerHeader);
}

function readU32Table(bytes: Uint8Array): Uint32Array {
  const table = new Uint32Array(bytes.byteLength / 4);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < table.length; i += 1) table[i] = view.getUint32(i * 4, true);
  return table;
}

/** Reads `entries` little-endian u32 at `offsetBytes`. */
export async function readTable(
  file: ImageFile,
  offsetBytes: number,
  entries: number,
): Promise<Uint32Array> {
  const bytes = new Uint8Array(entries * 4);
  await file.read(offsetBytes, bytes);
  return readU32Table(bytes);
}

/** A sparse extent opened for reading and, unless compressed, writing. */
export class SparseExtent {
  readonly file: ImageFile;
  readonly layout: SparseLayout;
  /** Guest bytes this extent serves (the descriptor's size, at most the capacity). */
  readonly sizeBytes: number;
  readonly writable: boolean;
  readonly directory: Uint32Array;
  readonly redundantDirectory?: Uint32Array;
  readonly #tables = new Map<number, Uint32Array>();
  readonly #loading = new Map<number, Promise<Uint32Array>>();
  readonly #pins = new Map<number, number>();
  readonly #allocating = new Map<number, Promise<void>>();
  readonly #allocatingTables = new Map<number, Promise<void>>();
  /** Tables whose cached entries are newer than the file. */
  readonly #dirtyTables = new Set<number>();
  /** Tables being written now. */
  readonly #writingTables = new Map<number, number>();
  readonly #tableWriters = new Map<number, GroupCommit>();
  /** Directory entries (table indexes) newer in memory than in the file. */
  readonly #dirtyDirectory = new Set<number>();
  readonly #directoryWriter = new GroupCommit(() => this.#writeDirectory());
  /** Tables and directory entries whose redundant copy lags the primary one. */
  readonly #redundantStale = new Set<number>();
  readonly #redundantDirectoryStale = new Set<number>();
  readonly #redundantWriter = new GroupCommit(() => this.#writeRedundant());
  readonly #inflated = new Map<number, Uint8Array>();
  readonly #sync: GroupSync;
  #space!: AppendSpace;
  /** The header says "open for writing" (set before the first allocation). */
  #markedOpen: Promise<void> | undefined;

  private constructor(
    file: ImageFile,
    layout: SparseLayout,
    sizeBytes: number,
    directory: Uint32Array,
    redundantDirectory: Uint32Array | undefined,
  ) {
    this.file = file;
    this.layout = layout;
    this.sizeBytes = sizeBytes;
    this.directory = directory;
    this.redundantDirectory = redundantDirectory;
    this.writable = file.writable && !layout.compressed && layout.header.version !== 3;
    this.#sync = new GroupSync(() => file.flush());
    this.restartSpace();
  }

  /** Allocation starts again at the end of the file (after a recovery changed it). */
  restartSpace(): void {
    const end = Math.max(
      this.file.lengthBytes(),
      this.layout.header.overheadSectors * SECTOR_BYTES,
    );
    // Preallocated growth: O_DIRECT writes that extend a file are serialised
    // by file systems such as ext4, writes inside it are not.
    this.#space = new AppendSpace(
      this.file,
      this.#sync,
      Math.ceil(end / this.layout.grainBytes) * this.layout.grainBytes,
      "preallocate",
    );
  }

  /** The last writer died with the extent open (the header's `uncleanShutdown`). */
  get uncleanShutdown(): boolean {
    return this.layout.header.uncleanShutdown;
  }

  /**
   * Records durably in the header that the extent is being written (before
   * its first allocation: only allocations can leak) or, at close, that it
   * was closed cleanly.
   */
  markOpen(open: boolean): Promise<void> {
    if (open) return this.#markedOpen ??= this.#writeUnclean(true);
    if (!this.#markedOpen && !this.layout.header.uncleanShutdown) return Promise.resolve();
    this.#markedOpen = undefined;
    return this.#writeUnclean(false);
  }

  async #writeUnclean(unclean: boolean): Promise<void> {
    this.layout.header.uncleanShutdown = unclean;
    await this.file.write(0, encodeSparseHeader(this.layout.header));
    await this.#sync.sync();
  }

  /**
   * Opens the sparse extent in `file`. `sizeBytes` is the size the
   * descriptor gives it (default: the header's capacity).
   */
  static async open(file: ImageFile, sizeBytes?: number): Promise<SparseExtent> {
    const header = await readSparseHeader(file);
    const layout = validateSparseHeader(header, file.lengthBytes());
    const capacityBytes = header.capacitySectors * SECTOR_BYTES;
    const size = sizeBytes ?? capacityBytes;
    if (size > capacityBytes) {
      throw new HeaderError(`extent of ${size} bytes exceeds its capacity (${capacityBytes})`);
    }
    const directory = await readTable(
      file,
      header.directoryOffsetSectors * SECTOR_BYTES,
      layout.directoryEntries,
    );
    const redundant = layout.redundant
      ? await readTable(
        file,
        header.redundantDirectoryOffsetSectors * SECTOR_BYTES,
        layout.directoryEntries,
      )
      : undefined;
    return new SparseExtent(file, layout, size, directory, redundant);
  }

  #error(code: "EIO" | "EPERM", message: string): BlockError {
    return new BlockError(code, `${this.file.path}: ${message}`);
  }

  /** Loads (or finds) grain table `t`; the caller holds a pin on `t`. */
  #table(t: number): Promise<Uint32Array> {
    const cached = this.#tables.get(t);
    if (cached) return Promise.resolve(cached);
    let loading = this.#loading.get(t);
    if (!loading) {
      loading = this.#load(t).finally(() => this.#loading.delete(t));
      this.#loading.set(t, loading);
    }
    return loading;
  }

  async #load(t: number): Promise<Uint32Array> {
    const offset = this.directory[t] * SECTOR_BYTES;
    if (offset + this.layout.tableBytes > this.file.lengthBytes()) {
      throw this.#error("EIO", `grain table ${t} at sector ${this.directory[t]} lies past the end`);
    }
    const table = await readTable(this.file, offset, this.layout.header.grainTableEntries);
    this.#tables.set(t, table);
    this.#evict();
    return table;
  }

  #evict(): void {
    if (this.#tables.size <= grain_table_cache_tables_max) return;
    for (const t of this.#tables.keys()) {
      if (this.#tables.size <= grain_table_cache_tables_max) break;
      if (this.#pins.has(t) || this.#unsettledTable(t) || this.#redundantStale.has(t)) continue;
      this.#tables.delete(t);
    }
  }

  #pin(t: number): void {
    this.#pins.set(t, (this.#pins.get(t) ?? 0) + 1);
  }

  #unpin(t: number): void {
    const count = this.#pins.get(t)! - 1;
    if (count === 0) this.#pins.delete(t);
    else this.#pins.set(t, count);
  }

  /** GT entry of grain `g` (0 when its table is unallocated). */
  async entryOf(g: number): Promise<number> {
    const entries = this.layout.header.grainTableEntries;
    const t = Math.floor(g / entries);
    if (this.directory[t] === 0) return 0;
    this.#pin(t);
    try {
      return (await this.#table(t))[g % entries];
    } finally {
      this.#unpin(t);
    }
  }

  #kindOf(entry: number): RunKind {
    if (entry === 0) return "hole";
    if (entry === 1 && this.layout.zeroGrains) return "zero";
    return this.layout.compressed ? "compressed" : "data";
  }

  /**
   * Fills `buffer` from extent offset `offsetBytes` (inside the extent).
   * Grains that lie next to each other in the file are read with one
   * request (a sequentially written image reads like a raw file).
   */
  async read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    const runs = await this.status(offsetBytes, buffer.byteLength);
    await Promise.all(runs.map((run) => {
      const start = run.offsetBytes - offsetBytes;
      const target = buffer.subarray(start, start + run.lengthBytes);
      if (run.kind === "data") return this.file.read(run.hostOffsetBytes!, target);
      if (run.kind === "compressed") return this.#readCompressedRun(run.offsetBytes, target);
      target.fill(0);
      return Promise.resolve();
    }));
  }

  async #readCompressedRun(offsetBytes: number, target: Uint8Array): Promise<void> {
    for (const piece of grainPieces(offsetBytes, target.byteLength, this.layout.grainBytes)) {
      const end = piece.doneBytes + piece.lengthBytes;
      await this.#readGrain(piece.g, piece.inGrainBytes, target.subarray(piece.doneBytes, end));
    }
  }

  async #readGrain(g: number, inGrain: number, target: Uint8Array): Promise<void> {
    const entry = await this.entryOf(g);
    const kind = this.#kindOf(entry);
    if (kind === "hole" || kind === "zero") {
      target.fill(0);
    } else if (kind === "compressed") {
      const grain = await this.#inflate(g, entry);
      target.set(grain.subarray(inGrain, inGrain + target.byteLength));
    } else {
      await this.file.read(entry * SECTOR_BYTES + inGrain, target);
    }
  }

  async #inflate(g: number, entry: number): Promise<Uint8Array> {
    const cached = this.#inflated.get(g);
    if (cached) return cached;
    const grainBytes = this.layout.grainBytes;
    const start = entry * SECTOR_BYTES;
    const fileBytes = this.file.lengthBytes();
    const compressedMax = 2 * grainBytes + SECTOR_BYTES;
    let dataStart = start;
    let dataBytes = Math.min(compressedMax, fileBytes - start);
    if (this.layout.markers) {
      const marker = new Uint8Array(grain_marker_bytes);
      await this.file.read(start, marker);
      dataBytes = new DataView(marker.buffer).getUint32(8, true);
      dataStart = start + grain_marker_bytes;
    }
    if (dataBytes <= 0 || dataBytes > compressedMax || dataStart + dataBytes > fileBytes) {
      throw this.#error("EIO", `compressed grain ${g} at sector ${entry} is out of bounds`);
    }
    const compressed = new Uint8Array(dataBytes);
    await this.file.read(dataStart, compressed);
    const { inflateSync } = await zlib();
    let grain: Uint8Array;
    try {
      grain = new Uint8Array(inflateSync(compressed, { maxOutputLength: grainBytes }));
    } catch (error) {
      throw this.#error("EIO", `compressed grain ${g}: ${(error as Error).message}`);
    }
    if (grain.byteLength !== grainBytes) {
      throw this.#error("EIO", `compressed grain ${g} inflates to ${grain.byteLength} bytes`);
    }
    if (this.#inflated.size >= compressed_grain_cache_max) {
      this.#inflated.delete(this.#inflated.keys().next().value!);
    }
    this.#inflated.set(g, grain);
    return grain;
  }

  /** Writes `data` at extent offset `offsetBytes`, allocating grains as needed. */
  async write(offsetBytes: number, data: Uint8Array): Promise<void> {
    if (!this.writable) {
      const why = this.layout.compressed ? "compressed (streamOptimized)" : "version 3";
      throw this.#error("EPERM", `sparse extent is ${why}: read-only`);
    }
    const pieces: Promise<void>[] = [];
    for (const piece of grainPieces(offsetBytes, data.byteLength, this.layout.grainBytes)) {
      const end = piece.doneBytes + piece.lengthBytes;
      pieces.push(
        this.#writeGrain(piece.g, piece.inGrainBytes, data.subarray(piece.doneBytes, end)),
      );
    }
    await Promise.all(pieces);
  }

  async #writeGrain(g: number, inGrain: number, data: Uint8Array): Promise<void> {
    const entries = this.layout.header.grainTableEntries;
    const t = Math.floor(g / entries);
    const j = g % entries;
    if (this.directory[t] === 0) await this.#allocateTable(t);
    this.#pin(t);
    try {
      const table = await this.#table(t);
      for (let pending = this.#allocating.get(g); pending; pending = this.#allocating.get(g)) {
        await pending;
      }
      if (this.#kindOf(table[j]) === "data") {
        await this.file.write(table[j] * SECTOR_BYTES + inGrain, data);
      } else {
        let finished!: () => void;
        this.#allocating.set(g, new Promise<void>((resolve) => (finished = resolve)));
        try {
          await this.#allocate(table, t, j, inGrain, data);
        } finally {
          this.#allocating.delete(g);
          finished();
        }
      }
      // Answered only once the entries it relies on are in the file.
      if (this.#unsettledTable(t)) await this.#settle(t);
    } finally {
      this.#unpin(t);
    }
  }

  /**
   * Gives grain table `t` a place at the end of the file: a primary and a
   * redundant table, zeroed in memory and written whole by the first
   * settle, with their directory entries (fresh space reads as zeros, so a
   * directory entry that lands first shows an empty table).
   */
  async #allocateTable(t: number): Promise<void> {
    for (
      let pending = this.#allocatingTables.get(t);
      pending;
      pending = this.#allocatingTables.get(t)
    ) {
      await pending;
    }
    if (this.directory[t] !== 0) return;
    let finished!: () => void;
    this.#allocatingTables.set(t, new Promise<void>((resolve) => (finished = resolve)));
    try {
      await this.markOpen(true);
      const { grainBytes, tableBytes } = this.layout;
      const tableSlotBytes = Math.ceil(tableBytes / SECTOR_BYTES) * SECTOR_BYTES;
      const slotBytes = Math.ceil((2 * tableSlotBytes) / grainBytes) * grainBytes;
      const hostOffset = this.#space.take(slotBytes, grainBytes);
      const tableSector = hostOffset / SECTOR_BYTES;
      const redundantSector = (hostOffset + tableSlotBytes) / SECTOR_BYTES;
      if (redundantSector > 0xffffffff) {
        throw this.#error("EIO", "file too large for 32-bit offsets");
      }
      await this.#space.durable(hostOffset + slotBytes);
      if (this.redundantDirectory) this.redundantDirectory[t] = redundantSector;
      this.directory[t] = tableSector;
      this.#tables.set(t, new Uint32Array(this.layout.header.grainTableEntries));
      this.#dirtyTables.add(t);
      this.#dirtyDirectory.add(t);
      this.#evict();
    } finally {
      this.#allocatingTables.delete(t);
      finished();
    }
  }

  /** Cuts the space reserved past the last grain (at close). */
  async trimReserve(): Promise<void> {
    if (this.writable) await this.#space.trim();
  }

  // Writes the whole grain at the end of the file, then sets its entry in the cached table.
  async #allocate(table: Uint32Array, t: number, j: number, inGrain: number, data: Uint8Array) {
    await this.markOpen(true);
    const grainBytes = this.layout.grainBytes;
    const hostOffset = this.#space.take(grainBytes, grainBytes);
    const sector = hostOffset / SECTOR_BYTES;
    if (sector > 0xffffffff) throw this.#error("EIO", "file too large for 32-bit grain entries");
    const bounce = takeBounce(grainBytes);
    try {
      const grain = bounce.bytes.subarray(0, grainBytes);
      grain.fill(0);
      grain.set(data, inGrain);
      await Promise.all([
        this.file.write(hostOffset, grain),
        this.#space.durable(hostOffset + grainBytes),
      ]);
    } finally {
      giveBounce(bounce);
    }
    // Invariant (DESIGN.md §4 rule 1): an entry is set only for bytes already written.
    if (hostOffset + grainBytes > this.file.lengthBytes()) {
      throw this.#error(
        "EIO",
        `grain ${t}/${j} written past the file's end: refusing to publish it`,
      );
    }
    table[j] = sector;
    this.#dirtyTables.add(t);
  }

  /** Allocation runs covering `[offset, offset+length)` of the extent. */
  async status(offsetBytes: number, lengthBytes: number): Promise<ExtentRun[]> {
    const grainBytes = this.layout.grainBytes;
    const entries = this.layout.header.grainTableEntries;
    const runs: ExtentRun[] = [];
    const end = offsetBytes + lengthBytes;
    let offset = offsetBytes;
    while (offset < end) {
      const g = Math.floor(offset / grainBytes);
      const t = Math.floor(g / entries);
      if (this.directory[t] === 0) {
        const tableEnd = Math.min(end, (t + 1) * entries * grainBytes);
        pushRun(runs, { offsetBytes: offset, lengthBytes: tableEnd - offset, kind: "hole" });
        offset = tableEnd;
        continue;
      }
      this.#pin(t);
      try {
        offset = this.#tableRuns(await this.#table(t), t, offset, end, runs);
      } finally {
        this.#unpin(t);
      }
    }
    return runs;
  }

  // Runs of one loaded table from `offset` to the table's end (or `end`); returns where it stopped.
  #tableRuns(table: Uint32Array, t: number, offset: number, end: number, runs: ExtentRun[]) {
    const grainBytes = this.layout.grainBytes;
    const stop = Math.min(end, (t + 1) * table.length * grainBytes);
    while (offset < stop) {
      const g = Math.floor(offset / grainBytes);
      const entry = table[g - t * table.length];
      const next = Math.min(stop, (g + 1) * grainBytes);
      const kind = this.#kindOf(entry);
      const run: ExtentRun = { offsetBytes: offset, lengthBytes: next - offset, kind };
      if (kind === "data") run.hostOffsetBytes = entry * SECTOR_BYTES + (offset - g * grainBytes);
      pushRun(runs, run);
      offset = next;
    }
    return offset;
  }

  /** Table `t` or its directory entry has changes not yet (completely) in the file. */
  #unsettledTable(t: number): boolean {
    return this.#dirtyTables.has(t) || this.#writingTables.has(t) || this.#dirtyDirectory.has(t);
  }

  /** Writes table `t` (both copies) and the directory entries changed so far. */
  async #settle(t: number): Promise<void> {
    let writer = this.#tableWriters.get(t);
    if (!writer) {
      writer = new GroupCommit(() => this.#writeTable(t));
      this.#tableWriters.set(t, writer);
    }
    const writes = [writer.run()];
    if (this.#dirtyDirectory.size > 0) writes.push(this.#directoryWriter.run());
    await Promise.all(writes);
  }

  // The primary copy only: the redundant one follows at the next flush.
  async #writeTable(t: number): Promise<void> {
    if (!this.#dirtyTables.delete(t)) return;
    const image = u32TableBytes(this.#tables.get(t)!);
    this.#writingTables.set(t, (this.#writingTables.get(t) ?? 0) + 1);
    try {
      await this.file.write(this.directory[t] * SECTOR_BYTES, image);
      if (this.redundantDirectory) this.#noteRedundantStale(t, this.#redundantStale);
    } catch (error) {
      this.#dirtyTables.add(t);
      throw error;
    } finally {
      const left = this.#writingTables.get(t)! - 1;
      if (left === 0) this.#writingTables.delete(t);
      else this.#writingTables.set(t, left);
    }
  }

  async #writeDirectory(): Promise<void> {
    const changed = [...this.#dirtyDirectory];
    this.#dirtyDirectory.clear();
    const at = this.layout.header.directoryOffsetSectors;
    try {
      await Promise.all(changed.map((t) => this.#writeU32(at, t, this.directory[t])));
    } catch (error) {
      for (const t of changed) this.#dirtyDirectory.add(t);
      throw error;
    }
    if (this.redundantDirectory) {
      for (const t of changed) this.#noteRedundantStale(t, this.#redundantDirectoryStale);
    }
  }

  // Stale redundant tables stay cached: past a bound they are written without waiting for a flush.
  #noteRedundantStale(t: number, stale: Set<number>): void {
    stale.add(t);
    if (stale.size > redundant_stale_max) this.#redundantWriter.run().catch(() => {});
  }

  /**
   * Brings the redundant side up to the primary one. Only entries already
   * in the primary side are copied, so a crash at any point leaves the
   * redundant side equal to the primary one or behind it: one-sided
   * entries, which `check` accepts and recovery repairs.
   */
  async #writeRedundant(): Promise<void> {
    const tables = [...this.#redundantStale];
    const entries = [...this.#redundantDirectoryStale];
    this.#redundantStale.clear();
    this.#redundantDirectoryStale.clear();
    const header = this.layout.header;
    try {
      await Promise.all([
        ...tables.map((t) =>
          this.file.write(
            this.redundantDirectory![t] * SECTOR_BYTES,
            u32TableBytes(this.#tables.get(t)!),
          )
        ),
        ...entries.map((t) =>
          this.#writeU32(header.redundantDirectoryOffsetSectors, t, this.redundantDirectory![t])
        ),
      ]);
    } catch (error) {
      for (const t of tables) this.#redundantStale.add(t);
      for (const t of entries) this.#redundantDirectoryStale.add(t);
      throw error;
    }
  }

  #writeU32(tableSector: number, index: number, value: number): Promise<void> {
    return this.file.write(tableSector * SECTOR_BYTES + index * 4, u32Bytes(value));
  }

  /**
   * Every answered write has its grain and primary entries in the file:
   * the redundant side catches up, then everything is made durable.
   */
  async flush(): Promise<void> {
    if (!this.writable) return;
    if (this.#redundantStale.size > 0 || this.#redundantDirectoryStale.size > 0) {
      await this.#redundantWriter.run();
    }
    await this.#sync.sync();
  }
}

/** One grain's share of a byte range: grain `g`, from `inGrainBytes` into it. */
interface GrainPiece {
  g: number;
  inGrainBytes: number;
  /** Where the piece starts in the caller's buffer. */
  doneBytes: number;
  lengthBytes: number;
}

// Splits `[offsetBytes, offsetBytes+lengthBytes)` at grain boundaries, in order.
function* grainPieces(
  offsetBytes: number,
  lengthBytes: number,
  grainBytes: number,
): Generator<GrainPiece> {
  let done = 0;
  while (done < lengthBytes) {
    const offset = offsetBytes + done;
    const g = Math.floor(offset / grainBytes);
    const inGrainBytes = offset - g * grainBytes;
    const length = Math.min(grainBytes - inGrainBytes, lengthBytes - done);
    yield { g, inGrainBytes, doneBytes: done, lengthBytes: length };
    done += length;
  }
}

function u32TableBytes(table: Uint32Array): Uint8Array {
  const bytes = new Uint8Array(table.length * 4);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < table.length; i += 1) view.setUint32(i * 4, table[i], true);
  return bytes;
}

function u32Bytes(value: number): Uint8Array {
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, value, true);
  return bytes;
}

/** Appends `run`, merging it into the last run when they continue each other. */
export function pushRun(runs: ExtentRun[], run: ExtentRun): void {
  const last = runs[runs.length - 1];
  if (
    last && last.kind === run.kind && last.offsetBytes + last.lengthBytes === run.offsetBytes &&
    (last.hostOffsetBytes === undefined) === (run.hostOffsetBytes === undefined) &&
    (last.hostOffsetBytes === undefined ||
      last.hostOffsetBytes + last.lengthBytes === run.hostOffsetBytes)
  ) {
    last.lengthBytes += run.lengthBytes;
    return;
  }
  runs.push(run);
}
