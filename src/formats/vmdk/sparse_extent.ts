/**
 * One hosted sparse extent (`KDMV`): a grain directory (GD) of grain table
 * (GT) sectors, each GT mapping `grainTableEntries` grains to file sectors;
 * 0 means unallocated, 1 (with the zero-grain flag) a zeroed grain.
 *
 * Writes allocate grains at the end of the file. The whole grain (new
 * bytes, zeros elsewhere) is written first; its entry then goes into the
 * cached table only (reads see it at once) and the table is marked dirty.
 * `flush` puts the metadata on disk in dependency order (DESIGN.md §4
 * rules 1–3), as QEMU's qcow2 L2 cache does:
 *   1. fdatasync: every grain (and zeroed new table) named by the snapshot
 *      of dirty entries taken when the flush began is durable;
 *   2. redundant tables and redundant directory entries, fdatasync;
 *   3. primary tables and directory entries, fdatasync.
 * A crash at any point leaves entries only the redundant side names (leaks
 * that `check` reports and `--repair` clears) and never an entry pointing
 * at bytes not yet durable; writes completed before the last completed
 * flush are all there. Grain tables are preallocated when the image is
 * created (as QEMU and VMware do); where a directory entry is 0, a zeroed
 * table pair is allocated like a grain and its directory entries are dirty
 * metadata like table entries. `close` flushes.
 *
 * Concurrency: one allocation per grain (`#allocating`) and per table
 * (`#allocatingTables`) at a time; a second write to the same new grain
 * waits, then overwrites in place. Tables in use by a write are pinned and
 * dirty tables are never evicted, so the cache cannot reload a stale copy.
 * Flushes run one at a time. The number of dirty tables is bounded: past
 * `dirty_tables_max` an allocating write first flushes.
 * @module
 */
