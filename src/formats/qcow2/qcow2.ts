/**
 * The qcow2 driver (QEMU `docs/interop/qcow2.txt`, versions 2 and 3).
 *
 * Reads walk L1 → L2 slice → cluster: unallocated clusters fall through to
 * the backing image (any format, any depth) or read as zeros, zero clusters
 * (v3) read as zeros, compressed clusters are inflated.
 *
 * Writes (the lead's ordering rules):
 * 1. A write is answered only when its data and every metadata change it
 *    needs are in the image file, so a killed process loses nothing it
 *    answered.
 * 2. Dependent groups are separated by a group-committed fdatasync
 *    ({@linkcode GroupSync}): the data of a new cluster, its refcount and
 *    a new (or copied) L2 table are written, one barrier shared by every
 *    write in flight makes them durable, then the L2 entry and the L1 entry
 *    are written. Frees are applied only behind a later barrier. A crash
 *    at any instant leaves at most leaked clusters.
 *    Most new clusters need no barrier of their own: they come from a
 *    reservation made durable ahead (refcounts set, the file preallocated
 *    over it, one barrier), and a fresh hole over zeros (no backing data
 *    beneath) reads as before or as the unanswered write left it whatever
 *    a crash keeps of the data, so data and entries go out together.
 * 3. FLUSH is one more barrier: everything answered is then durable.
 * Opened `unordered` (a tool filling a new image it deletes on failure,
 * `convert`), the ordering barriers of 2. are skipped (no fdatasync: the
 * deferred frees riding on them still run in order), and L2, refcount
 * and L1 changes are kept in memory and written sorted, in large writes,
 * before each fdatasync ({@linkcode MetadataWriter}, deferred); FLUSH and
 * close still fdatasync, so everything is durable when they complete. A crash
 * before that may leave the image unreadable, which is why only such tools
 * may ask for it.
 * Writes into allocated clusters whose refcount is one (COPIED) go in
 * place with no metadata; requests to different clusters run concurrently
 * ({@linkcode ClusterLocks}).
 *
 * The dirty bit (v3) is set before the first refcount change and cleared at
 * close; a writable open of a dirty image repairs the refcounts first, as
 * QEMU does, which also reclaims what a crash leaked.
 * @module
 */
import {
  type BlockDriver,
  BlockDriverBase,
  BlockError,
  type DriverCapabilities,
  type Extent,
  type ZeroOptions,
} from "../driver.ts";
import type { ImageFile, ImageOpenOptions } from "../image_file.ts";
import type { OpenContext } from "../format_entry.ts";
import { deflateCluster, inflateCluster } from "../cluster_compress.ts";
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
import {
  ClusterAllocator,
  type ClusterRun,
  reservation_bytes,
  reservation_bytes_page_cache,
} from "./allocator.ts";
import { ClusterLocks } from "./cluster_locks.ts";
import { compressedEntry, type L2Entry, standardEntry } from "./entries.ts";
import { GroupSync } from "../group_commit.ts";
import {
  AUTOCLEAR_BITMAPS,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  Qcow2FormatError,
  type Qcow2Geometry,
  unsupportedFeature,
} from "./header.ts";
import { type Qcow2Image, readQcow2Image } from "./image.ts";
import { MappingTables } from "./mapping.ts";
import { MetadataWriter } from "./metadata_writer.ts";
import { observed } from "./observed.ts";
import { Payload } from "./payload.ts";
import { RefcountStore } from "./refcounts.ts";
import { HeaderFields } from "./header_fields.ts";
import { type TablePrep, TablePreps } from "./table_preps.ts";
import { repairQcow2 } from "./check.ts";
import { bitmapSpace } from "./bitmaps.ts";

/** One cluster of a write that needs a new host cluster. */
interface FreshCluster {
  /** Index in the L2 table. */
  index: number;
  guestStart: number;
  /** The part of the cluster the write covers (offsets inside the cluster). */
  from: number;
  to: number;
  /** Payload offset of `from`. */
  payloadAt: number;
  old: L2Entry;
  host?: number;
  fresh?: boolean;
  /** What the cluster reads now is zeros (nothing beneath, or a zero cluster). */
  zeroBeneath?: boolean;
}

/** A qcow2 image served as a block device. */
export class Qcow2Driver extends BlockDriverBase {
  /** Memory bound of the L2 slice cache per image (tests lower it). */
  static l2CacheBytesMax = 32 << 20;
  /** Memory bound of the refcount slice cache per image. */
  static refcountCacheBytesMax = 4 << 20;
  readonly format = "qcow2";
  readonly sizeBytes: number;
  readonly capabilities: DriverCapabilities;
  readonly image: Qcow2Image;
  readonly #file: ImageFile;
  readonly #parent?: BlockDriver;
  readonly #g: Qcow2Geometry;
  readonly #tables: MappingTables;
  readonly #refcounts: RefcountStore;
  readonly #allocator: ClusterAllocator;
  /** Ordering barriers (rule 2); fdatasync unless opened `unordered`. */
  readonly #sync: GroupSync;
  /** Durability (FLUSH, close): always fdatasync. */
  readonly #durable: GroupSync;
  readonly #writer: MetadataWriter;
  readonly #locks = new ClusterLocks();
  readonly #preps: TablePreps;
  readonly #header: HeaderFields;
  #inflated?: { offsetBytes: number; data: Uint8Array };
  #prepared?: Promise<void>;
  #guards?: { reftable: number; ranges: [number, number][] };
  #closed = false;

