/**
 * Both ends of a Xen shared ring (io/ring.h) over plain bytes: the front end
 * produces requests and consumes responses, the back end the reverse.
 * Indexes are free-running u32 (they wrap at 2^32); a slot is `index & (n-1)`.
 *
 * The memory may be shared with another process through an mmap; the
 * caller injects a full fence (`memoryFence` from ffi/memory.ts, or a no-op
 * for tests over one ArrayBuffer), called where io/ring.h puts wmb(), rmb()
 * and mb(). The four indexes are read and written with `Atomics` (whole
 * aligned u32 accesses): a DataView may move them a byte at a time, and a
 * peer then reads a torn index (255 -> 256 read as 511: a ring protocol
 * error, the disk stopped).
 * @module
 */
import {
  ENTRY_BYTES,
  ringEntries,
  RSP_ID,
  RSP_OPERATION,
  RSP_STATUS,
  SRING_HEADER_BYTES,
  SRING_REQ_EVENT,
  SRING_REQ_PROD,
  SRING_RSP_EVENT,
  SRING_RSP_PROD,
} from "./blkif.ts";

/** A memory barrier; io/ring.h's mb()/wmb()/rmb() all map to it. */
export type Fence = () => void;

/** The front end broke the ring protocol (blkback's "bogus ring requests"). */
export class RingProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "RingProtocolError";
  }
}

/** One response as read from the ring. */
export interface BlkifResponse {
  id: bigint;
  operation: number;
  status: number;
}

function u32(n: number): number {
  return n >>> 0;
}

/** The shared header and entry array (struct blkif_sring) seen through a DataView. */
export class SharedRing {
  readonly view: DataView;
  readonly entries: number;
  readonly fence: Fence;
  /** The header as u32s (host order: x86_64 is little-endian, as the ABI). */
  readonly #indexes: Uint32Array;

