/**
 * The qcow (version 1) driver: QEMU's format with blktap's layout choices.
 *
 * Reads walk L1 → L2 → cluster; unallocated clusters fall through to the
 * backing image or read as zeros; compressed clusters (bit 63) are inflated.
 *
 * Writes never reuse space: new clusters and tables are taken at the end of
 * the file (src/formats/append_space.ts), space that reads as zeros until
 * written. In a trusted blktap image (Xen header with a valid L1 checksum
 * and `min_cluster_alloc` = L2 entries) a new L2 table allocates its whole
 * extent right behind it, as the 2006 tapdisk did: every entry points at
 * its slot, so sequential guest data is sequential on disk and later
 * writes in that 2 MiB need no metadata. Elsewhere a new cluster is
 * written whole (the rest copied from what lies beneath) before its entry
 * is set.
 *
 * Crash contract (driver.ts, `write`): a write is answered once its data
 * and every table entry it needs are in the file, so a killed process
 * loses nothing it answered. For power loss, metadata never reaches the
 * disk before what it points at wherever a crash could show wrong bytes:
 * a new cluster whose previous content was not zeros (backing data, a
 * compressed cluster) is made durable by a group-committed fdatasync
 * before its L2 entry is written; new space is durable in the file's
 * length before anything points into it. A cluster in fresh space of an
 * image without a backing file needs no barrier: if its entry lands before
 * its data, it reads as zeros, which it was (tests/_helpers/crash_sim.ts
 * checks every such crash point).
 *
 * The Xen header's dirty flag marks a read-write open; a read-write open
 * that finds it set (the last writer died) first reclaims what that
 * writer allocated and never linked (reclaim.ts). blktap's Xen checksum
 * is written at a clean close, as the 2006 tapdisk did.
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
import { AppendSpace } from "../append_space.ts";
import { GroupSync } from "../group_commit.ts";
import {
  decodeEntry,
  QCOW_HEADER_BYTES,
  QcowFormatError,
  type QcowGeometry,
  XEN_FLAG_DIRTY,
} from "./header.ts";
import { L2Table } from "./l2_cache.ts";
import { TableCache } from "../table_cache.ts";
import type { L1Table } from "./l1_table.ts";
import { inflateCluster } from "../cluster_compress.ts";
import {
  type MapRun,
  openLayer,
  pushExtent,
  pushMapRun,
  readBeneath,
  statusBeneath,
  zeroBeneath,
} from "../beneath.ts";
import { isZeroBytes } from "../zero_bytes.ts";
import { joinBytes } from "../join_bytes.ts";
import { perUnit } from "../per_unit.ts";
import {
  hasExtentLayout,
  isDirty,
  l1EntryProblem,
  type QcowImage,
  readQcowImage,
} from "./qcow_image.ts";
import { reclaimAtOpen } from "./reclaim.ts";

export { type QcowImage, readQcowImage } from "./qcow_image.ts";

/** A cluster being allocated by a write: its content and where it goes. */
interface FreshCluster {
  index: number;
  /** Guest cluster number (the key of the allocation claim). */
  guestCluster: number;
  host: number;
  bytes: Uint8Array;
  /** It replaces a compressed cluster (never goes to an extent slot). */
  wasCompressed: boolean;
  /** Its previous content was not zeros: data must be durable before the entry. */
  barrier: boolean;
  /** Ends the claim (other writes to the cluster proceed). */
  release: () => void;
}

