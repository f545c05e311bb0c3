/**
 * A minor seen as a block device: a {@linkcode BlockDriver} whose calls
 * become blkif requests on the minor's ring ({@linkcode RingProducer}), so
 * the NBD server (and the test front end) can use any minor like a local
 * image. It is also a {@linkcode BufferLender}: borrowed buffers are
 * data-pool pages, so payloads land in the ring's memory without a copy.
 *
 * A raw image served through the page cache may be read and written here
 * too ({@linkcode PageCache}): what is cached is copied in place, the rest
 * goes over the ring; large writes go into the page cache on a thread.
 *
 * Block status goes to the disk process too (src/ring/ring_block_status.ts):
 * only it knows the image's allocation, and ctrl opens no image by name (a
 * raw image's file, named by the disk process, answers it as the raw
 * driver would). What it answers as unallocated zeros is remembered
 * ({@linkcode KnownZeros}), so reads there are answered here.
 *
 * Its capabilities are those of the driver the disk process serves (sent
 * in its `ready` message), minus what the ring cannot carry: there is no
 * write-zeroes operation on a blkif ring, so zeros travel as data and fast
 * zeroing is never offered.
 * @module
 */
import {
  BlockDriverBase,
  type BufferLender,
  type CachedSpan,
  type CachedSpanSource,
  type DriverCapabilities,
  type Extent,
  type ZeroReader,
} from "../formats/driver.ts";
import * as B from "./blkif.ts";
import type { PageCache } from "./page_cache.ts";
import { KnownZeros, type ZeroQuery } from "./known_zeros.ts";
import { blockStatusRounds, BlockStatusUnsupported } from "./ring_block_status.ts";
import type { Fence } from "./ring.ts";
import type { PagePool } from "./page_pool.ts";
import { poolSegments, type RingMemory, RingProducer, throwForStatus } from "./ring_producer.ts";

export type { RingMemory } from "./ring_producer.ts";
export { poolSegments } from "./ring_producer.ts";
export { block_status_requests_per_call_max } from "./ring_block_status.ts";

/** Cached reads this long copy on another thread (a thread hop costs more than a small copy). */
const cached_read_beside_bytes_min = 64 << 10;

/**
 * Writes this long go straight into the page cache of a raw image, on
 * another thread (1 MiB: 420 vs 600-650 us of CPU over the ring,
 * bench/results/nbd-ctrlwrite-*); shorter ones cost less over the ring
 * than a thread hop (~30 us here).
 */
const cached_write_bytes_min = 64 << 10;

/** Largest payload of one ring request: an indirect request's segments. */
export const request_bytes_max = B.indirect_segments_max * B.PAGE_BYTES;

/** What a disk process serves, as its `ready` message (or a resume) says. */
export interface ServedDisk {
  sizeBytes: number;
  /** Its driver's capabilities. */
  capabilities: DriverCapabilities;
  /**
   * The disk process's descriptor of a file whose bytes are the disk's at
   * the same offsets, read and written through the page cache (raw images
   * without O_DIRECT): see {@linkcode PageCache}.
   */
  pageCacheFd?: number;
}

