/**
 * The qcow (version 1) driver: QEMU's format with blktap's layout choices.
 *
 * Reads walk L1 → L2 → cluster; unallocated clusters fall through to the
 * backing image or read as zeros; compressed clusters (bit 63) are inflated.
 *
 * Writes never reuse space: new clusters and tables go at `fd_end` (the file
 * length at open, growing). In a trusted blktap image (Xen header with a
 * valid L1 checksum and `min_cluster_alloc` = L2 entries) a new L2 table
 * allocates its whole extent right behind it, as the 2006 tapdisk did:
 * every entry points at its slot (fresh file space, reading as zeros), so
 * sequential guest data is sequential on disk and later writes in that
 * 2 MiB need no metadata. Elsewhere (backed images, images QEMU made) a
 * new cluster is written whole (the rest copied from the backing image or
 * zeros) before its L2 entry is published in memory; L2 and L1
 * changes reach the file only at a commit: fdatasync, L2 blocks, fdatasync,
 * L1 blocks (+ checksum), fdatasync — so metadata never points at data that
 * is not durable, and FLUSH returns once everything it depends on is.
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
import {
  decodeEntry,
  decodeHeader,
  geometryOf,
  l1Checksum,
  QCOW_HEADER_BYTES,
  QcowFormatError,
  type QcowGeometry,
  type QcowHeader,
  XEN_FLAG_L1_BIG_ENDIAN,
} from "./header.ts";
import { L2Cache, L2Table } from "./l2_cache.ts";
import { inflateCluster } from "./compress.ts";
import { isZeroBytes } from "./zero.ts";
import { pushExtent, readBeneath, statusBeneath, zeroBeneath } from "../beneath.ts";
import { perUnit } from "../per_unit.ts";

/** Bytes read at open for the header, its extension and the backing name. */
const head_bytes = 4096;

/** One run of {@linkcode QcowDriver.mapRuns}. */
export interface QcowMapRun {
  offsetBytes: number;
  lengthBytes: number;
  kind: "hole" | "data" | "compressed";
  hostOffsetBytes?: number;
}

/** What the driver learned at open, also used by `check` and `info`. */
export interface QcowImage {
  header: QcowHeader;
  geometry: QcowGeometry;
  backingName?: string;
  /** L1 entries (L2 table offsets; 0 = none). */
  l1: number[];
  /** The L1 table as stored. */
  l1Bytes: Uint8Array;
  l1BigEndian: boolean;
  /** The Xen checksum matches the L1 table. */
  checksumValid: boolean;
  /** The first page (header, extension, backing name). */
  head: Uint8Array;
}

/** Reads and validates header, backing name and L1 table of an open file. */
export async function readQcowImage(file: ImageFile): Promise<QcowImage> {
  const fileBytes = file.lengthBytes();
  const head = new Uint8Array(Math.min(head_bytes, fileBytes));
  await file.read(0, head);
  const header = decodeHeader(file.path, head, fileBytes);
  const geometry = geometryOf(header);
  let backingName: string | undefined;
  if (header.backingFileOffset !== 0) {
    const name = new Uint8Array(header.backingFileSize);
    await file.read(header.backingFileOffset, name);
    backingName = new TextDecoder().decode(name).replace(/\0.*$/s, "");
    if (backingName === "") throw new QcowFormatError(file.path, "empty backing file name");
  }
  const l1Bytes = new Uint8Array(header.l1Entries * 8);
  await file.read(header.l1TableOffset, l1Bytes);
  const l1BigEndian = !header.xen || (header.xen.flags & XEN_FLAG_L1_BIG_ENDIAN) !== 0;
  const view = new DataView(l1Bytes.buffer);
  const l1: number[] = new Array(header.l1Entries);
  for (let i = 0; i < header.l1Entries; i += 1) {
    const hi = view.getUint32(i * 8 + (l1BigEndian ? 0 : 4), !l1BigEndian);
    const lo = view.getUint32(i * 8 + (l1BigEndian ? 4 : 0), !l1BigEndian);
    l1[i] = hi >= 0x200000 ? Infinity : hi * 2 ** 32 + lo;
  }
  const checksumValid = header.xen !== undefined && header.xen.checksum === l1Checksum(l1Bytes);
  return { header, geometry, backingName, l1, l1Bytes, l1BigEndian, checksumValid, head };
}