  private constructor(
    file: ImageFile,
    image: Qcow2Image,
    options: ImageOpenOptions,
    parent?: BlockDriver,
  ) {
    super();
    this.#file = file;
    this.image = image;
    this.#parent = parent;
    const h = image.header;
    const g = image.geometry;
    this.#g = g;
    this.sizeBytes = h.sizeBytes;
    // Unordered: L2, refcount and L1 changes stay in memory (bounded by the
    // caches) and go out sorted in large writes just before each fdatasync.
    this.#writer = new MetadataWriter(file, { deferred: options.unordered ?? false });
    this.#durable = new GroupSync(
      options.unordered
        ? () => this.#writer.writeBack().then(() => file.flush())
        : () => file.flush(),
    );
    this.#sync = options.unordered ? new GroupSync(() => Promise.resolve()) : this.#durable;
    this.#tables = new MappingTables(file, g, this.#writer, {
      offsetBytes: h.l1TableOffset,
      size: h.l1Size,
      bytes: image.l1Bytes,
    }, Qcow2Driver.l2CacheBytesMax);
    this.#refcounts = new RefcountStore(file, g, this.#writer, {
      offsetBytes: h.refcountTableOffset,
      clusters: h.refcountTableClusters,
      bytes: image.reftableBytes,
    }, Qcow2Driver.refcountCacheBytesMax);
    this.#header = new HeaderFields(file, image, this.#sync);
    this.#allocator = new ClusterAllocator(this.#refcounts, file, this.#sync, {
      prepare: () => this.#prepareWrites(),
      writeReftableFields: (offset, clusters) => this.#header.setReftable(offset, clusters),
      minimumFrontier: () => this.#minimumFrontier(),
      growsWithHoles: _growsWithHoles(file),
      // Without barriers a reservation costs no fdatasync: reserve as much as through the page cache.
      reservationBytes: options.cache === "writeback" || options.unordered
        ? reservation_bytes_page_cache
        : reservation_bytes,
      // Unordered: no barriers at all (as #sync).
      syncRange: (offset, length) =>
        options.unordered
          ? Promise.resolve()
          : file.flushRange
          ? file.flushRange(offset, length)
          : this.#sync.sync(),
    });
    this.#preps = new TablePreps(file, this.#tables, this.#allocator);
    const writable = file.writable;
    const zeroing = writable && (h.version === 3 || !parent);
    this.capabilities = {
      canWrite: writable,
      canFlush: true,
      canDiscard: zeroing,
      canZero: zeroing,
      canExtents: true,
      canMultiConn: true,
    };
  }

  /** Opens `path`; the backing chain is opened through `context`. */
  static async open(
    path: string,
    options: ImageOpenOptions,
    context: OpenContext,
  ): Promise<Qcow2Driver> {
    const file = await context.openFile(path, options);
    return await openLayer(file, Qcow2FormatError, async (adopt) => {
      let image = await readQcow2Image(file);
      _refuseUnsupported(file, image);
      if (file.writable && (image.header.incompatible & INCOMPAT_DIRTY) !== 0n) {
        // QEMU: refcounts may be wrong; repair them before anything is allocated.
        await repairQcow2(file, image);
        image = await readQcow2Image(file);
      }
      const { backingName, backingFormat } = image.header;
      const parent = backingName === undefined
        ? undefined
        : await adopt(() => context.openBacking(backingName, path, backingFormat || undefined));
      return new Qcow2Driver(file, image, options, parent);
    });
  }

  get path(): string {
    return this.#file.path;
  }

  /** The opened parent, if any. */
  get parent(): BlockDriver | undefined {
    return this.#parent;
  }

  get clusterBytes(): number {
    return this.#g.clusterBytes;
  }

  /** fdatasync calls completed so far, barriers and flushes (for tests and benchmarks). */
  get barriers(): number {
    return this.#durable.syncs;
  }

  /** Metadata block writes issued so far (joined deferred blocks count once), for tests. */
  get metadataWrites(): number {
    return this.#writer.writes;
  }

  /** Cached metadata (L2 and refcount slices), for tests of the memory bound. */
  get cachedBytes(): { l2: number; refcounts: number } {
    return { l2: this.#tables.cachedBytes, refcounts: this.#refcounts.cachedBytes };
  }

  // ---- helpers ---------------------------------------------------------------

  /** Metadata ranges a data write must never touch (header, L1, refcount table). */
  #guardedRanges(): [number, number][] {
    const reftable = this.#refcounts.tableOffsetBytes;
    if (this.#guards?.reftable === reftable) return this.#guards.ranges;
    const h = this.image.header;
    const c = this.#g.clusterBytes;
    const ranges: [number, number][] = [
      [0, c],
      [h.l1TableOffset, h.l1TableOffset + h.l1Size * 8],
      [reftable, reftable + this.#refcounts.tableClusters * c],
    ];
    this.#guards = { reftable, ranges }; // the refcount table moves when it grows
    return ranges;
  }

  /** Lowest cluster new allocations may use: past the tables the header names. */
  #minimumFrontier(): number {
    const end = Math.max(...this.#guardedRanges().map(([, e]) => e));
    return Math.ceil(end / this.#g.clusterBytes);
  }

  #corrupt(guestOffset: number, detail: string): BlockError {
    return new BlockError("EIO", `${this.path}: guest offset ${guestOffset}: ${detail}`);
  }

  /** The host offset of a standard entry, validated (cluster-aligned, not metadata). */
  #hostOf(entry: L2Entry, guestStart: number): number {
    const host = entry.offsetBytes;
    if (!Number.isSafeInteger(host) || host % this.#g.clusterBytes !== 0) {
      throw this.#corrupt(guestStart, `cluster offset ${host} is not cluster-aligned`);
    }
    for (const [s, e] of this.#guardedRanges()) {
      if (host < e && s < host + this.#g.clusterBytes) {
        throw this.#corrupt(guestStart, `cluster offset ${host} points into the image metadata`);
      }
    }
    return host;
  }

  /** The L2 table offset of L1 entry `index`, validated; 0 when none. */
  #tableOf(index: number): { offsetBytes: number; copied: boolean } {
    const e = this.#tables.l1Entry(index);
    if (e.offsetBytes === 0) return { offsetBytes: 0, copied: false };
    if (!Number.isSafeInteger(e.offsetBytes) || e.offsetBytes % this.#g.clusterBytes !== 0) {
      throw new BlockError(
        "EIO",
        `${this.path}: L1 entry ${index}: L2 table offset ${e.offsetBytes} is not cluster-aligned`,
      );
    }
    return e;
  }

  /** Calls `piece` for each part of `[offset, offset+length)` inside one L2 table, concurrently. */
  async #perTable(
    offsetBytes: number,
    lengthBytes: number,
    piece: (
      l1Index: number,
      offsetBytes: number,
      payloadAt: number,
      lengthBytes: number,
    ) => Promise<void>,
  ): Promise<void> {
    const span = this.#g.l2SpanBytes;
    const end = offsetBytes + lengthBytes;
    const tasks: Promise<void>[] = [];
    for (let pos = offsetBytes; pos < end;) {
      const l1Index = Math.floor(pos / span);
      const pieceEnd = Math.min(end, (l1Index + 1) * span);
      tasks.push(observed(piece(l1Index, pos, pos - offsetBytes, pieceEnd - pos)));
      pos = pieceEnd;
    }
    await Promise.all(tasks);
  }

  #clusterRange(offsetBytes: number, lengthBytes: number): [number, number] {
    const c = this.#g.clusterBytes;
    return [Math.floor(offsetBytes / c), Math.ceil((offsetBytes + lengthBytes) / c)];
  }

  // ---- read ------------------------------------------------------------------

  protected _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    return this.#readPayload(offsetBytes, new Payload([buffer]));
  }

  protected override _readv(offsetBytes: number, buffers: Uint8Array[]): Promise<void> {
    return this.#readPayload(offsetBytes, new Payload(buffers));
  }

  #readPayload(offsetBytes: number, payload: Payload): Promise<void> {
    return this.#perTable(offsetBytes, payload.lengthBytes, async (l1Index, pos, at, length) => {
      const [first, end] = this.#clusterRange(pos, length);
      const release = this.#locks.tryShared(first, end) ??
        await this.#locks.acquire(first, end, false);
      try {
        await this.#readInTable(l1Index, pos, payload, at, length);
      } finally {
        release();
      }
    });
  }

  async #readInTable(
    l1Index: number,
    pos: number,
    payload: Payload,
    at: number,
    length: number,
  ): Promise<void> {
    const table = this.#tableOf(l1Index);
    if (table.offsetBytes === 0) return await this.#readBeneath(pos, payload, at, length);
    const c = this.#g.clusterBytes;
    const [first, end] = this.#clusterRange(pos, length);
    const index = first % this.#g.l2Entries;
    const entries = this.#tables.cachedEntries(table.offsetBytes, index, end - first) ??
      await this.#tables.entries(table.offsetBytes, index, end - first);
    const tasks: Promise<void>[] = [];
    // Runs of clusters read together: beneath (-1), or contiguous on disk.
    let runStart = pos;
    let runHost = -2; // -2: nothing open
    const close = (runEnd: number) => {
      if (runEnd <= runStart || runHost === -2) return;
      const from = at + runStart - pos;
      const to = at + runEnd - pos;
      tasks.push(observed(
        runHost === -1
          ? this.#readBeneath(runStart, payload, from, to - from)
          : this.#readFile(runHost, payload.slice(from, to)),
      ));
    };
    const stop = pos + length;
    for (let p = pos; p < stop;) {
      const clusterStart = p - (p % c);
      const clusterEnd = Math.min(stop, clusterStart + c);
      const entry = entries[clusterStart / c - first];
      if (entry.kind === "unallocated") {
        if (runHost !== -1) {
          close(p);
          runStart = p;
          runHost = -1;
        }
      } else if (entry.kind === "normal") {
        const host = this.#hostOf(entry, clusterStart) + (p - clusterStart);
        if (runHost < 0 || runHost + (p - runStart) !== host) {
          close(p);
          runStart = p;
          runHost = host;
        }
      } else {
        close(p);
        runHost = -2;
        if (entry.kind === "compressed") {
          tasks.push(
            observed(
              this.#readCompressed(entry, clusterStart, p, clusterEnd, payload, at + p - pos),
            ),
          );
        } else {
          if (this.image.header.version < 3) {
            throw this.#corrupt(clusterStart, "zero cluster in a version 2 image");
          }
          payload.fill(at + p - pos, at + clusterEnd - pos);
        }
      }
      p = clusterEnd;
    }
    close(stop);
    await Promise.all(tasks);
  }

  #readFile(hostOffset: number, parts: Uint8Array[]): Promise<void> {
    if (parts.length === 1) return this.#file.read(hostOffset, parts[0]);
    if (this.#file.readv) return this.#file.readv(hostOffset, parts);
    let at = hostOffset;
    return Promise.all(parts.map((p) => {
      const read = this.#file.read(at, p);
      at += p.byteLength;
      return read;
    })).then(() => {});
  }

  /** What lies beneath this image at payload bytes `[at, at + length)`. */
  #readBeneath(pos: number, payload: Payload, at: number, length: number): Promise<void> {
    return readBeneath(this.#parent, pos, payload.slice(at, at + length));
  }

  async #inflate(entry: L2Entry, guestStart: number): Promise<Uint8Array> {
    if (this.#inflated?.offsetBytes === entry.offsetBytes) return this.#inflated.data;
    const c = this.#g.clusterBytes;
    if (!Number.isSafeInteger(entry.offsetBytes) || entry.offsetBytes < c) {
      throw this.#corrupt(guestStart, `compressed cluster at invalid offset ${entry.offsetBytes}`);
    }
    const length = Math.min(entry.compressedBytes, this.#file.lengthBytes() - entry.offsetBytes);
    if (length <= 0) throw this.#corrupt(guestStart, "compressed cluster past the end of the file");
    const packed = new Uint8Array(length);
    await this.#file.read(entry.offsetBytes, packed);
    const data = await inflateCluster(packed, c);
    if (!data) throw this.#corrupt(guestStart, "compressed cluster does not inflate");
    this.#inflated = { offsetBytes: entry.offsetBytes, data };
    return data;
  }

  async #readCompressed(
    entry: L2Entry,
    guestStart: number,
    from: number,
    to: number,
    payload: Payload,
    payloadAt: number,
  ): Promise<void> {
    const data = await this.#inflate(entry, guestStart);
    payload.copyFrom(payloadAt, data.subarray(from - guestStart, to - guestStart));
  }

  // ---- write -------------------------------------------------------------------

  protected _write(offsetBytes: number, data: Uint8Array): Promise<void> {
    return this.#writePayload(offsetBytes, new Payload([data]));
  }

  protected override _writev(offsetBytes: number, buffers: Uint8Array[]): Promise<void> {
    return this.#writePayload(offsetBytes, new Payload(buffers));
  }

  #writePayload(offsetBytes: number, payload: Payload): Promise<void> {
    this.#checkOpen();
    return this.#perTable(offsetBytes, payload.lengthBytes, async (l1Index, pos, at, length) => {
      const [first, end] = this.#clusterRange(pos, length);
      let release = this.#locks.tryShared(first, end) ??
        await this.#locks.acquire(first, end, false);
      try {
        if (await this.#writeInPlace(l1Index, pos, payload, at, length)) return;
      } finally {
        release();
      }
      release = await this.#locks.acquire(first, end, true);
      try {
        await this.#writeAllocating(l1Index, pos, payload, at, length);
      } finally {
        release();
      }
    });
  }

  #checkOpen(): void {
    if (this.#closed) throw new BlockError("EIO", `${this.path}: closed`);
  }

  /** Writes in place when the table and every cluster have refcount one; else false. */
  async #writeInPlace(
    l1Index: number,
    pos: number,
    payload: Payload,
    at: number,
    length: number,
  ): Promise<boolean> {
    const table = this.#tableOf(l1Index);
    if (table.offsetBytes === 0 || !table.copied) return false;
    const c = this.#g.clusterBytes;
    const [first, end] = this.#clusterRange(pos, length);
    const index = first % this.#g.l2Entries;
    const entries = this.#tables.cachedEntries(table.offsetBytes, index, end - first) ??
      await this.#tables.entries(table.offsetBytes, index, end - first);
    if (!entries.every((e) => e.kind === "normal" && e.copied)) return false;
    const writes: Promise<void>[] = [];
    let runStart = pos;
    let runHost = -1;
    const stop = pos + length;
    for (let p = pos; p < stop;) {
      const clusterStart = p - (p % c);
      const host = this.#hostOf(entries[clusterStart / c - first], clusterStart) +
        (p - clusterStart);
      if (runHost < 0 || runHost + (p - runStart) !== host) {
        if (runHost >= 0) {
          writes.push(this.#writeFile(runHost, payload.slice(at + runStart - pos, at + p - pos)));
        }
        runStart = p;
        runHost = host;
      }
      p = Math.min(stop, clusterStart + c);
    }
    writes.push(this.#writeFile(runHost, payload.slice(at + runStart - pos, at + stop - pos)));
    await Promise.all(writes);
    return true;
  }

  #writeFile(hostOffset: number, parts: Uint8Array[]): Promise<void> {
    if (parts.length === 1) return observed(this.#file.write(hostOffset, parts[0]));
    if (this.#file.writev) return observed(this.#file.writev(hostOffset, parts));
    return observed(this.#file.write(hostOffset, joinBytes(parts)));
  }

  /**
   * Writes a range of one L2 table holding its clusters exclusively: new
   * clusters (and a new or copied table) are written, one shared barrier,
   * then the L2 and L1 entries; old clusters are freed behind a later one.
   */
  async #writeAllocating(
    l1Index: number,
    pos: number,
    payload: Payload,
    at: number,
    length: number,
  ): Promise<void> {
    const c = this.#g.clusterBytes;
    const table = this.#tableOf(l1Index);
    const [first, end] = this.#clusterRange(pos, length);
    const firstIndex = first % this.#g.l2Entries;
    const entries = await this.#currentEntries(table.offsetBytes, firstIndex, end - first);
    const writes: Promise<void>[] = [];
    const fresh: FreshCluster[] = [];
    const stop = pos + length;
    for (let p = pos; p < stop;) {
      const clusterStart = p - (p % c);
      const clusterEnd = Math.min(stop, clusterStart + c);
      const entry = entries[clusterStart / c - first];
      const from = p - clusterStart;
      const to = clusterEnd - clusterStart;
      const payloadAt = at + p - pos;
      if (table.copied && entry.kind === "normal" && entry.copied) {
        const host = this.#hostOf(entry, clusterStart) + from;
        writes.push(this.#writeFile(host, payload.slice(payloadAt, payloadAt + to - from)));
      } else if (
        !await this.#alreadyReads(entry, clusterStart + from, payload, payloadAt, to - from)
      ) {
        const index = firstIndex + clusterStart / c - first;
        fresh.push({ index, guestStart: clusterStart, from, to, payloadAt, old: entry });
      }
      p = clusterEnd;
    }
    if (fresh.length === 0) {
      await Promise.all(writes);
      return;
    }
    const prep = await this.#preps.forWrite(l1Index, this.#tableOf(l1Index));
    const runs = await this.#allocator.allocate(fresh.length);
    _assignHosts(fresh, runs, c);
    for (const f of fresh) f.zeroBeneath = await this.#readsZeroBeneath(f);
    const published = fresh.map((f): [number, [number, number]] => [
      f.index,
      standardEntry(f.host!, true),
    ]);
    // Data, refcounts and a new table durable before any entry names them.
    // Not needed when every new cluster is a fresh hole of a durable
    // reservation over zeros: whatever of the data a crash keeps, the
    // cluster reads as before (zeros) or as this unanswered write left it,
    // so data and entries go out together.
    const orderFree = prep.orderFree && fresh.every((f) => f.fresh && f.zeroBeneath);
    writes.push(observed(this.#writeFreshClusters(fresh, payload)));
    if (orderFree) {
      await Promise.all([...runs.map((r) => r.ready), prep.ready]);
      writes.push(observed(this.#publish(prep, published)));
      await _settled(writes);
    } else {
      await _settled([...writes, ...runs.map((r) => r.ready), prep.ready]);
      await this.#sync.sync();
      await this.#publish(prep, published);
    }
    await this.#freeOld(fresh.map((f) => f.old));
  }

  /** Entries of the table at `tableOffset` (0: no table, all unallocated). */
  #currentEntries(tableOffset: number, first: number, count: number): Promise<L2Entry[]> {
    if (tableOffset !== 0) return this.#tables.entries(tableOffset, first, count);
    const none: L2Entry = {
      kind: "unallocated",
      offsetBytes: 0,
      copied: false,
      compressedBytes: 0,
      compressedSectors: 0,
      reserved: false,
      offsetLow: 0,
    };
    return Promise.resolve(new Array(count).fill(none));
  }

  /**
   * True when the cluster already reads as the write would leave it: the
   * write is all zeros and the cluster reads zeros (zero cluster, or
   * unallocated with nothing beneath), so nothing is allocated.
   */
  async #alreadyReads(
    entry: L2Entry,
    guestOffset: number,
    payload: Payload,
    payloadAt: number,
    length: number,
  ): Promise<boolean> {
    if (entry.kind !== "unallocated" && entry.kind !== "zero-plain") return false;
    if (!payload.isZero(payloadAt, payloadAt + length)) return false;
    if (entry.kind === "zero-plain") return true;
    return await this.#zeroBeneath(guestOffset, length);
  }

  #zeroBeneath(offsetBytes: number, lengthBytes: number): Promise<boolean> {
    return zeroBeneath(this.#parent, offsetBytes, lengthBytes);
  }

  /** Writes the new clusters: whole, or only the written part of a fresh cluster over zeros. */
  async #writeFreshClusters(fresh: FreshCluster[], payload: Payload): Promise<void> {
    const c = this.#g.clusterBytes;
    const writes: Promise<void>[] = [];
    // Runs of whole clusters with adjacent hosts and adjacent payload go out as one write.
    let run: { host: number; start: number; end: number } | undefined;
    const flushRun = () => {
      if (run) writes.push(this.#writeFile(run.host, payload.slice(run.start, run.end)));
      run = undefined;
    };
    try {
      for (const f of fresh) {
        const visible = Math.min(c, this.sizeBytes - f.guestStart);
        const whole = f.from === 0 && f.to >= visible;
        if (whole) {
          const end = f.payloadAt + f.to;
          if (run && run.host + (run.end - run.start) === f.host && run.end === f.payloadAt) {
            run.end = end;
          } else {
            flushRun();
            run = { host: f.host!, start: f.payloadAt, end };
          }
          continue;
        }
        flushRun();
        if (f.fresh && f.zeroBeneath) {
          // Fresh file space reads as zeros: only the written part is needed.
          writes.push(
            this.#writeFile(
              f.host! + f.from,
              payload.slice(f.payloadAt, f.payloadAt + f.to - f.from),
            ),
          );
          continue;
        }
        const bytes = new Uint8Array(c);
        await this.#oldContent(f, bytes.subarray(0, visible));
        payload.copyTo(f.payloadAt, f.payloadAt + f.to - f.from, bytes, f.from);
        writes.push(this.#writeFile(f.host!, [bytes]));
      }
      flushRun();
    } finally {
      await Promise.allSettled(writes);
    }
    await Promise.all(writes);
  }

  async #readsZeroBeneath(f: FreshCluster): Promise<boolean> {
    const kind = f.old.kind;
    if (kind === "zero-plain" || kind === "zero-alloc") return true;
    if (kind !== "unallocated") return false;
    return await this.#zeroBeneath(f.guestStart, this.#g.clusterBytes);
  }

  /** What the cluster reads as now (the bytes a partial write keeps). */
  async #oldContent(f: FreshCluster, out: Uint8Array): Promise<void> {
    const e = f.old;
    if (e.kind === "unallocated") {
      await this.#readBeneath(f.guestStart, new Payload([out]), 0, out.byteLength);
    } else if (e.kind === "compressed") {
      out.set((await this.#inflate(e, f.guestStart)).subarray(0, out.byteLength));
    } else if (e.kind === "normal") {
      await this.#file.read(this.#hostOf(e, f.guestStart), out);
    } else out.fill(0);
  }

  /** After the barrier: the L1 link (once per table) and the L2 entries; resolves when written. */
  async #publish(prep: TablePrep, values: [number, [number, number]][]): Promise<void> {
    const link = this.#preps.link(prep);
    if (values.length > 0) {
      values.sort((a, b) => a[0] - b[0]);
      const writes: Promise<void>[] = [];
      for (let i = 0; i < values.length;) {
        let j = i + 1;
        while (j < values.length && values[j][0] === values[j - 1][0] + 1) j += 1;
        writes.push(observed(this.#tables.setEntries(
          prep.offsetBytes,
          values[i][0],
          values.slice(i, j).map((v) => v[1]),
        )));
        i = j;
      }
      await Promise.all(writes);
    }
    await link;
  }

  /** Drops the references of replaced clusters (behind a later barrier). */
  #freeOld(old: L2Entry[]): Promise<void> | undefined {
    const c = this.#g.clusterBytes;
    for (const e of old) {
      if (e.kind === "normal" || e.kind === "zero-alloc") {
        this.#allocator.freeLater(e.offsetBytes / c, 1);
      } else if (e.kind === "compressed") {
        const first = Math.floor(e.offsetBytes / c);
        const last = Math.floor((e.offsetBytes + e.compressedBytes - 1) / c);
        this.#allocator.freeLater(first, last - first + 1, true);
      }
    }
    return this.#allocator.throttleFrees();
  }

  // ---- zeroes, discard, compressed writes ---------------------------------------

  protected override async _writeZeroes(
    offsetBytes: number,
    lengthBytes: number,
    options: ZeroOptions,
  ) {
    await this.#zeroRange(
      offsetBytes,
      lengthBytes,
      options.mayTrim ?? false,
      options.fast ?? false,
      false,
    );
  }

  protected override async _discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    await this.#zeroRange(offsetBytes, lengthBytes, true, false, true);
  }

  /**
   * Makes a range read as zeros: partial clusters by writing zeros (skipped
   * for a discard), whole clusters by their L2 entry (v3 zero flag; v2
   * without backing: unallocated), freeing what they held.
   */
  async #zeroRange(
    offset: number,
    length: number,
    unmap: boolean,
    fast: boolean,
    discard: boolean,
  ) {
    this.#checkOpen();
    const c = this.#g.clusterBytes;
    const end = offset + length;
    const wholeStart = Math.ceil(offset / c) * c;
    const wholeEnd = end === this.sizeBytes ? end : Math.floor(end / c) * c;
    const zeroing = this.image.header.version === 3 || !this.#parent;
    if (!zeroing || wholeEnd <= wholeStart) {
      if (!discard) await this.#writeZeroBytes(offset, length, fast);
      return;
    }
    const tasks: Promise<void>[] = [];
    if (!discard && offset < wholeStart) {
      tasks.push(this.#writeZeroBytes(offset, wholeStart - offset, fast));
    }
    if (!discard && wholeEnd < end) {
      tasks.push(this.#writeZeroBytes(wholeEnd, end - wholeEnd, fast));
    }
    tasks.push(this.#perTable(wholeStart, wholeEnd - wholeStart, async (l1Index, pos, _at, len) => {
      const [first, last] = this.#clusterRange(pos, len);
      const release = await this.#locks.acquire(first, last, true);
      try {
        await this.#zeroClusters(l1Index, first, last, unmap);
      } finally {
        release();
      }
    }));
    await Promise.all(tasks.map(observed));
  }

  async #writeZeroBytes(offset: number, length: number, fast: boolean): Promise<void> {
    if (fast && !await this.#readsZero(offset, length)) {
      throw new BlockError("EOPNOTSUPP", `${this.path}: no fast zeroing of a partial cluster`);
    }
    const zeros = new Uint8Array(Math.min(length, 1 << 20));
    for (let done = 0; done < length; done += zeros.byteLength) {
      const n = Math.min(zeros.byteLength, length - done);
      await this.#writePayload(offset + done, new Payload([zeros.subarray(0, n)]));
    }
  }

  async #readsZero(offset: number, length: number): Promise<boolean> {
    const extents = await this.blockStatus(offset, length);
    return extents.every((e) => e.zero);
  }

  /** Zeroes whole clusters `[first, last)` of one L2 table through their entries. */
  async #zeroClusters(l1Index: number, first: number, last: number, unmap: boolean): Promise<void> {
    const v3 = this.image.header.version === 3;
    const table = this.#tableOf(l1Index);
    const hideBeneath = v3 && this.#parent !== undefined;
    const firstIndex = first % this.#g.l2Entries;
    const entries = await this.#currentEntries(table.offsetBytes, firstIndex, last - first);
    const values: [number, [number, number]][] = [];
    const freed: L2Entry[] = [];
    entries.forEach((e, k) => {
      const index = firstIndex + k;
      if (e.kind === "zero-plain" || (e.kind === "unallocated" && !hideBeneath)) return;
      // Without unmap a cluster of our own stays allocated, flagged zero (QEMU: ZERO_ALLOC).
      if (
        v3 && !unmap && table.copied && e.copied && (e.kind === "normal" || e.kind === "zero-alloc")
      ) {
        if (e.kind === "normal") values.push([index, standardEntry(e.offsetBytes, true, true)]);
        return;
      }
      values.push([index, v3 ? standardEntry(0, false, true) : [0, 0]]);
      if (e.kind !== "unallocated") freed.push(e);
    });
    if (values.length === 0) return;
    const prep = await this.#preps.forWrite(l1Index, this.#tableOf(l1Index));
    await prep.ready;
    // A new or copied table must be durable before the L1 entry names it.
    if (!prep.linked && !prep.orderFree) await this.#sync.sync();
    await this.#publish(prep, values);
    await this.#freeOld(freed);
  }

  /**
   * Writes one cluster compressed (`convert -c`): `offsetBytes` aligned,
   * `data` the whole cluster (shorter at the end of the disk). Falls back to
   * a plain write when the cluster is allocated or does not compress.
   */
  async writeCompressed(offsetBytes: number, data: Uint8Array): Promise<void> {
    this.checkWritable();
    this.checkRange(offsetBytes, data.byteLength);
    this.#checkOpen();
    const c = this.#g.clusterBytes;
    if (offsetBytes % c !== 0 || data.byteLength !== Math.min(c, this.sizeBytes - offsetBytes)) {
      throw new BlockError(
        "EINVAL",
        `${this.path}: compressed writes take one whole aligned cluster`,
      );
    }
    const cluster = offsetBytes / c;
    const release = await this.#locks.acquire(cluster, cluster + 1, true);
    try {
      if (await this.#writeCompressedLocked(offsetBytes, data)) return;
    } finally {
      release();
    }
    await this.write(offsetBytes, data);
  }

  async #writeCompressedLocked(offsetBytes: number, data: Uint8Array): Promise<boolean> {
    const c = this.#g.clusterBytes;
    const l1Index = Math.floor(offsetBytes / this.#g.l2SpanBytes);
    const index = (offsetBytes / c) % this.#g.l2Entries;
    const table = this.#tableOf(l1Index);
    if (table.offsetBytes !== 0) {
      const [entry] = await this.#tables.entries(table.offsetBytes, index, 1);
      if (entry.kind !== "unallocated" && entry.kind !== "zero-plain") return false;
    }
    if (isZeroBytes(data) && await this.#zeroBeneath(offsetBytes, data.byteLength)) return true;
    const cluster = new Uint8Array(c);
    cluster.set(data);
    const packed = await deflateCluster(cluster, c - 1);
    if (!packed) return false;
    const prep = await this.#preps.forWrite(l1Index, this.#tableOf(l1Index));
    const { offsetBytes: host, ready } = await this.#allocator.allocateBytes(packed.byteLength);
    await Promise.all([observed(this.#file.write(host, packed)), ready, prep.ready]);
    await this.#sync.sync();
    await this.#publish(prep, [[
      index,
      compressedEntry(host, packed.byteLength, this.#g.clusterBits),
    ]]);
    return true;
  }

  // ---- flush, dirty bit, header -------------------------------------------------

  protected _flush(): Promise<void> {
    if (!this.#file.writable) return Promise.resolve();
    if (this.#sync === this.#durable) return this.#durable.sync();
    // Unordered: the skipped barrier first (the deferred frees it releases), then fdatasync.
    return this.#sync.sync().then(() => this.#durable.sync());
  }

  /**
   * Before the first refcount change: the dirty bit set and the autoclear
   * bits cleared, durably; then the space of bitmaps we just stopped
   * vouching for is given back (QEMU drops such bitmaps), so none leaks.
   */
  #prepareWrites(): Promise<void> {
    this.#prepared ??= observed((async () => {
      const h = this.image.header;
      const vouched = h.bitmaps !== undefined && (h.autoclear & AUTOCLEAR_BITMAPS) !== 0n;
      await this.#header.markDirty();
      if (!vouched) return;
      const c = this.#g.clusterBytes;
      for (const s of await bitmapSpace(this.#file, h, c)) {
        if ("unaligned" in s || s.lengthBytes <= 0 || !Number.isSafeInteger(s.offsetBytes)) {
          continue;
        }
        const first = Math.floor(s.offsetBytes / c);
        this.#allocator.freeLater(first, Math.ceil((s.offsetBytes + s.lengthBytes) / c) - first);
      }
    })());
    return this.#prepared;
  }

  // ---- block status and map -------------------------------------------------------

  protected override async _blockStatus(
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<Extent[]> {
    const extents: Extent[] = [];
    for (const run of await this.mapRuns(offsetBytes, lengthBytes)) {
      if (run.kind === "hole") {
        const beneath = await statusBeneath(this.#parent, run.offsetBytes, run.lengthBytes);
        for (const e of beneath) pushExtent(extents, e);
      } else {
        const zero = run.kind === "zero";
        pushExtent(extents, {
          offsetBytes: run.offsetBytes,
          lengthBytes: run.lengthBytes,
          hole: false,
          zero,
        });
      }
    }
    return extents;
  }

  /**
   * This layer alone (for `blktap map`, as `qemu-img map` prints it):
   * unallocated runs are holes, plain clusters data at their file offset,
   * compressed clusters data without one, zero clusters zero (with the
   * offset of a preallocated one).
   */
  async mapRuns(offsetBytes: number, lengthBytes: number): Promise<MapRun[]> {
    this.checkRange(offsetBytes, lengthBytes);
    const runs: MapRun[] = [];
    const c = this.#g.clusterBytes;
    const end = offsetBytes + lengthBytes;
    for (let pos = offsetBytes; pos < end;) {
      const l1Index = Math.floor(pos / this.#g.l2SpanBytes);
      const tableEnd = Math.min(end, (l1Index + 1) * this.#g.l2SpanBytes);
      const table = this.#tableOf(l1Index);
      if (table.offsetBytes === 0) {
        pushMapRun(runs, { offsetBytes: pos, lengthBytes: tableEnd - pos, kind: "hole" });
        pos = tableEnd;
        continue;
      }
      const [first, last] = this.#clusterRange(pos, tableEnd - pos);
      const entries = await this.#tables.entries(
        table.offsetBytes,
        first % this.#g.l2Entries,
        last - first,
      );
      for (let p = pos; p < tableEnd;) {
        const clusterStart = p - (p % c);
        const clusterEnd = Math.min(tableEnd, clusterStart + c);
        const e = entries[clusterStart / c - first];
        const run: MapRun = { offsetBytes: p, lengthBytes: clusterEnd - p, kind: "hole" };
        if (e.kind === "normal") {
          run.kind = "data";
          run.hostOffsetBytes = this.#hostOf(e, clusterStart) + (p - clusterStart);
        } else if (e.kind === "compressed") run.kind = "compressed";
        else if (e.kind === "zero-plain" || e.kind === "zero-alloc") {
          run.kind = "zero";
          if (e.kind === "zero-alloc") run.hostOffsetBytes = e.offsetBytes + (p - clusterStart);
        }
        pushMapRun(runs, run);
        p = clusterEnd;
      }
      pos = tableEnd;
    }
    return runs;
  }

  // ---- close ---------------------------------------------------------------------

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      if (this.#file.writable) await this.#finish();
    } finally {
      await this.#parent?.close();
      await this.#file.close();
    }
  }

  /** Frees what is pending, returns unused reservations, clears the dirty bit. */
  async #finish(): Promise<void> {
    await this.#allocator.drain();
    await this.#sync.sync();
    if (this.#allocator.freeErrors.length === 0) await this.#header.markClean();
    // Unordered: the drain's refcounts and the clean header are not yet durable.
    if (this.#sync !== this.#durable) await this.#durable.sync();
  }
}

/** Waits for every promise to settle, then throws the first failure (none left running). */
async function _settled(promises: Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) throw (failed as PromiseRejectedResult).reason;
}

function _assignHosts(fresh: FreshCluster[], runs: ClusterRun[], clusterBytes: number): void {
  let k = 0;
  for (const run of runs) {
    for (let i = 0; i < run.count; i += 1, k += 1) {
      fresh[k].host = (run.start + i) * clusterBytes;
      fresh[k].fresh = run.fresh;
    }
  }
}

/** Regular files read zeros past their end; block devices hold old bytes everywhere. */
function _growsWithHoles(file: ImageFile): boolean {
  try {
    return !Deno.statSync(file.path).isBlockDevice;
  } catch {
    return true; // not a path (an in-memory test file)
  }
}

/** Refuses what the driver cannot serve, naming the feature. */
function _refuseUnsupported(file: ImageFile, image: Qcow2Image): void {
  const problem = unsupportedFeature(image.header);
  if (problem) throw new Qcow2FormatError(file.path, problem);
  if (file.writable && (image.header.incompatible & INCOMPAT_CORRUPT) !== 0n) {
    throw new Qcow2FormatError(
      file.path,
      "image is marked corrupt (corrupt bit); open it read-only or run check --repair",
    );
  }
}