/** What one allocating write does inside one L2 table. */
interface AllocationPlan {
  inPlace: { host: number; bytes: Uint8Array }[];
  fresh: FreshCluster[];
  /** An allocated cluster written in place whose entry is not yet in the file. */
  settle: boolean;
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
  readonly #l1: L1Table;
  readonly #cache: TableCache<L2Table>;
  /** One allocator per L1 entry: planning an allocation inside an L2 table is serialized. */
  readonly #allocLocks = new RangeLock();
  /** Clusters being allocated (guest cluster number → settles when linked or abandoned). */
  readonly #claims = new Map<number, Promise<void>>();
  readonly #sync: GroupSync;
  readonly #space: AppendSpace;
  /** Whole extents are reserved per L2 table (blktap layout, trusted images only). */
  readonly #extentMode: boolean;
  /** The Xen checksum is ours to keep up to date (written at close). */
  readonly #xenTrusted: boolean;
  /** In extent mode, tables at or past this offset own their extent (BLKX record). */
  readonly #extentTablesFrom: number;
  #inflated?: { offsetBytes: number; data: Uint8Array };
  /** The Xen dirty flag is durably set (before the first allocation: only allocations leak). */
  #markedDirty: Promise<void> | undefined;
  #closed = false;

  private constructor(file: ImageFile, image: QcowImage, parent?: BlockDriver) {
    super();
    this.#file = file;
    this.#image = image;
    this.#parent = parent;
    this.#geo = image.geometry;
    this.#l1 = image.l1;
    this.sizeBytes = image.header.virtualSizeBytes;
    this.#sync = new GroupSync(() => file.flush());
    this.#space = new AppendSpace(file, this.#sync, file.lengthBytes(), "sparse");
    this.#xenTrusted = image.header.xen !== undefined && image.checksumValid;
    this.#extentMode = hasExtentLayout(image) && parent === undefined;
    this.#extentTablesFrom = image.header.extentTablesFromBytes ?? 0;
    const tablesMax = Math.floor(QcowDriver.l2CacheBytesMax / this.#geo.l2TableBytes);
    this.#cache = new TableCache<L2Table>(tablesMax, (i) => this.#loadTable(i));
    this.capabilities = imageFormatCapabilities(file.writable);
  }

  /** Opens `path`; the backing chain is opened through `context`. */
  static async open(
    path: string,
    options: ImageOpenOptions,
    context: OpenContext,
  ): Promise<QcowDriver> {
    const file = await context.openFile(path, options);
    return await openLayer(file, QcowFormatError, async (adopt) => {
      const image = await readQcowImage(file);
      if (image.l1.whole) await _checkL1(file, image);
      const name = image.backingName;
      const parent = name === undefined
        ? undefined
        : await adopt(() => context.openBacking(name, path));
      if (file.writable) await _openForWriting(file, image);
      return new QcowDriver(file, image, parent);
    });
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

  /** fdatasync calls so far (for tests and benchmarks). */
  get syncs(): number {
    return this.#sync.syncs;
  }

  // ---- tables ------------------------------------------------------------

  async #loadTable(l1Index: number): Promise<L2Table> {
    const offset = await this.#l1.get(l1Index);
    const problem = l1EntryProblem(this.#image, this.#file.lengthBytes(), l1Index, offset);
    if (problem) throw new BlockError("EIO", `${this.path}: ${problem}`);
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

  /** The live table, pinned in the cache until the caller drops its pin. */
  async #pinnedTable(l1Index: number): Promise<L2Table> {
    for (;;) {
      const table = await this.#cache.get(l1Index);
      if (table.evicted) continue;
      table.pins += 1;
      return table;
    }
  }

  /**
   * A new L2 table at the end of the file (pinned, unlinked). Its space is
   * durably part of the file before its L1 entry is staged, so the entry
   * can never point past the end. In the blktap layout the whole extent is
   * reserved with it, every entry pointing at its slot: fresh space that
   * reads as zeros, what an unwritten cluster of a standalone image holds.
   */
  async #newTable(l1Index: number): Promise<L2Table> {
    const { clusterBytes, l2TableBytes, l2Entries } = this.#geo;
    let length = _alignUp(l2TableBytes, clusterBytes);
    if (this.#extentMode) length += l2Entries * clusterBytes;
    const offset = this.#space.take(length, Math.max(clusterBytes, 4096));
    await this.#space.durable(offset + length);
    const table = new L2Table(l1Index, offset, new Uint8Array(l2TableBytes));
    if (this.#extentMode) {
      const first = l1Index * l2Entries;
      const clusters = Math.min(
        l2Entries,
        Math.ceil(this.#image.header.sizeBytes / clusterBytes) - first,
      );
      for (let k = 0; k < clusters; k += 1) table.set(k, this.#slotOf(table, k));
    }
    table.markAllDirty(); // written whole: nothing relies on what the space held
    table.unlinked = true;
    table.pins += 1;
    await this.#cache.insert(table);
    await this.#l1.stage(l1Index, offset);
    return table;
  }

  #slotOf(table: L2Table, index: number): number {
    const { clusterBytes, l2TableBytes } = this.#geo;
    return table.offsetBytes + _alignUp(l2TableBytes, clusterBytes) + index * clusterBytes;
  }

  /**
   * Puts a table's changed entries in the file, and a new table's L1
   * entry; resolves once both writes (started after this call) completed.
   */
  async #settle(table: L2Table): Promise<void> {
    const writes = [table.writeOut(this.#file)];
    if (table.unlinked) {
      writes.push(
        this.#l1.writeOut(table.l1Index).then(() => {
          table.unlinked = false;
        }),
      );
    }
    await Promise.all(writes);
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
    const span = this.#geo.l2SpanBytes;
    return perUnit(offsetBytes, buffer, span, (l1, pos, out) => this.#readInTable(l1, pos, out));
  }

  async #readInTable(l1Index: number, offsetBytes: number, out: Uint8Array): Promise<void> {
    if ((await this.#l1.get(l1Index)) === 0) return await this.#readBeneath(offsetBytes, out);
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
        runHost < 0 ? this.#readBeneath(runStart, slice) : this.#file.read(runHost, slice),
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
  #readBeneath(offsetBytes: number, out: Uint8Array): Promise<void> {
    return readBeneath(this.#parent, offsetBytes, [out]);
  }

  async #inflate(hostOffset: number, compressedBytes: number, guest: number): Promise<Uint8Array> {
    if (this.#inflated?.offsetBytes === hostOffset) return this.#inflated.data;
    if (!Number.isFinite(hostOffset) || compressedBytes === 0) {
      throw this.#entryError(guest, `invalid compressed cluster at ${hostOffset}`);
    }
    const packed = new Uint8Array(compressedBytes);
    await this.#file.read(hostOffset, packed);
    const data = await inflateCluster(packed, this.#geo.clusterBytes);
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
    const span = this.#geo.l2SpanBytes;
    return perUnit(offsetBytes, data, span, (l1, pos, piece) => this.#writeInTable(l1, pos, piece));
  }

  async #writeInTable(l1Index: number, offsetBytes: number, data: Uint8Array): Promise<void> {
    for (;;) {
      if ((await this.#l1.get(l1Index)) !== 0) {
        const table = await this.#pinnedTable(l1Index);
        try {
          const inPlace = this.#writeInPlace(table, offsetBytes, data);
          if (inPlace) return await inPlace;
        } finally {
          table.pins -= 1;
        }
      } else if (!this.#parent && isZeroBytes(data)) {
        return; // zeros over a region with no table and nothing beneath
      }
      const busy = await this.#allocate(l1Index, offsetBytes, data);
      if (!busy) return;
      await busy.wait; // another write is allocating one of these clusters: then write in place
    }
  }

  /**
   * Writes in place when every cluster is allocated plain, else undefined.
   * Answers only once the entries it relies on are in the file.
   */
  #writeInPlace(table: L2Table, offsetBytes: number, data: Uint8Array) {
    const { clusterBytes, l2Entries } = this.#geo;
    const end = offsetBytes + data.byteLength;
    const runs: { host: number; start: number; end: number }[] = [];
    let settle = table.unlinked;
    for (let pos = offsetBytes; pos < end;) {
      const clusterStart = pos - (pos % clusterBytes);
      const clusterEnd = Math.min(end, clusterStart + clusterBytes);
      const index = (clusterStart / clusterBytes) % l2Entries;
      const hi = table.hi(index);
      if ((hi & 0x80000000) !== 0 || table.isZero(index)) return undefined;
      settle ||= table.unsettled(index);
      const host = this.#plainOffset(hi * 2 ** 32 + table.lo(index), clusterStart) +
        (pos - clusterStart);
      const last = runs[runs.length - 1];
      if (last && last.host + (last.end - last.start) === host) last.end = clusterEnd;
      else runs.push({ host, start: pos, end: clusterEnd });
      pos = clusterEnd;
    }
    return (async () => {
      await Promise.all(
        runs.map((r) =>
          this.#file.write(r.host, data.subarray(r.start - offsetBytes, r.end - offsetBytes))
        ),
      );
      if (settle) await this.#settle(table);
    })();
  }

  /**
   * Allocates inside one L2 table: plans under the table's allocator lock
   * (claims on the new clusters), then writes outside it. Returns a claim
   * to wait for when another write is allocating one of the clusters.
   */
  async #allocate(
    l1Index: number,
    offsetBytes: number,
    data: Uint8Array,
  ): Promise<{ wait: Promise<void> } | undefined> {
    let table: L2Table | undefined;
    let plan: AllocationPlan | { wait: Promise<void> };
    await this.#markDirty();
    const release = await this.#allocLocks.acquire(l1Index, l1Index + 1);
    try {
      table = (await this.#l1.get(l1Index)) === 0
        ? await this.#newTable(l1Index)
        : await this.#pinnedTable(l1Index);
      plan = await this.#plan(table, offsetBytes, data);
    } catch (error) {
      if (table) table.pins -= 1;
      throw error;
    } finally {
      release();
    }
    try {
      if ("wait" in plan) return plan;
      await this.#carryOut(table, plan);
    } finally {
      table.pins -= 1;
    }
  }

  async #plan(
    table: L2Table,
    offsetBytes: number,
    data: Uint8Array,
  ): Promise<AllocationPlan | { wait: Promise<void> }> {
    const { clusterBytes, l2Entries, clusterBits } = this.#geo;
    const plan: AllocationPlan = { inPlace: [], fresh: [], settle: table.unlinked };
    const end = offsetBytes + data.byteLength;
    for (let pos = offsetBytes; pos < end;) {
      const clusterStart = pos - (pos % clusterBytes);
      const clusterEnd = Math.min(end, clusterStart + clusterBytes);
      const index = (clusterStart / clusterBytes) % l2Entries;
      const guestCluster = clusterStart / clusterBytes;
      const claim = this.#claims.get(guestCluster);
      if (claim) return { wait: claim };
      const slice = data.subarray(pos - offsetBytes, clusterEnd - offsetBytes);
      const entry = decodeEntry(table.hi(index), table.lo(index), clusterBits);
      if (!entry.compressed && entry.offsetBytes !== 0) {
        const host = this.#plainOffset(entry.offsetBytes, clusterStart);
        plan.inPlace.push({ host: host + (pos - clusterStart), bytes: slice });
        plan.settle ||= table.unsettled(index);
      } else {
        const bytes = await this.#newClusterBytes(entry, clusterStart, pos, slice);
        // A cluster that held parent or compressed data must not show zeros after a crash.
        const barrier = entry.compressed || (this.#parent?.sizeBytes ?? 0) > clusterStart;
        if (bytes) {
          const wasCompressed = entry.compressed;
          plan.fresh.push({
            index,
            guestCluster,
            host: 0,
            bytes,
            wasCompressed,
            barrier,
            release() {},
          });
        }
      }
      pos = clusterEnd;
    }
    this.#placeFresh(table, plan.fresh);
    for (const f of plan.fresh) {
      const { promise, resolve } = Promise.withResolvers<void>();
      f.release = resolve;
      this.#claims.set(f.guestCluster, promise);
    }
    return plan;
  }

  // Host offsets are given all at once, so one write's clusters stay adjacent.
  #placeFresh(table: L2Table, fresh: FreshCluster[]): void {
    const { clusterBytes, l2Entries } = this.#geo;
    const ownsExtent = this.#extentMode && table.offsetBytes >= this.#extentTablesFrom;
    for (const f of fresh) {
      if (ownsExtent && !f.wasCompressed) {
        f.host = this.#slotOf(table, f.index);
        continue;
      }
      // A cluster that begins a guest page begins a host page too: with
      // 512-byte clusters a 4 KiB guest write is one aligned 4 KiB write.
      const clusterStart = (table.l1Index * l2Entries + f.index) * clusterBytes;
      const unit = clusterStart % 4096 === 0 ? Math.max(clusterBytes, 4096) : clusterBytes;
      f.host = this.#space.take(clusterBytes, unit);
    }
  }

  /**
   * Writes the data, makes it durable where a crash could otherwise show
   * wrong bytes, sets the new entries and puts them in the file.
   */
  async #carryOut(table: L2Table, plan: AllocationPlan): Promise<void> {
    const { clusterBytes } = this.#geo;
    try {
      const end = plan.fresh.reduce((n, f) => Math.max(n, f.host + clusterBytes), 0);
      await Promise.all([
        ...plan.inPlace.map((w) => this.#file.write(w.host, w.bytes)),
        this.#writeClusters(plan.fresh),
        end > 0 ? this.#space.durable(end) : undefined,
      ]);
      if (plan.fresh.some((f) => f.barrier)) await this.#sync.sync();
      for (const f of plan.fresh) table.set(f.index, f.host);
    } finally {
      for (const f of plan.fresh) {
        this.#claims.delete(f.guestCluster);
        f.release();
      }
    }
    if (plan.fresh.length > 0 || plan.settle) await this.#settle(table);
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
        await this.#readBeneath(clusterStart, bytes.subarray(0, visible));
      }
      bytes.set(slice, pos - clusterStart);
    }
    if (entry.compressed || !isZeroBytes(bytes)) return bytes;
    if (!this.#parent) return undefined;
    return (await this.#zeroBeneath(clusterStart, clusterBytes)) ? undefined : bytes;
  }

  #zeroBeneath(offsetBytes: number, lengthBytes: number): Promise<boolean> {
    return zeroBeneath(this.#parent, offsetBytes, lengthBytes);
  }

  /** Writes new clusters, one request per run of adjacent host offsets. */
  async #writeClusters(fresh: FreshCluster[]): Promise<void> {
    const clusterBytes = this.#geo.clusterBytes;
    const tasks: Promise<void>[] = [];
    for (let i = 0; i < fresh.length;) {
      let j = i + 1;
      while (j < fresh.length && fresh[j].host === fresh[j - 1].host + clusterBytes) j += 1;
      tasks.push(this.#file.write(fresh[i].host, joinBytes(fresh.slice(i, j).map((f) => f.bytes))));
      i = j;
    }
    await Promise.all(tasks);
  }

  // ---- flush --------------------------------------------------------------

  /** Every answered write has its data and metadata in the file: make them durable. */
  protected _flush(): Promise<void> {
    if (!this.#file.writable) return Promise.resolve();
    return this.#sync.sync();
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
      if ((await this.#l1.get(l1Index)) === 0) {
        for (const e of await this.#statusBeneath(pos, tableEnd - pos)) push(e);
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
        } else for (const e of await this.#statusBeneath(pos, runEnd - pos)) push(e);
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
  async mapRuns(offsetBytes: number, lengthBytes: number): Promise<MapRun[]> {
    this.checkRange(offsetBytes, lengthBytes);
    const runs: MapRun[] = [];
    const { clusterBytes, l2Entries, l2SpanBytes, clusterBits } = this.#geo;
    const end = offsetBytes + lengthBytes;
    let table: L2Table | undefined;
    let tableIndex = -1;
    for (let pos = offsetBytes; pos < end;) {
      const l1Index = Math.floor(pos / l2SpanBytes);
      if (l1Index !== tableIndex) {
        tableIndex = l1Index;
        table = (await this.#l1.get(l1Index)) === 0 ? undefined : await this.#table(l1Index);
      }
      const clusterEnd = Math.min(end, pos - (pos % clusterBytes) + clusterBytes);
      const index = Math.floor(pos / clusterBytes) % l2Entries;
      const entry = table ? decodeEntry(table.hi(index), table.lo(index), clusterBits) : undefined;
      const run: MapRun = { offsetBytes: pos, lengthBytes: clusterEnd - pos, kind: "hole" };
      if (entry?.compressed) run.kind = "compressed";
      else if (entry && entry.offsetBytes !== 0) {
        run.kind = "data";
        run.hostOffsetBytes = entry.offsetBytes + (pos % clusterBytes);
      }
      pushMapRun(runs, run);
      pos = clusterEnd;
    }
    return runs;
  }

  #statusBeneath(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return statusBeneath(this.#parent, offsetBytes, lengthBytes);
  }

  /**
   * Makes everything durable, cuts reserved space past the last cluster,
   * then (Xen header) writes the checksum and clears the dirty flag.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      if (this.#file.writable) {
        await this.#sync.sync();
        await this.#space.trim();
        if (this.#image.header.xen) await this.#writeCleanHead();
      }
    } finally {
      await this.#parent?.close();
      await this.#file.close();
    }
  }

  #markDirty(): Promise<void> {
    const xen = this.#image.header.xen;
    if (!xen) return Promise.resolve();
    this.#markedDirty ??= (async () => {
      xen.flags |= XEN_FLAG_DIRTY;
      new DataView(this.#image.head.buffer, this.#image.head.byteOffset).setUint32(60, xen.flags);
      await this.#file.write(0, this.#image.head);
      await this.#sync.sync();
    })();
    return this.#markedDirty;
  }

  async #writeCleanHead(): Promise<void> {
    if (!this.#markedDirty) return; // nothing allocated: L1 and checksum unchanged
    await this.#markedDirty.catch(() => {});
    const head = this.#image.head;
    const view = new DataView(head.buffer, head.byteOffset);
    if (this.#xenTrusted) view.setUint32(52, await this.#l1.checksum());
    view.setUint32(60, view.getUint32(60) & ~XEN_FLAG_DIRTY);
    await this.#file.write(0, head);
    await this.#file.flush();
  }
}

/** Rejects L1 entries that cannot be L2 tables of this file. */
async function _checkL1(file: ImageFile, image: QcowImage): Promise<void> {
  await image.l1.scan((i, offset) => {
    const problem = l1EntryProblem(image, file.lengthBytes(), i, offset);
    if (problem) throw new QcowFormatError(file.path, problem);
  });
}

/**
 * Before a session writes: when the last writer died (the dirty flag;
 * always without a Xen header, which cannot record it) reclaim what it
 * left and, if the extents hold, restore the checksum and clear the flag.
 * Durable before the driver allocates anything (the driver sets the flag
 * again before its first allocation).
 */
async function _openForWriting(file: ImageFile, image: QcowImage): Promise<void> {
  const xen = image.header.xen;
  if (!xen || isDirty(image)) {
    const report = await reclaimAtOpen(file, image);
    if (xen) {
      const view = new DataView(image.head.buffer, image.head.byteOffset);
      if (report.extentsHold) {
        view.setUint32(52, await image.l1.checksum());
        image.checksumValid = true;
      }
      xen.flags &= ~XEN_FLAG_DIRTY;
      view.setUint32(60, xen.flags);
      await file.flush();
      await file.write(0, image.head);
    }
  }
  await file.flush();
}