/** A minor seen as a block device. */
export class RingDisk extends BlockDriverBase
  implements BufferLender, CachedSpanSource, ZeroReader {
  readonly format = "ring";
  readonly path: string;
  /** The requests on the ring, held until answered (supervision's handle). */
  readonly producer: RingProducer;
  readonly #readOnly: boolean;
  #sizeBytes: number;
  /** The served driver's capabilities; undefined until a disk process first said ready. */
  #served: DriverCapabilities | undefined;
  #rmwLock: Promise<void> = Promise.resolve();
  readonly #zeros: KnownZeros;
  #cached: PageCache | undefined;
  /** Answered without the ring: reads of known zeros, reads and writes of the page cache. */
  readonly #answeredHere = {
    zeroReads: 0,
    cachedReads: 0,
    cachedMisses: 0,
    cachedSends: 0,
    cachedWrites: 0,
  };
  /** Writes into the page cache running now (a pause waits for them). */
  #cachedWriting = 0;
  #cachedWritesDone: (() => void)[] = [];

  constructor(
    name: string,
    memory: RingMemory,
    options: { fence: Fence; readOnly: boolean; sizeBytes: number },
  ) {
    super();
    this.path = name;
    this.producer = new RingProducer(memory, options.fence);
    this.#readOnly = options.readOnly;
    this.#sizeBytes = options.sizeBytes;
    this.#zeros = new KnownZeros(options.sizeBytes);
  }

  get sizeBytes(): number {
    return this.#sizeBytes;
  }

  get pool(): Uint8Array {
    return this.producer.pool;
  }

  get pages(): PagePool {
    return this.producer.pages;
  }

  /** True once a disk process has said what it serves (front ends wait for it). */
  get ready(): boolean {
    return this.#served !== undefined;
  }

  get capabilities(): DriverCapabilities {
    const served = this.#served;
    const canWrite = !this.#readOnly && (served?.canWrite ?? false);
    return {
      canWrite,
      canFlush: served?.canFlush ?? false,
      canDiscard: canWrite && (served?.canDiscard ?? false),
      canZero: false, // no write-zeroes on the ring: zeros are written as data
      canExtents: served?.canExtents ?? false,
      canMultiConn: served?.canMultiConn ?? false,
    };
  }

  /** Requests issued and not yet answered. */
  get outstanding(): number {
    return this.producer.outstanding;
  }

  /** Ring entries (the most requests in flight). */
  get ringEntries(): number {
    return this.producer.entries;
  }

  get failed(): boolean {
    return this.producer.failed;
  }

  // ---- supervision (see RingProducer) -----------------------------------

  /** A disk process serves `served`; see {@linkcode RingProducer.attach}. */
  attach(kick: () => void, served: ServedDisk): void {
    this.#sizeBytes = served.sizeBytes;
    this.#served = served.capabilities;
    this.#zeros.reset(served.sizeBytes);
    this.usePageCache(undefined);
    this.producer.attach(kick);
  }

  /**
   * Reads are tried in `cached` first, and large writes go there when it is
   * writable (undefined: nothing is). Valid only while the disk process
   * that named it serves, not paused.
   */
  usePageCache(cached: PageCache | undefined): void {
    this.#cached?.close();
    this.#cached = cached;
  }

  /**
   * The disk process is asked to hold requests: reads and writes stop being
   * answered here too ({@linkcode cachedWritesDrained} waits for those running).
   */
  paused(): void {
    this.#zeros.reset(this.#sizeBytes);
    this.usePageCache(undefined);
  }

  detach(): void {
    this.#zeros.reset(this.#sizeBytes);
    this.usePageCache(undefined);
    this.producer.detach();
  }

  rearm(): number {
    return this.producer.rearm();
  }

  fail(): void {
    this.usePageCache(undefined);
    this.producer.fail();
  }

  /** Requests answered in ctrl, without the ring (for `stats`). */
  answeredHere(): Readonly<
    Record<"zeroReads" | "cachedReads" | "cachedMisses" | "cachedSends" | "cachedWrites", number>
  > {
    return { ...this.#answeredHere };
  }

  onKick(): void {
    this.producer.onKick();
  }

  // ---- BufferLender -----------------------------------------------------

  borrowBuffer(lengthBytes: number): Uint8Array | undefined {
    const count = Math.max(1, Math.ceil(lengthBytes / B.PAGE_BYTES));
    if (count > this.pages.pages) return undefined;
    const first = this.pages.allocate(count);
    if (first === undefined) return undefined;
    return this.pool.subarray(first * B.PAGE_BYTES, first * B.PAGE_BYTES + lengthBytes);
  }

  returnBuffer(buffer: Uint8Array): void {
    const start = this.#poolOffset(buffer);
    if (start === undefined || start % B.PAGE_BYTES !== 0) {
      throw new Error("returnBuffer: not a borrowed buffer");
    }
    this.pages.release(
      start / B.PAGE_BYTES,
      Math.max(1, Math.ceil(buffer.byteLength / B.PAGE_BYTES)),
    );
  }

  // Offset of `buffer` inside the pool, or undefined if it is elsewhere.
  #poolOffset(buffer: Uint8Array): number | undefined {
    const pool = this.pool;
    if (buffer.buffer !== pool.buffer) return undefined;
    const offset = buffer.byteOffset - pool.byteOffset;
    if (offset < 0 || offset + buffer.byteLength > pool.byteLength) return undefined;
    return offset;
  }

  // ---- ZeroReader -------------------------------------------------------

  readAsZeros(offsetBytes: number, lengthBytes: number): boolean {
    // A failed minor answers nothing, zeros included.
    if (this.producer.failed || !this.#zeros.covers(offsetBytes, lengthBytes)) return false;
    this.#answeredHere.zeroReads += 1;
    return true;
  }

  // ---- CachedSpanSource -------------------------------------------------

  /**
   * The range's bytes to send straight from the image's page cache, if ctrl
   * reads it ({@linkcode PageCache.lease}) and all of it is cached now.
   */
  leaseCached(offsetBytes: number, lengthBytes: number): CachedSpan | undefined {
    this.checkRange(offsetBytes, lengthBytes);
    if (!this.#cached || this.producer.failed) return undefined;
    const span = this.#cached.lease(offsetBytes, lengthBytes);
    if (!span) return undefined;
    const answered = this.#answeredHere;
    return {
      lengthBytes,
      send: async (socket, head, waitMs) => {
        const sent = await span.send(socket, head, waitMs);
        if (sent) answered.cachedSends++;
        return sent;
      },
      drop: () => span.drop(),
    };
  }

  // ---- BlockDriver ------------------------------------------------------

  protected async _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    if (this.readAsZeros(offsetBytes, buffer.byteLength)) {
      buffer.fill(0);
      return;
    }
    if (this.#cached) {
      const hit = this.#readCached(offsetBytes, buffer);
      if (hit === true || (hit !== false && await hit)) return;
    }
    // #served, not `capabilities`: that getter builds an object per call.
    if (this.#served?.canExtents) {
      const query = this.#zeros.missed(offsetBytes);
      if (query) this.#learnZeros(query);
    }
    if (!isSectorAligned(offsetBytes, buffer.byteLength)) {
      return await this.#readUnaligned(offsetBytes, buffer);
    }
    await this.#transfer(B.BLKIF_OP_READ, offsetBytes, buffer);
  }

  protected async _write(offsetBytes: number, data: Uint8Array): Promise<void> {
    const done = this.#zeros.modify(offsetBytes, data.byteLength);
    try {
      if (this.#cached?.writable && data.byteLength >= cached_write_bytes_min) {
        if (await this.#writeCached(offsetBytes, data)) return;
      }
      if (!isSectorAligned(offsetBytes, data.byteLength)) {
        return await this.#writeUnaligned(offsetBytes, data);
      }
      await this.#transfer(B.BLKIF_OP_WRITE, offsetBytes, data);
    } finally {
      done();
    }
  }

  protected async _flush(): Promise<void> {
    throwForStatus(await this.producer.submitFlush(), "flush", this.path);
  }

  protected override async _discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    // Discard is advisory: the sector-aligned inside of the range is enough.
    const first = Math.ceil(offsetBytes / B.SECTOR_BYTES);
    const end = Math.floor((offsetBytes + lengthBytes) / B.SECTOR_BYTES);
    if (end <= first) return;
    const done = this.#zeros.modify(offsetBytes, lengthBytes);
    try {
      throwForStatus(await this.producer.submitDiscard(first, end - first), "discard", this.path);
    } finally {
      done();
    }
  }

  protected override async _blockStatus(
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<Extent[]> {
    // A driver without extents: everything is data, no need to ask.
    if (!this.capabilities.canExtents) return await super._blockStatus(offsetBytes, lengthBytes);
    if (this.#zeros.covers(offsetBytes, lengthBytes)) {
      return [{ offsetBytes, lengthBytes, hole: true, zero: true }];
    }
    const query = this.#zeros.asking(offsetBytes, lengthBytes);
    let extents: Extent[] | undefined;
    try {
      return extents = await this.#askBlockStatus(offsetBytes, lengthBytes);
    } finally {
      if (query) this.#zeros.learn(query, extents);
    }
  }

  // True once `data` is in the page cache; false to send it over the ring.
  async #writeCached(offsetBytes: number, data: Uint8Array): Promise<boolean> {
    const cached = this.#cached!;
    this.#cachedWriting += 1;
    try {
      await cached.writeBeside(offsetBytes, data);
      this.#answeredHere.cachedWrites += 1;
      return true;
    } catch {
      // The disk process answers it, with its error if the file has one.
      this.#cachedFailed(cached);
      return false;
    } finally {
      if (--this.#cachedWriting === 0) {
        const waiters = this.#cachedWritesDone;
        this.#cachedWritesDone = [];
        for (const w of waiters) w();
      }
    }
  }

  /** Resolves once no write into the page cache is running (see {@linkcode paused}). */
  async cachedWritesDrained(): Promise<void> {
    if (this.#cachedWriting === 0) return;
    await new Promise<void>((resolve) => this.#cachedWritesDone.push(resolve));
  }

  // Small reads copy here and now (no promise on the hot path), large ones beside.
  #readCached(offsetBytes: number, buffer: Uint8Array): boolean | Promise<boolean> {
    const cached = this.#cached!;
    if (buffer.byteLength >= cached_read_beside_bytes_min) {
      return cached.readBeside(offsetBytes, buffer).then(
        (hit) => this.#countCached(hit),
        () => this.#cachedFailed(cached),
      );
    }
    try {
      return this.#countCached(cached.read(offsetBytes, buffer));
    } catch {
      return this.#cachedFailed(cached);
    }
  }

  #countCached(hit: boolean): boolean {
    hit ? this.#answeredHere.cachedReads++ : this.#answeredHere.cachedMisses++;
    return hit;
  }

  // The disk process reports I/O errors; it gets every read from now on.
  #cachedFailed(cached: PageCache): false {
    if (this.#cached === cached) this.usePageCache(undefined);
    return false;
  }

  #cachedBlockStatus(offsetBytes: number, lengthBytes: number): Extent[] | undefined {
    if (!this.#cached) return undefined;
    try {
      return this.#cached.blockStatus(offsetBytes, lengthBytes);
    } catch {
      this.usePageCache(undefined);
      return undefined;
    }
  }

  // Learns in the background what the disk process says reads as zeros.
  async #learnZeros(query: ZeroQuery): Promise<void> {
    let extents: Extent[] | undefined;
    try {
      extents = await this.#askBlockStatus(query.offsetBytes, query.lengthBytes);
    } catch {
      // Nothing learned; the read that asked goes its own way.
    } finally {
      this.#zeros.learn(query, extents);
    }
  }

  async #askBlockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    const answered = this.#cachedBlockStatus(offsetBytes, lengthBytes);
    if (answered) return answered;
    const gref = await this.pages.allocateWait(1);
    const asker = {
      page: this.pool.subarray(gref * B.PAGE_BYTES, (gref + 1) * B.PAGE_BYTES),
      submit: (sector: number) => this.producer.submitBlockStatus(sector, gref),
      path: this.path,
    };
    try {
      return await blockStatusRounds(asker, offsetBytes, offsetBytes + lengthBytes);
    } catch (error) {
      // Its driver could not answer after all: the range is data, as without extents.
      if (!(error instanceof BlockStatusUnsupported)) throw error;
      return await super._blockStatus(offsetBytes, lengthBytes);
    } finally {
      this.pages.release(gref, 1);
    }
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  // Sector-aligned transfer in chunks of at most request_bytes_max.
  async #transfer(operation: number, offsetBytes: number, buffer: Uint8Array): Promise<void> {
    const inPool = this.#poolOffset(buffer);
    const chunks: Promise<void>[] = [];
    for (let done = 0; done < buffer.byteLength;) {
      const length = Math.min(
        request_bytes_max - ((inPool ?? 0) + done) % B.PAGE_BYTES,
        buffer.byteLength - done,
      );
      const piece = buffer.subarray(done, done + length);
      const at = offsetBytes + done;
      chunks.push(
        inPool === undefined
          ? this.#bounced(operation, at, piece)
          : this.#direct(operation, at, piece),
      );
      done += length;
    }
    await Promise.all(chunks);
  }

  async #direct(operation: number, offsetBytes: number, piece: Uint8Array): Promise<void> {
    const segments = poolSegments(this.#poolOffset(piece)!, piece.byteLength);
    const status = await this.producer.submitRw(operation, offsetBytes / B.SECTOR_BYTES, segments);
    throwForStatus(status, operation === B.BLKIF_OP_READ ? "read" : "write", this.path);
  }

  async #bounced(operation: number, offsetBytes: number, piece: Uint8Array): Promise<void> {
    const count = Math.ceil(piece.byteLength / B.PAGE_BYTES);
    const first = await this.pages.allocateWait(count);
    const bounce = this.pool.subarray(
      first * B.PAGE_BYTES,
      first * B.PAGE_BYTES + piece.byteLength,
    );
    try {
      if (operation === B.BLKIF_OP_WRITE) bounce.set(piece);
      await this.#direct(operation, offsetBytes, bounce);
      if (operation === B.BLKIF_OP_READ) piece.set(bounce);
    } finally {
      this.pages.release(first, count);
    }
  }

  async #readUnaligned(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    const start = offsetBytes - (offsetBytes % B.SECTOR_BYTES);
    const end = Math.ceil((offsetBytes + buffer.byteLength) / B.SECTOR_BYTES) * B.SECTOR_BYTES;
    const covering = new Uint8Array(end - start);
    await this.#transfer(B.BLKIF_OP_READ, start, covering);
    buffer.set(covering.subarray(offsetBytes - start, offsetBytes - start + buffer.byteLength));
  }

  // Read-modify-write of the covering sectors, one at a time so two
  // unaligned writes to one sector cannot lose each other's bytes.
  #writeUnaligned(offsetBytes: number, data: Uint8Array): Promise<void> {
    const run = async () => {
      const start = offsetBytes - (offsetBytes % B.SECTOR_BYTES);
      const end = Math.ceil((offsetBytes + data.byteLength) / B.SECTOR_BYTES) * B.SECTOR_BYTES;
      const covering = new Uint8Array(end - start);
      await this.#transfer(B.BLKIF_OP_READ, start, covering);
      covering.set(data, offsetBytes - start);
      await this.#transfer(B.BLKIF_OP_WRITE, start, covering);
    };
    const result = this.#rmwLock.then(run);
    this.#rmwLock = result.catch(() => {});
    return result;
  }
}

function isSectorAligned(offsetBytes: number, lengthBytes: number): boolean {
  return offsetBytes % B.SECTOR_BYTES === 0 && lengthBytes % B.SECTOR_BYTES === 0;
}
