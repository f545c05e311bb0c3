/**
 * The requesting end of one ring device, as ctrl (or a test) drives it:
 * takes ring slots, writes requests, publishes them with notification
 * suppression and matches responses to their requests by id.
 *
 * Supervision lives here (DESIGN.md §5): every request stays recorded (its
 * 112 ring bytes; its data and indirect pages stay allocated by the
 * caller) until its response arrives. When the disk process dies,
 * {@linkcode RingProducer.rearm} re-initialises the ring and writes every
 * unanswered request into it again, in the order they were first issued;
 * block reads and writes are idempotent, so the caller sees delay, never an
 * error. An answered write needs nothing from this side: every driver
 * makes it survive its own process's death (src/formats/driver.ts,
 * `write`), so nothing is kept or replayed once answered.
 * {@linkcode RingProducer.fail} answers everything with an error instead
 * (a disk that keeps crashing).
 * @module
 */
import { BlockError } from "../formats/driver.ts";
import * as B from "./blkif.ts";
import { type Fence, FrontRing } from "./ring.ts";
import {
  type Segment,
  segmentSectors,
  writeDiscardRequest,
  writeIndirectRequest,
  writeRwRequest,
  writeSegment,
} from "./request.ts";
import { writeBlockStatusRequest } from "./block_status.ts";
import { PagePool } from "./page_pool.ts";

/** The memory of a ring device as the requesting end sees it. */
export interface RingMemory {
  ring: Uint8Array;
  pool: Uint8Array;
}

interface Pending {
  entry: Uint8Array;
  resolve: (status: number) => void;
  /** Indirect descriptor pages to free on completion. */
  indirect?: { first: number; count: number };
}

/**
 * The front end asks to be kicked once 1/this of the responses it awaits
 * are published, not at every one (rsp_event hold-off): with 32 awaited, a
 * busy ring wakes ctrl once per 8 responses. The rest keep the disk busy
 * meanwhile; a lone request (fewer than this awaited) is answered at once.
 */
export const response_batch_divisor = 4;

/** Issues requests on one ring and keeps them until they are answered. */
export class RingProducer {
  readonly pool: Uint8Array;
  readonly pages: PagePool;
  readonly #memory: RingMemory;
  readonly #fence: Fence;
  #front: FrontRing;
  #nextId = 1;
  readonly #pending = new Map<number, Pending>();
  #slotWaiters: (() => void)[] = [];
  #kick: (() => void) | undefined;
  #pushScheduled = false;
  #failed = false;

  constructor(memory: RingMemory, fence: Fence) {
    this.#memory = memory;
    this.pool = memory.pool;
    this.pages = new PagePool(Math.floor(memory.pool.byteLength / B.PAGE_BYTES));
    this.#fence = fence;
    this.#front = FrontRing.init(memory.ring, fence);
  }

  /** Requests issued and not yet answered. */
  get outstanding(): number {
    return this.#pending.size;
  }

  /** Ring entries (the most requests in flight). */
  get entries(): number {
    return this.#front.entries;
  }

  get failed(): boolean {
    return this.#failed;
  }

  // ---- supervision ------------------------------------------------------

  /** A disk process is serving: kicks go to it (and one now, for re-issued requests). */
  attach(kick: () => void): void {
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
    const held = [...this.#pending.values()];
    const view = this.#front.sring.view;
    for (const pending of held) {
      const offset = this.#front.nextRequestOffset();
      new Uint8Array(view.buffer, view.byteOffset + offset, B.ENTRY_BYTES).set(pending.entry);
    }
    if (this.#front.pushRequestsAndCheckNotify() || held.length > 0) this.#kick?.();
    return held.length;
  }

  /** The disk is failed: every unanswered and future request gets ERROR. */
  fail(): void {
    this.#failed = true;
    this.#kick = undefined;
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
    } while (this.#front.finalCheckForResponses(this.#responseBatch()));
    if (progressed) this.#wakeSlotWaiters();
  }

  // How many responses to wait for before being kicked: a share of those
  // awaited, so a busy ring wakes this side once per batch, not per
  // response; 1 when few are awaited (a lone request is answered at once).
  #responseBatch(): number {
    return Math.max(1, Math.floor(this.#front.awaitedResponses() / response_batch_divisor));
  }

  #complete(pending: Pending, status: number): void {
    if (pending.indirect) this.pages.release(pending.indirect.first, pending.indirect.count);
    pending.resolve(status);
  }

  #wakeSlotWaiters(): void {
    const waiters = this.#slotWaiters;
    this.#slotWaiters = [];
    for (const w of waiters) w();
  }

  // ---- requests ---------------------------------------------------------

  // What a request must wait for before taking a ring slot, or undefined
  // if it may take one now. Checked again after every wait (several waiters
  // wake together) and right before the slot is taken (no await between).
  #obstacle(): Promise<void> | undefined {
    if (this.#failed || this.#front.freeRequests() > 0) return undefined;
    return new Promise<void>((resolve) => this.#slotWaiters.push(resolve));
  }

  // Writes one entry (filled by `fill`) and records it; resolves to the status.
  async #issue(
    fill: (view: DataView, offset: number, id: bigint) => void,
    indirect?: Pending["indirect"],
  ) {
    for (let wait = this.#obstacle(); wait; wait = this.#obstacle()) await wait;
    if (this.#failed) {
      if (indirect) this.pages.release(indirect.first, indirect.count);
      return B.BLKIF_RSP_ERROR;
    }
    const id = this.#nextId++;
    const view = this.#front.sring.view;
    const offset = this.#front.nextRequestOffset();
    fill(view, offset, BigInt(id));
    const entry = new Uint8Array(view.buffer, view.byteOffset + offset, B.ENTRY_BYTES).slice();
    const done = new Promise<number>((resolve) =>
      this.#pending.set(id, { entry, indirect, resolve })
    );
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
   */
  async submitRw(operation: number, sector: number, segments: Segment[]): Promise<number> {
    if (segments.length <= B.SEGMENTS_PER_REQUEST_MAX) {
      return await this.#issue((v, o, id) =>
        writeRwRequest(v, o, { operation, id, sector, segments })
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
      { first, count },
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

/** Throws the {@linkcode BlockError} a blkif status means (nothing for OKAY). */
export function throwForStatus(status: number, what: string, path: string): void {
  if (status === B.BLKIF_RSP_OKAY) return;
  if (status === B.BLKIF_RSP_EOPNOTSUPP) {
    throw new BlockError("EOPNOTSUPP", `${path}: ${what} not supported`);
  }
  throw new BlockError("EIO", `${path}: ${what} failed (blkif status ${status})`);
}