function _alignUp(value: number, unit: number): number {
  return Math.ceil(value / unit) * unit;
}

/** A qcow v1 image served as a block device. */
export class QcowDriver extends BlockDriverBase {
  /** Memory bound of each driver's L2 cache (tests lower it to force eviction). */
  static l2CacheBytesMax = 32 << 20;
  readonly format = "qcow";
  readonly sizeBytes: number;
  readonly capabilities: DriverCapabilities;
  readonly #file: ImageFile;
  readonly #parent?: BlockDriver;
  readonly #image: QcowImage;
  readonly #geo: QcowGeometry;
  readonly #l1: number[];
  /** L1 entries set in memory and not yet written. */
  readonly #l1Dirty = new Set<number>();
  readonly #cache: L2Cache;
  /** One allocator per L1 entry: allocation inside an L2 table is serialized. */
  readonly #allocLocks = new RangeLock();
  /** Whole extents are reserved per L2 table (blktap layout, trusted images only). */
  readonly #extentMode: boolean;
  /** The Xen checksum is ours to keep up to date. */
  readonly #xenTrusted: boolean;
  /** In extent mode, tables at or past this offset own their extent (BLKX record). */
  readonly #extentTablesFrom: number;
  #fdEnd: number;
  #flushTail: Promise<void> = Promise.resolve();
  #pendingFlush?: Promise<void>;
  #inflated?: { offsetBytes: number; data: Uint8Array };
  #closed = false;

  private constructor(file: ImageFile, image: QcowImage, parent?: BlockDriver) {
    super();
    this.#file = file;
    this.#image = image;
    this.#parent = parent;
    this.#geo = image.geometry;
    this.#l1 = image.l1.slice();
    this.sizeBytes = image.header.sizeBytes;
    this.#fdEnd = file.lengthBytes();
    const xen = image.header.xen;
    this.#xenTrusted = xen !== undefined && image.checksumValid;
    this.#extentMode = this.#xenTrusted && parent === undefined &&
      xen!.minClusterAlloc === this.#geo.l2Entries;
    this.#extentTablesFrom = image.header.extentTablesFromBytes ?? 0;
    const tablesMax = Math.floor(QcowDriver.l2CacheBytesMax / this.#geo.l2TableBytes);
    this.#cache = new L2Cache(tablesMax, (i) => this.#loadTable(i), () => this.#commitQueued());
    this.capabilities = imageFormatCapabilities(file.writable);
  }

  /** Opens `path`; the backing chain is opened through `context`. */
  static async open(
    path: string,
    options: ImageOpenOptions,
    context: OpenContext,
  ): Promise<QcowDriver> {
    const file = await context.openFile(path, options);
    let parent: BlockDriver | undefined;
    try {
      const image = await readQcowImage(file);
      _checkL1(file, image);
      if (image.backingName !== undefined) {
        parent = await context.openBacking(image.backingName, path);
      }
      return new QcowDriver(file, image, parent);
    } catch (error) {
      await parent?.close();
      await file.close();
      if (error instanceof QcowFormatError) throw new BlockError("EINVAL", error.message);
      throw error;
    }
  }

  get path(): string {
    return this.#file.path;
  }

  /** The opened parent, if any. */
  get parent(): BlockDriver | undefined {
    return this.#parent;
  }

  /** Cluster size in bytes. */
  get clusterBytes(): number {
    return this.#geo.clusterBytes;
  }

  /** Whether new L2 tables reserve their whole extent (for tests and `info`). */
  get extentMode(): boolean {
    return this.#extentMode;
  }

  // ---- tables ------------------------------------------------------------

  async #loadTable(l1Index: number): Promise<L2Table> {
    const offset = this.#l1[l1Index];
    const bytes = new Uint8Array(this.#geo.l2TableBytes);
    await this.#file.read(offset, bytes);
    return new L2Table(l1Index, offset, bytes);
  }

  /** The live (not evicted) table of an allocated L1 entry. */
  async #table(l1Index: number): Promise<L2Table> {
    for (;;) {
      const table = await this.#cache.get(l1Index);
      if (!table.evicted) return table;
    }
  }