  constructor(bytes: Uint8Array, fence: Fence) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (bytes.byteOffset % 4 !== 0) throw new RangeError("shared ring not 4-byte aligned");
    this.#indexes = new Uint32Array(bytes.buffer, bytes.byteOffset, SRING_HEADER_BYTES / 4);
    this.entries = ringEntries(bytes.byteLength);
    this.fence = fence;
  }

  /** SHARED_RING_INIT: indexes 0, event indexes 1, padding zero. */
  init(): void {
    for (let i = 0; i < SRING_HEADER_BYTES; i += 4) this.view.setUint32(i, 0, true);
    this.reqEvent = 1;
    this.rspEvent = 1;
    this.fence();
  }

  /** Byte offset of entry `index` (any u32; reduced modulo the ring size). */
  entryOffset(index: number): number {
    return SRING_HEADER_BYTES + (index & (this.entries - 1)) * ENTRY_BYTES;
  }

  get reqProd(): number {
    return Atomics.load(this.#indexes, SRING_REQ_PROD / 4);
  }
  set reqProd(v: number) {
    Atomics.store(this.#indexes, SRING_REQ_PROD / 4, v);
  }
  get reqEvent(): number {
    return Atomics.load(this.#indexes, SRING_REQ_EVENT / 4);
  }
  set reqEvent(v: number) {
    Atomics.store(this.#indexes, SRING_REQ_EVENT / 4, v);
  }
  get rspProd(): number {
    return Atomics.load(this.#indexes, SRING_RSP_PROD / 4);
  }
  set rspProd(v: number) {
    Atomics.store(this.#indexes, SRING_RSP_PROD / 4, v);
  }
  get rspEvent(): number {
    return Atomics.load(this.#indexes, SRING_RSP_EVENT / 4);
  }
  set rspEvent(v: number) {
    Atomics.store(this.#indexes, SRING_RSP_EVENT / 4, v);
  }
}

/**
 * Notify iff the peer's event index lies in (old, new]: io/ring.h's
 * `(RING_IDX)(new - event) < (RING_IDX)(new - old)`.
 */
export function eventInWindow(oldIndex: number, newIndex: number, event: number): boolean {
  return u32(newIndex - event) < u32(newIndex - oldIndex);
}

/** The requesting end (blkfront; ctrl's RingDisk; the test front end). */
export class FrontRing {
  readonly sring: SharedRing;
  /** req_prod_pvt: requests written but maybe not yet published. */
  reqProdPvt = 0;
  /** rsp_cons: responses consumed. */
  rspCons = 0;

  constructor(sring: SharedRing) {
    this.sring = sring;
  }

  /** FRONT_RING_INIT over a freshly initialised shared ring. */
  static init(bytes: Uint8Array, fence: Fence): FrontRing {
    const sring = new SharedRing(bytes, fence);
    sring.init();
    return new FrontRing(sring);
  }

  get entries(): number {
    return this.sring.entries;
  }

  /** RING_FREE_REQUESTS. */
  freeRequests(): number {
    const used = u32(this.reqProdPvt - this.rspCons);
    if (used > this.entries) {
      throw new Error(`front ring: ${used} requests outstanding > ${this.entries}`);
    }
    return this.entries - used;
  }

  /** RING_GET_REQUEST for the next private slot; advances req_prod_pvt. */
  nextRequestOffset(): number {
    if (this.freeRequests() === 0) throw new Error("front ring: no free request slot");
    const offset = this.sring.entryOffset(this.reqProdPvt);
    this.reqProdPvt = u32(this.reqProdPvt + 1);
    return offset;
  }

  /** RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publishes, returns whether to kick. */
  pushRequestsAndCheckNotify(): boolean {
    const s = this.sring;
    const old = s.reqProd;
    const next = this.reqProdPvt;
    s.fence(); // wmb: requests visible before req_prod
    s.reqProd = next;
    s.fence(); // mb: req_prod visible before reading req_event
    return eventInWindow(old, next, s.reqEvent);
  }

  /** RING_HAS_UNCONSUMED_RESPONSES, with the rmb after reading rsp_prod. */
  unconsumedResponses(): number {
    const prod = this.sring.rspProd;
    this.sring.fence();
    const n = u32(prod - this.rspCons);
    if (n > this.entries) throw new RingProtocolError(`back end published ${n} responses`);
    return n;
  }

  /** Reads the response at rsp_cons and advances it. */
  takeResponse(): BlkifResponse {
    const v = this.sring.view;
    const offset = this.sring.entryOffset(this.rspCons);
    this.rspCons = u32(this.rspCons + 1);
    if (u32(this.reqProdPvt - this.rspCons) > this.entries) {
      throw new RingProtocolError("response without a request");
    }
    return {
      id: v.getBigUint64(offset + RSP_ID, true),
      operation: v.getUint8(offset + RSP_OPERATION),
      status: v.getInt16(offset + RSP_STATUS, true),
    };
  }

  /** Requests published and not yet answered (rsp_cons to req_prod). */
  awaitedResponses(): number {
    return u32(this.sring.reqProd - this.rspCons);
  }

  /**
   * RING_FINAL_CHECK_FOR_RESPONSES: arms rsp_event; true if work arrived
   * meanwhile. `batch` > 1 asks to be notified only once that many more
   * responses are published, not at the next one (Xen's rsp_event is
   * exactly this hold-off); it must not exceed the published requests
   * still unanswered, so the notification surely comes.
   */
  finalCheckForResponses(batch = 1): boolean {
    if (this.unconsumedResponses() > 0) return true;
    if (!(batch >= 1 && (batch === 1 || batch <= this.awaitedResponses()))) {
      throw new RangeError(`response batch ${batch} of ${this.awaitedResponses()} awaited`);
    }
    this.sring.rspEvent = u32(this.rspCons + batch);
    this.sring.fence();
    return this.unconsumedResponses() > 0;
  }
}

/** The serving end (blkback; the disk process). */
export class BackRing {
  readonly sring: SharedRing;
  /** req_cons: requests consumed. */
  reqCons: number;
  /** rsp_prod_pvt: responses written but maybe not yet published. */
  rspProdPvt: number;

  /** BACK_RING_ATTACH at the shared ring's current rsp_prod. */
  constructor(bytes: Uint8Array, fence: Fence) {
    this.sring = new SharedRing(bytes, fence);
    this.rspProdPvt = this.sring.rspProd;
    this.reqCons = this.rspProdPvt;
  }

  get entries(): number {
    return this.sring.entries;
  }

  /**
   * RING_UNCONSUMED_REQUESTS with blkback's RING_REQUEST_PROD_OVERFLOW check:
   * a front end claiming more requests than slots is a protocol error.
   */
  unconsumedRequests(): number {
    const prod = this.sring.reqProd;
    this.sring.fence(); // rmb: read requests after req_prod
    if (u32(prod - this.rspProdPvt) > this.entries) {
      throw new RingProtocolError(
        `req_prod ${prod} is more than ${this.entries} ahead of rsp_prod ${this.rspProdPvt}`,
      );
    }
    const requests = u32(prod - this.reqCons);
    const room = this.entries - u32(this.reqCons - this.rspProdPvt);
    return Math.min(requests, room);
  }

  /** Offset of the request at req_cons; advances it. The caller copies it out. */
  takeRequestOffset(): number {
    const offset = this.sring.entryOffset(this.reqCons);
    this.reqCons = u32(this.reqCons + 1);
    if (u32(this.reqCons - this.rspProdPvt) > this.entries) {
      throw new Error("back ring: consumed more requests than there are response slots");
    }
    return offset;
  }

  /** Writes a response at rsp_prod_pvt (not yet published). */
  putResponse(id: bigint, operation: number, status: number): void {
    if (u32(this.reqCons - this.rspProdPvt) === 0) {
      throw new Error("back ring: response without an outstanding request");
    }
    const v = this.sring.view;
    const offset = this.sring.entryOffset(this.rspProdPvt);
    v.setBigUint64(offset + RSP_ID, id, true);
    v.setUint8(offset + RSP_OPERATION, operation);
    v.setUint8(offset + RSP_OPERATION + 1, 0);
    v.setInt16(offset + RSP_STATUS, status, true);
    v.setUint32(offset + RSP_STATUS + 2, 0, true);
    this.rspProdPvt = u32(this.rspProdPvt + 1);
  }

  /** RING_PUSH_RESPONSES_AND_CHECK_NOTIFY. */
  pushResponsesAndCheckNotify(): boolean {
    const s = this.sring;
    const old = s.rspProd;
    const next = this.rspProdPvt;
    if (old === next) return false;
    s.fence(); // wmb
    s.rspProd = next;
    s.fence(); // mb
    return eventInWindow(old, next, s.rspEvent);
  }

  /** RING_FINAL_CHECK_FOR_REQUESTS: arms req_event; true if work arrived meanwhile. */
  finalCheckForRequests(): boolean {
    if (this.unconsumedRequests() > 0) return true;
    this.sring.reqEvent = u32(this.reqCons + 1);
    this.sring.fence();
    return this.unconsumedRequests() > 0;
  }
}