import { inflateSync } from "node:zlib";
import { BlockError } from "../driver.ts";
import type { ImageFile } from "../image_file.ts";
import { giveBounce, takeBounce } from "../raw/bounce_pool.ts";
import {
  decodeSparseHeader,
  directoryAtEnd,
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
/** First fallocate reserve, in grains; it doubles up to the maximum below. */
const preallocation_grains_min = 16;
const preallocation_chunk_bytes_max = 32 << 20;
/** Dirty grain tables allowed before an allocating write forces a flush. */
const dirty_tables_max = 1024;
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
  /** Tables whose cached entries are newer than the disk. */
  readonly #dirtyTables = new Set<number>();
  /** Directory entries (table indexes) newer in memory than on disk. */
  readonly #dirtyDirectory = new Set<number>();
  #flushing: Promise<void> = Promise.resolve();
  readonly #inflated = new Map<number, Uint8Array>();
  #nextGrainBytes: number;
  /** End of the space reserved with fallocate ahead of allocations. */
  #preallocatedEnd: number;
  #preallocationChunkBytes: number;
  #preallocation: Promise<void> = Promise.resolve();
  #preallocationWorks = true;

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
    const end = Math.max(file.lengthBytes(), layout.header.overheadSectors * SECTOR_BYTES);
    this.#nextGrainBytes = Math.ceil(end / layout.grainBytes) * layout.grainBytes;
    this.#preallocatedEnd = this.#nextGrainBytes;
    this.#preallocationChunkBytes = preallocation_grains_min * layout.grainBytes;
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
      if (!this.#pins.has(t) && !this.#dirtyTables.has(t)) this.#tables.delete(t);
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
      const kind = this.#kindOf(table[j]);
      if (kind === "data") {
        await this.file.write(table[j] * SECTOR_BYTES + inGrain, data);
        return;
      }
      let finished!: () => void;
      this.#allocating.set(g, new Promise<void>((resolve) => (finished = resolve)));
      try {
        await this.#allocate(table, t, j, inGrain, data);
      } finally {
        this.#allocating.delete(g);
        finished();
      }
    } finally {
      this.#unpin(t);
    }
  }

  /**
   * Gives grain table `t` a place: zeroed tables (primary and redundant)
   * written at the end of the file, then the directory entries set in
   * memory and marked dirty; `flush` writes them once the zeros are durable.
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
      const { grainBytes, tableBytes } = this.layout;
      const tableSlotBytes = Math.ceil(tableBytes / SECTOR_BYTES) * SECTOR_BYTES;
      const slotBytes = Math.ceil((2 * tableSlotBytes) / grainBytes) * grainBytes;
      const hostOffset = await this.#reserve(slotBytes);
      const tableSector = hostOffset / SECTOR_BYTES;
      const redundantSector = (hostOffset + tableSlotBytes) / SECTOR_BYTES;
      if (redundantSector > 0xffffffff) {
        throw this.#error("EIO", "file too large for 32-bit offsets");
      }
      const bounce = takeBounce(slotBytes);
      try {
        const zeros = bounce.bytes.subarray(0, slotBytes);
        zeros.fill(0);
        await this.file.write(hostOffset, zeros);
      } finally {
        giveBounce(bounce);
      }
      // Published in memory now, on disk by the next flush (after the zeros are durable).
      if (this.redundantDirectory) this.redundantDirectory[t] = redundantSector;
      this.directory[t] = tableSector;
      this.#tables.set(t, new Uint32Array(this.layout.header.grainTableEntries));
      this.#dirtyDirectory.add(t);
      this.#evict();
    } finally {
      this.#allocatingTables.delete(t);
      finished();
    }
  }

  /**
   * Takes the next `slotBytes` at the end of the file. Space is reserved
   * with fallocate in growing chunks first: O_DIRECT writes that extend a
   * file are serialised by file systems such as ext4, writes inside it are
   * not. The unused reserve is cut off at close (after a crash it is a
   * leak).
   */
  async #reserve(slotBytes: number): Promise<number> {
    const hostOffset = this.#nextGrainBytes;
    this.#nextGrainBytes += slotBytes;
    while (this.#preallocationWorks && this.#nextGrainBytes > this.#preallocatedEnd) {
      const from = this.#preallocatedEnd;
      const chunk = this.#preallocationChunkBytes;
      this.#preallocatedEnd += chunk;
      this.#preallocationChunkBytes = Math.min(2 * chunk, preallocation_chunk_bytes_max);
      this.#preallocation = this.#preallocation.then(() =>
        this.file.allocate(from, chunk).catch(() => {
          this.#preallocationWorks = false; // not a regular file, or no fallocate: plain writes
        })
      );
    }
    await this.#preallocation;
    return hostOffset;
  }

  /** Cuts the unused preallocated space off the end of the file. */
  async trimReserve(): Promise<void> {
    await this.#preallocation;
    if (!this.writable || this.#preallocatedEnd <= this.#nextGrainBytes) return;
    if (this.file.lengthBytes() > this.#nextGrainBytes) {
      await this.file.truncate(this.#nextGrainBytes);
    }
    this.#preallocatedEnd = this.#nextGrainBytes;
  }

  // Writes the whole grain, then publishes its entry in the cached table (dirty until flush).
  async #allocate(table: Uint32Array, t: number, j: number, inGrain: number, data: Uint8Array) {
    const grainBytes = this.layout.grainBytes;
    const hostOffset = await this.#reserve(grainBytes);
    const sector = hostOffset / SECTOR_BYTES;
    if (sector > 0xffffffff) throw this.#error("EIO", "file too large for 32-bit grain entries");
    const bounce = takeBounce(grainBytes);
    try {
      const grain = bounce.bytes.subarray(0, grainBytes);
      grain.fill(0);
      grain.set(data, inGrain);
      await this.file.write(hostOffset, grain);
    } finally {
      giveBounce(bounce);
    }
    // Invariant (DESIGN.md §4 rule 1): an entry is published only for bytes already written.
    if (hostOffset + grainBytes > this.file.lengthBytes()) {
      throw this.#error(
        "EIO",
        `grain ${t}/${j} written past the file's end: refusing to publish it`,
      );
    }
    table[j] = sector;
    this.#dirtyTables.add(t);
    if (this.#dirtyTables.size > dirty_tables_max) await this.flush();
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

  /** Makes every completed write durable, metadata after the data it names. */
  flush(): Promise<void> {
    const run = this.#flushing.then(() => this.#flushOnce());
    this.#flushing = run.catch(() => {});
    return run;
  }

  async #flushOnce(): Promise<void> {
    if (!this.writable) return;
    // The snapshot holds only entries whose grains were written before this point.
    const tables = [...this.#dirtyTables].map((t) => ({ t, image: this.#tables.get(t)!.slice() }));
    const directory = [...this.#dirtyDirectory];
    this.#dirtyTables.clear();
    this.#dirtyDirectory.clear();
    try {
      await this.file.flush();
      if (tables.length === 0 && directory.length === 0) return;
      const header = this.layout.header;
      if (this.redundantDirectory) {
        await this.#writeMetadata(
          tables.map(({ t, image }) => [this.redundantDirectory![t], image]),
          header.redundantDirectoryOffsetSectors,
          directory.map((t) => [t, this.redundantDirectory![t]]),
        );
      }
      await this.#writeMetadata(
        tables.map(({ t, image }) => [this.directory[t], image]),
        header.directoryOffsetSectors,
        directory.map((t) => [t, this.directory[t]]),
      );
    } catch (error) {
      for (const { t } of tables) this.#dirtyTables.add(t);
      for (const t of directory) this.#dirtyDirectory.add(t);
      throw error;
    }
  }

  // Writes table images and directory entries of one side, then fdatasync.
  async #writeMetadata(
    tables: [sector: number, image: Uint32Array][],
    directorySector: number,
    entries: [t: number, sector: number][],
  ): Promise<void> {
    await Promise.all([
      ...tables.map(([sector, image]) =>
        this.file.write(sector * SECTOR_BYTES, u32TableBytes(image))
      ),
      ...entries.map(([t, sector]) =>
        this.file.write(directorySector * SECTOR_BYTES + t * 4, u32Bytes(sector))
      ),
    ]);
    await this.file.flush();
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
