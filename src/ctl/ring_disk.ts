/**
 * The front end of one ring device inside ctrl: a {@linkcode BlockDriver}
 * whose calls become blkif requests, so the NBD server (and the test front
 * end) can use any minor like a local image. It is also a
 * {@linkcode BufferLender}: borrowed buffers are data-pool pages, so
 * payloads land in the ring's memory without a copy.
 *
 * Supervision lives here: every request stays recorded (its 112 ring bytes;
 * its data and indirect pages stay allocated) until its response arrives.
 * When the disk process dies, {@linkcode RingDisk.rearm} re-initialises the
 * ring and writes every unanswered request into it again, in the order they
 * were first issued; block reads and writes are idempotent, so the caller
 * sees delay, never an error. For disks whose acknowledged writes may die
 * with the process (write-back metadata), acknowledged writes not yet
 * covered by a flush are replayed first (src/ctl/replay_log.ts).
 * {@linkcode RingDisk.fail} answers everything with an error instead (a
 * disk that keeps crashing).
 *
 * Block status goes to the disk process too (blktap's BLOCK_STATUS ring
 * operation, src/ring/block_status.ts): only it knows the image's
 * allocation, and ctrl must not open the image behind its back.
 * @module
 */
import {
  BlockDriverBase,
  BlockError,
  type BufferLender,
  type DriverCapabilities,
  type Extent,
} from "../formats/driver.ts";
import * as B from "../ring/blkif.ts";
import {
  block_status_length_bytes_max,
  decodeBlockStatusReply,
  writeBlockStatusQuery,
  writeBlockStatusRequest,
} from "../ring/block_status.ts";
import { type Fence, FrontRing } from "../ring/ring.ts";
import {
  type Segment,
  segmentSectors,
  writeDiscardRequest,
  writeIndirectRequest,
  writeRwRequest,
  writeSegment,
} from "../ring/request.ts";
import { PagePool } from "./page_pool.ts";
import { type LoggedWrite, replay_log_bytes_max, ReplayLog } from "./replay_log.ts";

/** Largest payload of one ring request: an indirect request's segments. */
export const request_bytes_max = B.indirect_segments_max * B.PAGE_BYTES;

/**
 * Ring requests one `blockStatus` call makes at most (each answers up to a
 * page of extents); past that it answers short, as NBD allows.
 */
export const block_status_requests_per_call_max = 8;

/** The memory of a ring device as the front end sees it. */
export interface RingMemory {
  ring: Uint8Array;
  pool: Uint8Array;
}

interface Pending {
  entry: Uint8Array;
  resolve: (status: number) => void;
  /** Indirect descriptor pages to free on completion. */
  indirect?: { first: number; count: number };
  /** A write: where its data is, for the replay log. */
  write?: { sector: number; segments: Segment[] };
  /** A flush: the replay log sequence it covers. */
  flushCovers?: number;
  /** Issued by a replay (not logged again; dropped if the replay restarts). */
  replay?: boolean;
}

/** Status given to replay writes abandoned because the disk restarted again. */
const STATUS_ABANDONED = -1000;

/** How a request is issued. */
interface IssueOptions {
  indirect?: Pending["indirect"];
  write?: Pending["write"];
  flush?: boolean;
  replay?: boolean;
  /** For a replay write: the replay it belongs to (a later replay supersedes it). */
  replayGeneration?: number;
}

/** A minor seen as a block device. */
export class RingDisk extends BlockDriverBase implements BufferLender {
  readonly format = "ring";
  readonly path: string;
  readonly pool: Uint8Array;
  readonly pages: PagePool;
  readonly #memory: RingMemory;
  readonly #fence: Fence;
  readonly #readOnly: boolean;
  #sizeBytes: number;
  #front: FrontRing;
  #nextId = 1;
  readonly #pending = new Map<number, Pending>();
  #slotWaiters: (() => void)[] = [];
  #kick: (() => void) | undefined;
  #pushScheduled = false;
  #failed = false;
  #rmwLock: Promise<void> = Promise.resolve();
  /** Set when the disk's acknowledged writes may die with its process. */
  #keepWrites = false;
  readonly #log = new ReplayLog();
  #logFlushing = false;
  /** While a replay runs, new requests wait here. */
  #gate: Promise<void> | undefined;
  #replayGeneration = 0;
  /** The disk process answered EOPNOTSUPP to block status: everything is data. */
  #extentsUnsupported = false;