  /**
   * Changes a cached table. The liveness check and the change happen in one
   * synchronous step: between an `await` returning a table and the code
   * after it, other tasks may evict that table, and a change to an evicted
   * copy would be lost.
   */
  async #mutateTable(l1Index: number, change: (table: L2Table) => void): Promise<void> {
    for (;;) {
      const table = await this.#cache.get(l1Index);
      if (!table.evicted) return change(table);
    }
  }

  /** Reserves a new L2 table (and its extent) at the end of the file. */
  async #newTable(l1Index: number): Promise<L2Table> {
    const { clusterBytes, l2TableBytes, l2Entries } = this.#geo;
    const offset = _alignUp(this.#fdEnd, Math.max(clusterBytes, 4096));
    let end = offset + _alignUp(l2TableBytes, clusterBytes);
    if (this.#extentMode) end += l2Entries * clusterBytes;
    this.#fdEnd = end;
    // The table (a hole, so zeros) and its extent lie inside the file
    // before any L1 entry can point at them; QEMU allocates past the end.
    if (end > this.#file.lengthBytes()) await this.#file.truncate(end);
    const table = new L2Table(l1Index, offset, new Uint8Array(l2TableBytes));
    if (this.#extentMode) {
      // blktap's layout: the whole extent is allocated at once, every entry
      // pointing at its slot. The slots are fresh file space (holes), so
      // they read as zeros — what an unwritten standalone cluster holds —
      // and later writes in this 2 MiB go in place, with no metadata.
      const first = l1Index * l2Entries;
      const clusters = Math.min(l2Entries, Math.ceil(this.sizeBytes / clusterBytes) - first);
      for (let k = 0; k < clusters; k += 1) table.set(k, this.#slotOf(table, k));
    }
    await this.#cache.insert(table);
    this.#l1[l1Index] = offset;
    this.#l1Dirty.add(l1Index);
    return table;
  }

  #slotOf(table: L2Table, index: number): number {
    const { clusterBytes, l2TableBytes } = this.#geo;
    return table.offsetBytes + _alignUp(l2TableBytes, clusterBytes) + index * clusterBytes;
  }

  /**
   * A new cluster at the end of the file. `pageStart`: the cluster begins a
   * guest page, so start a host page too — with 512-byte clusters a 4 KiB
   * guest write then lands on one aligned 4 KiB write (no read-modify-write
   * under O_DIRECT); the skipped bytes are never written, a hole.
   */
  #allocateCluster(pageStart: boolean): number {
    const { clusterBytes } = this.#geo;
    const unit = pageStart ? Math.max(clusterBytes, 4096) : clusterBytes;
    const offset = _alignUp(this.#fdEnd, unit);
    this.#fdEnd = offset + this.#geo.clusterBytes;
    return offset;
  }

  #entryError(guestOffset: number, detail: string): BlockError {
    return new BlockError("EIO", `${this.path}: cluster at guest offset ${guestOffset}: ${detail}`);
  }

  /** Host offset of a plain cluster entry, validated. */
  #plainOffset(hostOffset: number, guestOffset: number): number {
    if (!Number.isSafeInteger(hostOffset) || hostOffset % 512 !== 0) {
      throw this.#entryError(guestOffset, `invalid cluster offset ${hostOffset}`);
    }
    // A corrupt entry must not turn a guest write into a header or L1 write.
    const { l1TableOffset, l1Entries } = this.#image.header;
    if (hostOffset < Math.max(QCOW_HEADER_BYTES, l1TableOffset + l1Entries * 8)) {
      throw this.#entryError(guestOffset, `cluster offset ${hostOffset} points into the metadata`);
    }
    return hostOffset;
  }

  // ---- read ---------------------------------------------------------------

  protected _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    return perUnit(
      offsetBytes,
      buffer,
      this.#geo.l2SpanBytes,
      (l1, pos, out) => this.#readInTable(l1, pos, out),
    );
  }

  async #readInTable(l1Index: number, offsetBytes: number, out: Uint8Array): Promise<void> {
    if (this.#l1[l1Index] === 0) return await readBeneath(this.#parent, offsetBytes, out);
    const table = await this.#table(l1Index);
    const tasks: Promise<void>[] = [];
    try {
      this.#planRead(table, offsetBytes, out, tasks);
    } catch (error) {
      await Promise.allSettled(tasks); // none left running unobserved
      throw error;
    }
    await Promise.all(tasks);
  }

  /** Starts the reads of one table's range; throws on a bad entry. */
  #planRead(table: L2Table, offsetBytes: number, out: Uint8Array, tasks: Promise<void>[]) {
    const { clusterBytes, l2Entries, clusterBits } = this.#geo;
    const end = offsetBytes + out.byteLength;
    // Runs of clusters read together: unallocated, or contiguous on disk.
    let runStart = offsetBytes;
    let runHost = -1; // -1: unallocated run; else host offset of runStart
    const flush = (runEnd: number) => {
      if (runEnd <= runStart) return;
      const slice = out.subarray(runStart - offsetBytes, runEnd - offsetBytes);
      tasks.push(
        runHost < 0 ? readBeneath(this.#parent, runStart, slice) : this.#file.read(runHost, slice),
      );
    };
    for (let pos = offsetBytes; pos < end;) {
      const clusterStart = pos - (pos % clusterBytes);
      const clusterEnd = Math.min(end, clusterStart + clusterBytes);
      const index = (clusterStart / clusterBytes) % l2Entries;
      const entry = decodeEntry(table.hi(index), table.lo(index), clusterBits);
      if (entry.compressed) {
        flush(pos);
        const slice = out.subarray(pos - offsetBytes, clusterEnd - offsetBytes);
        tasks.push(this.#readCompressed(entry.offsetBytes, entry.compressedBytes, pos, slice));
        runStart = clusterEnd;
        runHost = -1;
      } else if (entry.offsetBytes === 0) {
        if (runHost >= 0) {
          flush(pos);
          runStart = pos;
          runHost = -1;
        }
      } else {
        const host = this.#plainOffset(entry.offsetBytes, clusterStart) + (pos - clusterStart);
        if (runHost < 0 || runHost + (pos - runStart) !== host) {
          flush(pos);
          runStart = pos;
          runHost = host;
        }
      }
      pos = clusterEnd;
    }
    flush(end);
  }

  /** What lies beneath this image at a range: the parent's bytes or zeros. */

  async #inflate(hostOffset: number, compressedBytes: number, guest: number): Promise<Uint8Array> {
    if (this.#inflated?.offsetBytes === hostOffset) return this.#inflated.data;
    if (!Number.isFinite(hostOffset) || compressedBytes === 0) {
      throw this.#entryError(guest, `invalid compressed cluster at ${hostOffset}`);
    }
    const packed = new Uint8Array(compressedBytes);
    await this.#file.read(hostOffset, packed);
    const data = inflateCluster(packed, this.#geo.clusterBytes);
    if (!data) throw this.#entryError(guest, `compressed cluster at ${hostOffset} is corrupt`);
    this.#inflated = { offsetBytes: hostOffset, data };
    return data;
  }

  async #readCompressed(host: number, size: number, pos: number, out: Uint8Array) {
    const clusterBytes = this.#geo.clusterBytes;
    const data = await this.#inflate(host, size, pos);
    const inner = pos % clusterBytes;
    out.set(data.subarray(inner, inner + out.byteLength));
  }

  // ---- write --------------------------------------------------------------

  protected _write(offsetBytes: number, data: Uint8Array): Promise<void> {
    return perUnit(
      offsetBytes,
      data,
      this.#geo.l2SpanBytes,
      (l1, pos, piece) => this.#writeInTable(l1, pos, piece),
    );
  }

  async #writeInTable(l1Index: number, offsetBytes: number, data: Uint8Array): Promise<void> {
    if (this.#l1[l1Index] !== 0) {
      const direct = this.#writeAllocated(await this.#table(l1Index), offsetBytes, data);
      if (direct) {
        await direct;
        return;
      }
    }
    // Zeros over a region with no table and nothing beneath: nothing to do.
    if (this.#l1[l1Index] === 0 && !this.#parent && isZeroBytes(data)) return;
    const release = await this.#allocLocks.acquire(l1Index, l1Index + 1);
    try {
      const table = this.#l1[l1Index] === 0
        ? await this.#newTable(l1Index)
        : await this.#table(l1Index);
      await this.#writeAllocating(table, offsetBytes, data);
    } finally {
      release();
    }
  }

  /** Writes in place when every cluster is allocated plain; else undefined. */
  #writeAllocated(table: L2Table, offsetBytes: number, data: Uint8Array) {
    const { clusterBytes, l2Entries } = this.#geo;
    const end = offsetBytes + data.byteLength;
    const runs: { host: number; start: number; end: number }[] = [];
    for (let pos = offsetBytes; pos < end;) {
      const clusterStart = pos - (pos % clusterBytes);
      const clusterEnd = Math.min(end, clusterStart + clusterBytes);
      const index = (clusterStart / clusterBytes) % l2Entries;
      const hi = table.hi(index);
      if ((hi & 0x80000000) !== 0 || table.isZero(index)) return undefined;
      const host = this.#plainOffset(hi * 2 ** 32 + table.lo(index), clusterStart) +
        (pos - clusterStart);
      const last = runs[runs.length - 1];
      if (last && last.host + (last.end - last.start) === host) last.end = clusterEnd;
      else runs.push({ host, start: pos, end: clusterEnd });
      pos = clusterEnd;
    }
    return Promise.all(
      runs.map((r) =>
        this.#file.write(r.host, data.subarray(r.start - offsetBytes, r.end - offsetBytes))
      ),
    );
  }

  /**
   * Writes a range of one L2 table while holding its allocator: allocated
   * clusters in place, new ones whole (copy-on-write of what lies beneath),
   * then publishes the new entries.
   */
  async #writeAllocating(table: L2Table, offsetBytes: number, data: Uint8Array) {
    const writes: Promise<void>[] = [];
    const fresh: { index: number; host: number; bytes: Uint8Array }[] = [];
    try {
      await this.#planAllocatingWrite(table, offsetBytes, data, writes, fresh);
    } catch (error) {
      await Promise.allSettled(writes); // none left running unobserved
      throw error;
    }
    writes.push(this.#writeClusters(fresh));
    await Promise.all(writes);
    if (fresh.length > 0) {
      await this.#mutateTable(table.l1Index, (live) => {
        for (const f of fresh) live.set(f.index, f.host);
      });
    }
  }

  async #planAllocatingWrite(
    table: L2Table,
    offsetBytes: number,
    data: Uint8Array,
    writes: Promise<void>[],
    fresh: { index: number; host: number; bytes: Uint8Array }[],
  ): Promise<void> {
    const { clusterBytes, l2Entries, clusterBits } = this.#geo;
    const end = offsetBytes + data.byteLength;
    for (let pos = offsetBytes; pos < end;) {
      const clusterStart = pos - (pos % clusterBytes);
      const clusterEnd = Math.min(end, clusterStart + clusterBytes);
      const index = (clusterStart / clusterBytes) % l2Entries;
      const slice = data.subarray(pos - offsetBytes, clusterEnd - offsetBytes);
      const entry = decodeEntry(table.hi(index), table.lo(index), clusterBits);
      if (!entry.compressed && entry.offsetBytes !== 0) {
        const host = this.#plainOffset(entry.offsetBytes, clusterStart);
        writes.push(this.#file.write(host + (pos - clusterStart), slice));
      } else {
        const bytes = await this.#newClusterBytes(entry, clusterStart, pos, slice);
        // Host offsets are given below, all at once: other writers allocate
        // during the awaits, and this write's clusters should stay adjacent.
        if (bytes) fresh.push({ index, host: entry.compressed ? -1 : 0, bytes });
      }
      pos = clusterEnd;
    }
    const ownsExtent = this.#extentMode && table.offsetBytes >= this.#extentTablesFrom;
    for (const f of fresh) {
      const clusterStart = (table.l1Index * l2Entries + f.index) * clusterBytes;
      f.host = ownsExtent && f.host === 0
        ? this.#slotOf(table, f.index)
        : this.#allocateCluster(clusterStart % 4096 === 0);
    }
  }

  /**
   * The full content of a cluster about to be allocated: the write merged
   * over what lies beneath (compressed data, the parent, or zeros). Undefined
   * when the cluster would hold only zeros and nothing beneath shows through,
   * so it need not be allocated.
   */
  async #newClusterBytes(
    entry: { offsetBytes: number; compressed: boolean; compressedBytes: number },
    clusterStart: number,
    pos: number,
    slice: Uint8Array,
  ): Promise<Uint8Array | undefined> {
    const clusterBytes = this.#geo.clusterBytes;
    let bytes: Uint8Array;
    if (slice.byteLength === clusterBytes) {
      bytes = slice;
    } else {
      bytes = new Uint8Array(clusterBytes);
      if (entry.compressed) {
        bytes.set(await this.#inflate(entry.offsetBytes, entry.compressedBytes, clusterStart));
      } else {
        const visible = Math.min(clusterBytes, this.sizeBytes - clusterStart);
        await readBeneath(this.#parent, clusterStart, bytes.subarray(0, visible));
      }
      bytes.set(slice, pos - clusterStart);
    }
    if (entry.compressed || !isZeroBytes(bytes)) return bytes;
    if (!this.#parent) return undefined;
    return (await zeroBeneath(this.#parent, clusterStart, clusterBytes)) ? undefined : bytes;
  }

  /** Writes new clusters, one request per run of adjacent host offsets. */
  async #writeClusters(fresh: { host: number; bytes: Uint8Array }[]): Promise<void> {
    const clusterBytes = this.#geo.clusterBytes;
    const tasks: Promise<void>[] = [];
    for (let i = 0; i < fresh.length;) {
      let j = i + 1;
      while (j < fresh.length && fresh[j].host === fresh[j - 1].host + clusterBytes) j += 1;
      tasks.push(this.#file.write(fresh[i].host, _joined(fresh.slice(i, j).map((f) => f.bytes))));
      i = j;
    }
    await Promise.all(tasks);
  }

  // ---- flush / commit -----------------------------------------------------

  protected _flush(): Promise<void> {
    // A flush that has not started yet covers every caller arriving before it starts.
    if (this.#pendingFlush) return this.#pendingFlush;
    const run = this.#flushTail.then(() => {
      this.#pendingFlush = undefined;
      return this.#commit();
    });
    this.#pendingFlush = run;
    this.#flushTail = run.catch(() => {});
    return run;
  }

  /** A commit queued behind any running one (the cache uses it to clean tables). */
  #commitQueued(): Promise<void> {
    return this._flush();
  }

  /**
   * Makes everything published so far durable, in dependency order. Only
   * what was published before the first fdatasync is written, so no table
   * or entry can point at data that fdatasync did not cover.
   */
  async #commit(): Promise<void> {
    if (!this.#file.writable) return;
    const l2Blocks = this.#cache.snapshotDirty();
    const l1Indexes = [...this.#l1Dirty];
    this.#l1Dirty.clear();
    const l1Values = l1Indexes.map((i) => this.#l1[i]);
    let l2Failed = true;
    try {
      await this.#file.flush();
      if (l2Blocks.length > 0) {
        await Promise.all(l2Blocks.map((b) => this.#file.write(b.fileOffsetBytes, b.bytes)));
        await this.#file.flush();
      }
      l2Failed = false;
    } catch (error) {
      for (const i of l1Indexes) this.#l1Dirty.add(i);
      throw error;
    } finally {
      this.#cache.settle(l2Blocks, l2Failed);
    }
    if (l1Indexes.length > 0) {
      try {
        await this.#writeL1(l1Indexes, l1Values);
      } catch (error) {
        for (const i of l1Indexes) this.#l1Dirty.add(i);
        throw error;
      }
    }
  }

  async #writeL1(indexes: number[], values: number[]): Promise<void> {
    const { l1Bytes, l1BigEndian, header } = this.#image;
    const view = new DataView(l1Bytes.buffer);
    const blocks = new Set<number>();
    indexes.forEach((index, k) => {
      const value = values[k];
      const hi = Math.floor(value / 2 ** 32);
      view.setUint32(index * 8 + (l1BigEndian ? 0 : 4), hi, !l1BigEndian);
      view.setUint32(index * 8 + (l1BigEndian ? 4 : 0), value >>> 0, !l1BigEndian);
      blocks.add(Math.floor((index * 8) / 4096));
    });
    await Promise.all([...blocks].map((block) => {
      const start = block * 4096;
      const bytes = l1Bytes.slice(start, Math.min(start + 4096, l1Bytes.byteLength));
      return this.#file.write(header.l1TableOffset + start, bytes);
    }));
    if (this.#xenTrusted) {
      // blktap's checksum follows the L1 table; a crash between the two
      // leaves a stale checksum, which only turns the extent layout off.
      const head = this.#image.head;
      new DataView(head.buffer, head.byteOffset).setUint32(52, l1Checksum(l1Bytes));
      await this.#file.write(0, head.slice(0, Math.min(head.byteLength, 4096)));
    }
    await this.#file.flush();
  }

  // ---- block status -------------------------------------------------------

  protected override async _blockStatus(
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<Extent[]> {
    const extents: Extent[] = [];
    const push = (e: Extent) => pushExtent(extents, e);
    const { clusterBytes, l2Entries, l2SpanBytes } = this.#geo;
    const end = offsetBytes + lengthBytes;
    for (let pos = offsetBytes; pos < end;) {
      const l1Index = Math.floor(pos / l2SpanBytes);
      const tableEnd = Math.min(end, (l1Index + 1) * l2SpanBytes);
      if (this.#l1[l1Index] === 0) {
        for (const e of await statusBeneath(this.#parent, pos, tableEnd - pos)) push(e);
        pos = tableEnd;
        continue;
      }
      const table = await this.#table(l1Index);
      while (pos < tableEnd) {
        let runEnd = Math.min(tableEnd, pos - (pos % clusterBytes) + clusterBytes);
        const index = Math.floor(pos / clusterBytes) % l2Entries;
        const allocated = !table.isZero(index);
        while (runEnd < tableEnd) {
          const next = Math.floor(runEnd / clusterBytes) % l2Entries;
          if (table.isZero(next) === allocated) break;
          runEnd = Math.min(tableEnd, runEnd + clusterBytes);
        }
        if (allocated) {
          push({ offsetBytes: pos, lengthBytes: runEnd - pos, hole: false, zero: false });
        } else for (const e of await statusBeneath(this.#parent, pos, runEnd - pos)) push(e);
        pos = runEnd;
      }
    }
    return extents;
  }

  /**
   * This layer alone, with host offsets (for `blktap map`, as `qemu-img map`
   * prints them): unallocated runs are holes, plain clusters data at their
   * file offset, compressed clusters data without one.
   */
  async mapRuns(offsetBytes: number, lengthBytes: number): Promise<QcowMapRun[]> {
    this.checkRange(offsetBytes, lengthBytes);
    const runs: QcowMapRun[] = [];
    const { clusterBytes, l2Entries, l2SpanBytes, clusterBits } = this.#geo;
    const end = offsetBytes + lengthBytes;
    let table: L2Table | undefined;
    let tableIndex = -1;
    for (let pos = offsetBytes; pos < end;) {
      const l1Index = Math.floor(pos / l2SpanBytes);
      if (l1Index !== tableIndex) {
        tableIndex = l1Index;
        table = this.#l1[l1Index] === 0 ? undefined : await this.#table(l1Index);
      }
      const clusterEnd = Math.min(end, pos - (pos % clusterBytes) + clusterBytes);
      const index = Math.floor(pos / clusterBytes) % l2Entries;
      const entry = table ? decodeEntry(table.hi(index), table.lo(index), clusterBits) : undefined;
      const run: QcowMapRun = { offsetBytes: pos, lengthBytes: clusterEnd - pos, kind: "hole" };
      if (entry?.compressed) run.kind = "compressed";
      else if (entry && entry.offsetBytes !== 0) {
        run.kind = "data";
        run.hostOffsetBytes = entry.offsetBytes + (pos % clusterBytes);
      }
      const last = runs[runs.length - 1];
      const joins = last && last.kind === run.kind &&
        (last.hostOffsetBytes === undefined
          ? run.hostOffsetBytes === undefined
          : last.hostOffsetBytes + last.lengthBytes === run.hostOffsetBytes);
      if (joins) last.lengthBytes += run.lengthBytes;
      else runs.push(run);
      pos = clusterEnd;
    }
    return runs;
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

/** Rejects L1 entries that cannot be L2 tables of this file. */
function _checkL1(file: ImageFile, image: QcowImage): void {
  const fileBytes = file.lengthBytes();
  image.l1.forEach((offset, i) => {
    if (offset === 0) return;
    if (offset % 512 !== 0 || offset + image.geometry.l2TableBytes > fileBytes) {
      throw new QcowFormatError(
        file.path,
        `L1 entry ${i} points at ${offset}, not an L2 table inside the file (${fileBytes} bytes)`,
      );
    }
  });
}

function _joined(parts: Uint8Array[]): Uint8Array {
  if (parts.length === 1) return parts[0];
  const first = parts[0];
  // Consecutive slices of one caller buffer need no copy.
  let contiguous = true;
  for (let i = 1; i < parts.length && contiguous; i += 1) {
    const prev = parts[i - 1];
    contiguous = parts[i].buffer === first.buffer &&
      parts[i].byteOffset === prev.byteOffset + prev.byteLength;
  }
  const total = parts.reduce((n, p) => n + p.byteLength, 0);
  if (contiguous) return new Uint8Array(first.buffer, first.byteOffset, total);
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}