  constructor(
    name: string,
    memory: RingMemory,
    options: { fence: Fence; readOnly: boolean; sizeBytes: number },
  ) {
    super();
    this.path = name;
    this.#memory = memory;
    this.pool = memory.pool;
    this.pages = new PagePool(Math.floor(memory.pool.byteLength / B.PAGE_BYTES));
    this.#fence = options.fence;
    this.#readOnly = options.readOnly;
    this.#sizeBytes = options.sizeBytes;
    this.#front = FrontRing.init(memory.ring, options.fence);
  }

  get sizeBytes(): number {
    return this.#sizeBytes;
  }

  get capabilities(): DriverCapabilities {
    const canWrite = !this.#readOnly;
    return {
      canWrite,
      canFlush: true,
      canFua: false,
      canDiscard: canWrite,
      canZero: false,
      canExtents: !this.#extentsUnsupported,
      canMultiConn: true,
    };
  }

  /** Requests issued and not yet answered. */
  get outstanding(): number {
    return this.#pending.size;
  }

  /** Ring entries (the most requests in flight). */
  get ringEntries(): number {
    return this.#front.entries;
  }

  get failed(): boolean {
    return this.#failed;
  }

  // ---- supervision ------------------------------------------------------

  /**
   * A disk process is serving: kicks go to it (and one now, for re-issued
   * requests). `volatileWrites`: its acknowledged writes may be lost if it
   * dies before a flush, so keep copies for replay.
   */
  attach(kick: () => void, sizeBytes: number, volatileWrites = false): void {
    this.#sizeBytes = sizeBytes;
    this.#keepWrites = volatileWrites;
    if (!volatileWrites) this.#log.clear();
    // A resume may serve another image, whose driver may have extents.
    this.#extentsUnsupported = false;
    this.#kick = kick;
    this.#pushScheduled = false;
    if (this.#front.pushRequestsAndCheckNotify() || this.#pending.size > 0) kick();
  }

  /** The disk process is gone: stop kicking it. */
  detach(): void {
    this.#kick = undefined;
  }

  /**
   * Before a new disk process starts: takes the responses the old one
   * published, re-initialises the ring and writes every unanswered request
   * into it again. Must only run while no disk process maps the ring.
   */
  rearm(): number {
    this.onKick();
    this.#front = FrontRing.init(this.#memory.ring, this.#fence);
    this.#replayGeneration += 1;
    // Writes of an interrupted replay are replayed again from the log.
    for (const [id, p] of this.#pending) {
      if (!p.replay) continue;
      this.#pending.delete(id);
      this.#complete(p, STATUS_ABANDONED);
    }
    const held = [...this.#pending.values()];
    if (this.#log.length === 0) {
      this.#writeEntries(held);
    } else {
      // A replay already running stops at its next batch (generation changed).
      this.#gate = this.#replay(this.#replayGeneration, held);
    }
    return held.length;
  }

  // Puts recorded requests back into the ring (it has room: they fit before).
  #writeEntries(entries: Pending[]): void {
    const view = this.#front.sring.view;
    for (const pending of entries) {
      const offset = this.#front.nextRequestOffset();
      new Uint8Array(view.buffer, view.byteOffset + offset, B.ENTRY_BYTES).set(pending.entry);
    }
    if (this.#front.pushRequestsAndCheckNotify() || entries.length > 0) this.#kick?.();
  }

  // Replays the log in order, then re-issues the held requests; new requests
  // wait on the gate meanwhile so none overtakes a replayed write.
  async #replay(generation: number, held: Pending[]): Promise<void> {
    for (const batch of this.#log.batches()) {
      await Promise.all(batch.map((w) => this.#replayOne(w, generation)));
      if (generation !== this.#replayGeneration) return;
    }
    const stillPending = new Set(this.#pending.values());
    this.#writeEntries(held.filter((p) => stillPending.has(p)));
    this.#gate = undefined;
  }

  async #replayOne(w: LoggedWrite, generation: number): Promise<void> {
    const count = Math.ceil(w.data.byteLength / B.PAGE_BYTES);
    const first = await this.pages.allocateWait(count);
    try {
      const at = first * B.PAGE_BYTES;
      this.pool.set(w.data, at);
      const segments = poolSegments(at, w.data.byteLength);
      await this.submitRw(B.BLKIF_OP_WRITE, w.sector, segments, generation);
    } finally {
      this.pages.release(first, count);
    }
  }

  /** Everything acknowledged so far is durable (a pause flushed it). */
  writesDurable(): void {
    this.#log.clear();
  }

  /** The disk is failed: every unanswered and future request gets ERROR. */
  fail(): void {
    this.#failed = true;
    this.#kick = undefined;
    this.#log.clear();
    this.#gate = undefined;
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) this.#complete(p, B.BLKIF_RSP_ERROR);
    this.#wakeSlotWaiters();
  }

  // ---- responses --------------------------------------------------------

  /** The back end kicked: consume responses. */
  onKick(): void {
    let progressed = false;
    do {
      while (this.#front.unconsumedResponses() > 0) {
        const response = this.#front.takeResponse();
        const pending = this.#pending.get(Number(response.id));
        if (!pending) continue; // answered before a restart, or not ours
        this.#pending.delete(Number(response.id));
        this.#complete(pending, response.status);
        progressed = true;
      }
    } while (this.#front.finalCheckForResponses());
    if (progressed) this.#wakeSlotWaiters();
  }

  #complete(pending: Pending, status: number): void {
    if (pending.indirect) this.pages.release(pending.indirect.first, pending.indirect.count);
    if (status === B.BLKIF_RSP_OKAY) this.#logCompletion(pending);
    pending.resolve(status);
  }

  #logCompletion(pending: Pending): void {
    if (pending.flushCovers !== undefined) this.#log.trim(pending.flushCovers);
    if (!this.#keepWrites || !pending.write || pending.replay) return;
    this.#log.add(pending.write.sector, this.#copySegments(pending.write.segments));
    if (this.#log.bytes > replay_log_bytes_max && !this.#logFlushing) {
      // Bound the log: a flush makes the logged writes safe.
      this.#logFlushing = true;
      this.submitFlush().finally(() => this.#logFlushing = false);
    }
  }

  #copySegments(segments: Segment[]): Uint8Array {
    const out = new Uint8Array(segmentSectors(segments) * B.SECTOR_BYTES);
    let at = 0;
    for (const s of segments) {
      const start = s.gref * B.PAGE_BYTES + s.firstSect * B.SECTOR_BYTES;
      const end = s.gref * B.PAGE_BYTES + (s.lastSect + 1) * B.SECTOR_BYTES;
      out.set(this.pool.subarray(start, end), at);
      at += end - start;
    }
    return out;
  }

  #wakeSlotWaiters(): void {
    const waiters = this.#slotWaiters;
    this.#slotWaiters = [];
    for (const w of waiters) w();
  }

  // ---- requests ---------------------------------------------------------

  // What a request must wait for before taking a ring slot, or undefined
  // if it may take one now. Checked again after every wait and right before
  // the slot is taken (no await between): several waiters wake together,
  // and a replay may have started meanwhile.
  #obstacle(replay: boolean): Promise<void> | undefined {
    if (this.#failed) return undefined;
    if (this.#gate && !replay) return this.#gate;
    if (this.#front.freeRequests() > 0) return undefined;
    return new Promise<void>((resolve) => this.#slotWaiters.push(resolve));
  }

  // Writes one entry (filled by `fill`) and records it; resolves to the status.
  async #issue(
    fill: (view: DataView, offset: number, id: bigint) => void,
    options: IssueOptions = {},
  ) {
    const replay = options.replay ?? false;
    let wait = this.#obstacle(replay);
    while (wait) {
      await wait;
      wait = this.#obstacle(replay);
    }
    if (options.replay && options.replayGeneration !== this.#replayGeneration) {
      // Superseded by a newer replay while waiting for a slot.
      if (options.indirect) this.pages.release(options.indirect.first, options.indirect.count);
      return STATUS_ABANDONED;
    }
    if (this.#failed) {
      if (options.indirect) this.pages.release(options.indirect.first, options.indirect.count);
      return B.BLKIF_RSP_ERROR;
    }
    const id = this.#nextId++;
    const view = this.#front.sring.view;
    const offset = this.#front.nextRequestOffset();
    fill(view, offset, BigInt(id));
    const entry = new Uint8Array(view.buffer, view.byteOffset + offset, B.ENTRY_BYTES).slice();
    const pending: Omit<Pending, "resolve"> = {
      entry,
      indirect: options.indirect,
      write: options.write,
      replay: options.replay,
      flushCovers: options.flush ? this.#log.lastSeq : undefined,
    };
    const done = new Promise<number>((resolve) => this.#pending.set(id, { ...pending, resolve }));
    this.#schedulePush();
    return await done;
  }

  #schedulePush(): void {
    if (this.#pushScheduled) return;
    this.#pushScheduled = true;
    queueMicrotask(() => {
      this.#pushScheduled = false;
      if (this.#front.pushRequestsAndCheckNotify()) this.#kick?.();
    });
  }

  /**
   * A READ or WRITE over `segments` (pool pages), direct when it fits in
   * 11 segments, else indirect. Resolves to the blkif status.
   * `replayGeneration` is for the replay of logged writes only.
   */
  async submitRw(
    operation: number,
    sector: number,
    segments: Segment[],
    replayGeneration?: number,
  ): Promise<number> {
    const replay = replayGeneration !== undefined;
    const options: IssueOptions = { replay, replayGeneration };
    if (operation === B.BLKIF_OP_WRITE) options.write = { sector, segments };
    if (segments.length <= B.SEGMENTS_PER_REQUEST_MAX) {
      return await this.#issue(
        (v, o, id) => writeRwRequest(v, o, { operation, id, sector, segments }),
        options,
      );
    }
    if (segments.length > B.indirect_segments_max) {
      throw new RangeError(`${segments.length} segments`);
    }
    const count = Math.ceil(segments.length / B.SEGMENTS_PER_INDIRECT_PAGE);
    const first = await this.pages.allocateWait(count);
    const pool = new DataView(this.pool.buffer, this.pool.byteOffset, this.pool.byteLength);
    segments.forEach((s, i) => writeSegment(pool, first * B.PAGE_BYTES + i * B.SEGMENT_BYTES, s));
    const indirectGrefs = Array.from({ length: count }, (_, i) => first + i);
    return await this.#issue(
      (v, o, id) =>
        writeIndirectRequest(v, o, {
          indirectOp: operation,
          id,
          sector,
          nrSegments: segments.length,
          indirectGrefs,
        }),
      { ...options, indirect: { first, count } },
    );
  }

  /** FLUSH_DISKCACHE without data. */
  submitFlush(): Promise<number> {
    return this.#issue(
      (v, o, id) =>
        writeRwRequest(v, o, {
          operation: B.BLKIF_OP_FLUSH_DISKCACHE,
          id,
          sector: 0,
          segments: [],
        }),
      { flush: true },
    );
  }

  /** DISCARD of `nrSectors` from `sector`. */
  submitDiscard(sector: number, nrSectors: number, flag = 0): Promise<number> {
    return this.#issue((v, o, id) => writeDiscardRequest(v, o, { id, sector, nrSectors, flag }));
  }

  /**
   * BLOCK_STATUS from `sector`; pool page `gref` already holds the query
   * and receives the answer. Idempotent: re-issued after a restart like a read.
   */
  submitBlockStatus(sector: number, gref: number): Promise<number> {
    return this.#issue((v, o, id) => writeBlockStatusRequest(v, o, { id, sector, gref }));
  }

  /** Any 112 bytes as a request (fuzzing); the id field is replaced by ours. */
  submitRaw(entry: Uint8Array): Promise<number> {
    return this.#issue((v, o, id) => {
      new Uint8Array(v.buffer, v.byteOffset + o, B.ENTRY_BYTES).set(
        entry.subarray(0, B.ENTRY_BYTES),
      );
      v.setBigUint64(o + B.REQ_ID, id, true);
    });
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
    if (buffer.buffer !== this.pool.buffer) return undefined;
    const offset = buffer.byteOffset - this.pool.byteOffset;
    if (offset < 0 || offset + buffer.byteLength > this.pool.byteLength) return undefined;
    return offset;
  }

  // ---- BlockDriver ------------------------------------------------------

  protected async _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    if (!isSectorAligned(offsetBytes, buffer.byteLength)) {
      return await this.#readUnaligned(offsetBytes, buffer);
    }
    await this.#transfer(B.BLKIF_OP_READ, offsetBytes, buffer);
  }

  protected async _write(offsetBytes: number, data: Uint8Array): Promise<void> {
    if (!isSectorAligned(offsetBytes, data.byteLength)) {
      return await this.#writeUnaligned(offsetBytes, data);
    }
    await this.#transfer(B.BLKIF_OP_WRITE, offsetBytes, data);
  }

  protected async _flush(): Promise<void> {
    throwForStatus(await this.submitFlush(), "flush", this.path);
  }

  protected override async _discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    // Discard is advisory: the sector-aligned inside of the range is enough.
    const first = Math.ceil(offsetBytes / B.SECTOR_BYTES);
    const end = Math.floor((offsetBytes + lengthBytes) / B.SECTOR_BYTES);
    if (end <= first) return;
    throwForStatus(await this.submitDiscard(first, end - first), "discard", this.path);
  }

  protected override async _blockStatus(
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<Extent[]> {
    if (this.#extentsUnsupported) return await super._blockStatus(offsetBytes, lengthBytes);
    const gref = await this.pages.allocateWait(1);
    try {
      return await this.#blockStatusRounds(gref, offsetBytes, offsetBytes + lengthBytes);
    } finally {
      this.pages.release(gref, 1);
    }
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  // Asks again from where each answer stopped, up to a bound; the result
  // is non-empty and consecutive from `offsetBytes`, possibly short.
  async #blockStatusRounds(gref: number, offsetBytes: number, end: number): Promise<Extent[]> {
    const extents: Extent[] = [];
    let position = offsetBytes;
    for (let round = 0; round < block_status_requests_per_call_max && position < end; round++) {
      const answer = await this.#blockStatusOnce(gref, position, end);
      // No answer (EOPNOTSUPP), or one ending inside the sector before
      // `position`: "data" is always a true answer, up to the next sector.
      const reached = answer ? _appendFrom(extents, answer, position) : position;
      if (reached > position) {
        position = reached;
        continue;
      }
      const stop = answer ? Math.min(end, _nextSector(position)) : end;
      const data = { offsetBytes: position, lengthBytes: stop - position };
      _appendFrom(extents, [{ ...data, hole: false, zero: false }], position);
      position = stop;
    }
    if (extents.length === 0 || extents[0].offsetBytes !== offsetBytes) {
      throw new Error(`${this.path}: block status arithmetic at ${offsetBytes}`);
    }
    return extents;
  }

  // One BLOCK_STATUS request for [position, end) from the sector holding
  // `position`; undefined when the disk process has no block status.
  async #blockStatusOnce(gref: number, position: number, end: number) {
    const start = position - (position % B.SECTOR_BYTES);
    const length = Math.min(end - start, block_status_length_bytes_max);
    const page = this.pool.subarray(gref * B.PAGE_BYTES, (gref + 1) * B.PAGE_BYTES);
    writeBlockStatusQuery(page, length);
    const status = await this.submitBlockStatus(start / B.SECTOR_BYTES, gref);
    if (status === B.BLKIF_RSP_EOPNOTSUPP) {
      this.#extentsUnsupported = true;
      return undefined;
    }
    throwForStatus(status, "block status", this.path);
    try {
      return decodeBlockStatusReply(page, start, length);
    } catch (error) {
      throw new BlockError("EIO", `${this.path}: ${(error as Error).message}`);
    }
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
    const status = await this.submitRw(operation, offsetBytes / B.SECTOR_BYTES, segments);
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

// Appends `answer` clipped to start at `position` (merging equal
// neighbours); returns where the extents now end.
function _appendFrom(extents: Extent[], answer: Extent[], position: number): number {
  for (const e of answer) {
    const start = Math.max(e.offsetBytes, position);
    const stop = e.offsetBytes + e.lengthBytes;
    if (stop <= start) continue;
    const last = extents[extents.length - 1];
    if (last && last.offsetBytes + last.lengthBytes !== start) {
      throw new Error(`block status: extent at ${start} after one ending elsewhere`);
    }
    const piece = { offsetBytes: start, lengthBytes: stop - start, hole: e.hole, zero: e.zero };
    if (last && last.hole === e.hole && last.zero === e.zero) {
      last.lengthBytes = stop - last.offsetBytes;
    } else extents.push(piece);
    position = stop;
  }
  return position;
}

function _nextSector(offsetBytes: number): number {
  return (Math.floor(offsetBytes / B.SECTOR_BYTES) + 1) * B.SECTOR_BYTES;
}

function isSectorAligned(offsetBytes: number, lengthBytes: number): boolean {
  return offsetBytes % B.SECTOR_BYTES === 0 && lengthBytes % B.SECTOR_BYTES === 0;
}

/** Segments covering pool bytes `[start, start+length)` (sector-aligned). */
export function poolSegments(start: number, lengthBytes: number): Segment[] {
  const segments: Segment[] = [];
  const end = start + lengthBytes;
  for (let at = start; at < end;) {
    const gref = Math.floor(at / B.PAGE_BYTES);
    const pageEnd = Math.min((gref + 1) * B.PAGE_BYTES, end);
    const firstSect = (at % B.PAGE_BYTES) / B.SECTOR_BYTES;
    const lastSect = (pageEnd - gref * B.PAGE_BYTES) / B.SECTOR_BYTES - 1;
    segments.push({ gref, firstSect, lastSect });
    at = pageEnd;
  }
  if (segmentSectors(segments) * B.SECTOR_BYTES !== lengthBytes) {
    throw new Error("segment arithmetic");
  }
  return segments;
}

function throwForStatus(status: number, what: string, path: string): void {
  if (status === B.BLKIF_RSP_OKAY) return;
  if (status === B.BLKIF_RSP_EOPNOTSUPP) {
    throw new BlockError("EOPNOTSUPP", `${path}: ${what} not supported`);
  }
  throw new BlockError("EIO", `${path}: ${what} failed (blkif status ${status})`);
}
