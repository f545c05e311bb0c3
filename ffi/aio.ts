/**
 * Asynchronous I/O through the kernel's libaio or io_uring interface (one
 * queue per process is the usual use). Requests issued in the same
 * JavaScript turn are submitted together by one system call; completions
 * are reaped from memory shared with the kernel, right after each
 * submission (io_uring completes page-cache hits there) and whenever a
 * waiter running off the JavaScript thread says there may be some.
 *
 * Engines: `io_uring` stays asynchronous on the page cache; `libaio` only
 * with O_DIRECT (on the page cache its io_submit copies synchronously), but
 * there its completions are posted from the interrupt, where io_uring's go
 * through task work of the submitting (JavaScript) thread, waking it once
 * more. {@linkcode openQueue} takes a preference and falls back to the other
 * engine; `BLKTAP_IO_ENGINE=libaio|io_uring` forces one.
 * @module
 */
import { check, SysError } from "./errno.ts";
import { shim } from "./shim.ts";

/** One piece of a vectored request: native address and length. */
export interface IoVec {
  address: number;
  lengthBytes: number;
}

/** Kernel interface a queue submits through. */
export type IoEngine = "libaio" | "io_uring";

const ENGINE_KIND: Record<IoEngine, number> = { libaio: 0, io_uring: 1 };
const OP_PREADV = 0;
const OP_PWRITEV = 1;
const OP_FDSYNC = 2;
/** fdatasync of a byte range (shim opcode 3); its length travels in the iovec count field. */
const OP_FDSYNC_RANGE = 3;
/** Longest range one ranged fdatasync names (the field is a u32). */
export const fdsync_range_bytes_max = 0xffff_f000;
/** Record flag: io_uring runs the request in a kernel worker (shim's SHIM_REQ_OFFLOAD). */
const REQ_OFFLOAD = 1;
const REQUEST_RECORD_BYTES = 40;
const IOVEC_BYTES = 16;
const EVENT_BYTES = 16;
// Mirrors SHIM_SUBMIT_MAX in shim/libaio_shim.c.
const submit_batch_max = 256;
const iovecs_per_batch_max = 8192;
/** A waiter returns at least this often, so a closed queue is noticed. */
const wait_timeout_us = 1_000_000n;
const SYSCALL_NAMES = ["preadv", "pwritev", "fdsync", "fdsync"];
/** Promise turns allowed to the completions' continuations before the thread may block. */
const continuation_turns_max = 64;
/** See {@linkcode waitOnThisThread}: 0 = off (the default). */
let thread_wait_us = 0n;
/**
 * Longest the event loop may go without a turn while queues wait on the
 * JavaScript thread: under a steady load completions never stop (each one
 * starts the next request in promise continuations), and what arrives on
 * sockets (ctrl's calls to a disk process) is read only in a turn.
 */
export const event_loop_turn_wait_ms_max = 10;
/** Since when a marker timer waits for the event loop's next turn; undefined: none waits. */
let turn_marker_set_ms: number | undefined;

// Whether the event loop is owed a turn: a marker timer set on the first
// call runs at its next turn; while it has not run there was none.
function eventLoopOwedTurn(): boolean {
  if (thread_wait_us === 0n) return false; // every wait goes off the thread
  const now = performance.now();
  if (turn_marker_set_ms === undefined) {
    turn_marker_set_ms = now;
    setTimeout(() => turn_marker_set_ms = undefined, 0);
  }
  return now - turn_marker_set_ms >= event_loop_turn_wait_ms_max;
}

// A turn of the event loop in which it polls its sockets: a wait for a
// timer. (A wait off the thread that returns at once, completions being
// there already, may end without one.) The marker timer runs first.
function eventLoopTurn(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/**
 * Lets queues wait for completions on the JavaScript thread, up to `us`
 * microseconds at a time, before handing the wait to another thread: the
 * interrupt then wakes this thread directly (one wake-up per round instead
 * of two). Only for a process whose event loop has nothing urgent while its
 * I/O is in flight — the disk process, whose requests arrive in shared
 * memory it looks at on every completion — never for one serving sockets.
 */
export function waitOnThisThread(us: number): void {
  thread_wait_us = BigInt(Math.max(0, Math.floor(us)));
}
const TWO_32 = 2 ** 32;

/** Longest spin allowed on a watched ring index before sleeping, in µs. */
export const ring_spin_us_max = 100;

/** A shared ring index a thread wait also watches ({@linkcode watchRingWhileWaiting}). */
export interface RingWatch {
  /** Native address of the u32 another process advances (a blkif ring's req_prod). */
  address: number;
  /** The value already dealt with: a different one means news. */
  seen(): number;
  /** The index moved: called on the JavaScript thread, before continuations run. */
  moved(): void;
  /** How long to spin on the index (and on completions) before sleeping, µs. */
  spinUs: number;
}
let ring_watch: RingWatch | undefined;

/**
 * While waiting on this thread ({@linkcode waitOnThisThread}), also return as
 * soon as `watch`'s index moves: requests a front end publishes without a
 * kick (it is not asked for one while the disk is busy) are then taken at
 * once, not at the next completion. The spin is bounded by
 * {@linkcode ring_spin_us_max}; after it the wait sleeps for completions
 * only. `undefined` stops watching.
 */
export function watchRingWhileWaiting(watch: RingWatch | undefined): void {
  if (watch && !(watch.spinUs >= 0 && watch.spinUs <= ring_spin_us_max)) {
    throw new RangeError(`ring spin ${watch.spinUs} µs outside 0..${ring_spin_us_max}`);
  }
  ring_watch = watch;
}

/** A request that found no free slot yet. */
interface Queued {
  opcode: number;
  flags: number;
  fd: number;
  offsetBytes: number;
  iovecs: IoVec[];
  /** OP_FDSYNC_RANGE: bytes from `offsetBytes`. */
  rangeBytes?: number;
  path: string;
  resolve: (bytes: number) => void;
  reject: (error: Error) => void;
}

/** A queue of asynchronous requests with a bounded number in flight. */
export class AioQueue {
  readonly maxInflight: number;
  readonly engine: IoEngine;
  #handle: bigint;
  #events: DataView;
  /** Per slot (a small integer id, the tag the kernel echoes): the request. */
  #slots: (Queued | undefined)[];
  #freeSlots: number[];
  /** Requests with a slot, written into the batch records, not yet submitted. */
  #batchCount = 0;
  #batchSlots: number[] = [];
  #batchRequests: Queued[] = [];
  #batchIovecs = 0;
  /** Submitted and not yet completed. */
  #submitted = 0;
  /** Requests waiting for a free slot (beyond maxInflight). */
  #overflow: Queued[] = [];
  #flushScheduled = false;
  #reaping = false;
  #waiting = false;
  #records: Uint8Array<ArrayBuffer>;
  #recordView: DataView;
  #iovecView: DataView;
  #iovecsAddress: number;
  #closed = false;
  #broken: Error | undefined;

  /** Throws a {@linkcode SysError} when the kernel refuses the engine. */
  constructor(maxInflight = 128, engine: IoEngine = "libaio") {
    this.maxInflight = maxInflight;
    this.engine = engine;
    this.#handle = BigInt(
      check(shim.shim_io_create(ENGINE_KIND[engine], maxInflight), `${engine} setup`),
    );
    const eventsAddress = Number(shim.shim_io_events(this.#handle));
    const pointer = Deno.UnsafePointer.create(BigInt(eventsAddress))!;
    this.#events = new DataView(
      new Deno.UnsafePointerView(pointer).getArrayBuffer(maxInflight * EVENT_BYTES),
    );
    this.#slots = new Array(maxInflight).fill(undefined);
    this.#freeSlots = Array.from({ length: maxInflight }, (_, i) => maxInflight - 1 - i);
    this.#records = new Uint8Array(submit_batch_max * REQUEST_RECORD_BYTES);
    this.#recordView = new DataView(this.#records.buffer);
    const iovecs = new Uint8Array(iovecs_per_batch_max * IOVEC_BYTES);
    this.#iovecView = new DataView(iovecs.buffer);
    // Off-heap (large) typed arrays never move, so the address is stable.
    this.#iovecsAddress = Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(iovecs)));
  }

  /** Number of requests submitted or queued and not yet completed. */
  get inflight(): number {
    return this.maxInflight - this.#freeSlots.length + this.#overflow.length;
  }

  /** Vectored read; resolves to the bytes read (short only at end of file). */
  readv(fd: number, offsetBytes: number, iovecs: IoVec[], path = ""): Promise<number> {
    return this.#enqueue(OP_PREADV, 0, fd, offsetBytes, iovecs, path);
  }

  /**
   * Vectored write; resolves to the bytes written. `offload`: io_uring hands
   * it to a kernel worker rather than trying it during submission, so a large
   * copy into the page cache runs beside this thread instead of inside its
   * submit (libaio ignores it).
   */
  writev(
    fd: number,
    offsetBytes: number,
    iovecs: IoVec[],
    path = "",
    offload = false,
  ): Promise<number> {
    return this.#enqueue(OP_PWRITEV, offload ? REQ_OFFLOAD : 0, fd, offsetBytes, iovecs, path);
  }

  /** fdatasync through the queue. */
  fdsync(fd: number, path = ""): Promise<number> {
    return this.#enqueue(OP_FDSYNC, 0, fd, 0, [], path);
  }

  /**
   * fdatasync of `[offsetBytes, offsetBytes + lengthBytes)`: those bytes and
   * the metadata needed to read them become durable; other dirty pages of
   * the file are not written back. io_uring only: libaio syncs the whole
   * file (stronger, and slower through the page cache).
   */
  fdsyncRange(fd: number, offsetBytes: number, lengthBytes: number, path = ""): Promise<number> {
    if (!(lengthBytes > 0 && lengthBytes <= fdsync_range_bytes_max)) {
      return Promise.reject(new SysError("fdsync", 22, path));
    }
    return this.#enqueue(OP_FDSYNC_RANGE, 0, fd, offsetBytes, [], path, lengthBytes);
  }

  #enqueue(
    opcode: number,
    flags: number,
    fd: number,
    offsetBytes: number,
    iovecs: IoVec[],
    path: string,
    rangeBytes?: number,
  ) {
    if (this.#closed) return Promise.reject(new Error("AioQueue used after close"));
    if (this.#broken) return Promise.reject(this.#broken);
    if (iovecs.length > iovecs_per_batch_max) {
      return Promise.reject(new SysError(SYSCALL_NAMES[opcode], 22, path));
    }
    return new Promise<number>((resolve, reject) => {
      const request = { opcode, flags, fd, offsetBytes, iovecs, rangeBytes, path, resolve, reject };
      if (this.#overflow.length > 0 || !this.#addToBatch(request)) this.#overflow.push(request);
      this.#scheduleFlush();
    });
  }

  #scheduleFlush(): void {
    if (this.#flushScheduled) return;
    this.#flushScheduled = true;
    queueMicrotask(() => this.#flush());
  }

  // Takes a slot and writes the request's record and iovecs; false if no room.
  #addToBatch(r: Queued): boolean {
    if (
      this.#freeSlots.length === 0 || this.#batchCount === submit_batch_max ||
      this.#batchIovecs + r.iovecs.length > iovecs_per_batch_max
    ) {
      return false;
    }
    const slot = this.#freeSlots.pop()!;
    this.#slots[slot] = r;
    const v = this.#recordView;
    const at = this.#batchCount * REQUEST_RECORD_BYTES;
    v.setUint32(at, r.opcode, true);
    v.setInt32(at + 4, r.fd, true);
    setU64(v, at + 8, r.offsetBytes);
    setU64(v, at + 16, this.#iovecsAddress + this.#batchIovecs * IOVEC_BYTES);
    v.setUint32(at + 24, r.rangeBytes ?? r.iovecs.length, true);
    v.setUint32(at + 28, r.flags, true);
    setU64(v, at + 32, slot);
    const iv = this.#iovecView;
    for (const iov of r.iovecs) {
      setU64(iv, this.#batchIovecs * IOVEC_BYTES, iov.address);
      setU64(iv, this.#batchIovecs * IOVEC_BYTES + 8, iov.lengthBytes);
      this.#batchIovecs += 1;
    }
    this.#batchSlots.push(slot);
    this.#batchRequests.push(r);
    this.#batchCount += 1;
    return true;
  }

  #flush(): void {
    this.#flushScheduled = false;
    while (this.#batchCount > 0 && this.#submitBatch()) this.#refill();
    if (!eventLoopOwedTurn()) this.#reap();
    if (this.#submitted > 0) this.#startReaping();
    else if (this.#overflow.length > 0 && !this.#closed) {
      // The kernel refused for now (EAGAIN) with nothing in flight to wait for.
      setTimeout(() => (this.#refill(), this.#scheduleFlush()), 1);
    }
  }

  #refill(): void {
    while (this.#overflow.length > 0 && this.#addToBatch(this.#overflow[0])) this.#overflow.shift();
  }

  // One system call for the batch; false when the kernel did not take it all
  // (the rest waits in the overflow queue) or the batch failed.
  #submitBatch(): boolean {
    const count = this.#batchCount;
    const slots = this.#batchSlots;
    const requests = this.#batchRequests;
    this.#batchCount = 0;
    this.#batchIovecs = 0;
    this.#batchSlots = [];
    this.#batchRequests = [];
    const taken = Number(shim.shim_io_submit(this.#handle, this.#records, count));
    if (taken < 0) {
      const error = new SysError("io_submit", -taken);
      // io_uring: published requests may still run; nothing more goes to this queue.
      if (this.engine === "io_uring") this.#broken = error;
      for (let i = 0; i < count; i += 1) {
        this.#releaseSlot(slots[i]);
        requests[i].reject(new SysError(error.syscall, error.errno, requests[i].path));
      }
      return false;
    }
    this.#submitted += taken;
    if (taken === count) return true;
    for (let i = taken; i < count; i += 1) this.#releaseSlot(slots[i]);
    this.#overflow.unshift(...requests.slice(taken));
    return false;
  }

  #releaseSlot(slot: number): void {
    this.#slots[slot] = undefined;
    this.#freeSlots.push(slot);
  }

  // Settles the completions already there; returns how many.
  #reap(): number {
    if (this.#submitted === 0) return 0;
    const count = Number(shim.shim_io_reap(this.#handle));
    const events = this.#events;
    for (let i = 0; i < count; i += 1) {
      const slot = events.getUint32(i * EVENT_BYTES, true);
      const result = events.getInt32(i * EVENT_BYTES + 8, true);
      const request = this.#slots[slot]!;
      this.#releaseSlot(slot);
      this.#submitted -= 1;
      if (result < 0) {
        request.reject(new SysError(SYSCALL_NAMES[request.opcode], -result, request.path));
      } else request.resolve(result);
    }
    if (count > 0 && this.#overflow.length > 0) {
      this.#refill();
      this.#scheduleFlush();
    }
    return count;
  }

  // While requests are in the kernel: reap what is there, else let a waiter
  // sleep off the JavaScript thread until completions may have arrived.
  // Completions wait while the event loop is owed a turn (a load that never
  // stops would otherwise keep it from ever having one).
  async #startReaping(): Promise<void> {
    if (this.#reaping) return;
    this.#reaping = true;
    try {
      while (this.#submitted > 0 && !this.#closed) {
        if (eventLoopOwedTurn()) {
          await eventLoopTurn();
          continue;
        }
        if (this.#reap() > 0) {
          // Let what the completions started (responses, new requests) run first.
          if (thread_wait_us > 0n) await continuations();
          continue;
        }
        if (thread_wait_us > 0n) {
          const moved = this.#waitHere();
          if (this.#reap() > 0 || moved) {
            await continuations();
            continue;
          }
        }
        this.#waiting = true;
        const result = Number(await shim.shim_io_wait(this.#handle, wait_timeout_us));
        this.#waiting = false;
        if (this.#closed) {
          this.#destroy();
          return;
        }
        if (result < 0) throw new SysError(`${this.engine} wait`, -result);
      }
    } finally {
      this.#reaping = false;
      this.#waiting = false;
    }
  }

  // Sleeps on this thread until completions may be there (or the watched
  // ring moved: then true, after telling the watcher).
  #waitHere(): boolean {
    const watch = ring_watch;
    if (!watch) {
      shim.shim_io_wait_here(this.#handle, thread_wait_us);
      return false;
    }
    const result = Number(
      shim.shim_io_wait_ring(
        this.#handle,
        thread_wait_us,
        BigInt(watch.address),
        watch.seen() >>> 0,
        BigInt(watch.spinUs),
      ),
    );
    if (result < 0) throw new SysError(`${this.engine} wait`, -result);
    if (result === 0) return false;
    watch.moved();
    return true;
  }

  #destroy(): void {
    check(shim.shim_io_destroy(this.#handle), `${this.engine} destroy`);
  }

  /** Releases the kernel context; requests still in flight must have completed. */
  close(): void {
    if (this.#closed) return;
    if (this.inflight > 0) {
      throw new Error(`AioQueue.close with ${this.inflight} requests in flight`);
    }
    this.#closed = true;
    // A waiter still sleeping holds the context: it destroys it when it returns.
    if (!this.#waiting) this.#destroy();
  }
}

// Promise turns for the continuations of settled requests (they chain a few
// dozen deep at most: driver, disk server, ring response, next request).
async function continuations(): Promise<void> {
  for (let i = 0; i < continuation_turns_max; i += 1) await null;
}

// Little-endian u64 of a safe integer, without a BigInt.
function setU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, value % TWO_32, true);
  view.setUint32(at + 4, Math.floor(value / TWO_32), true);
}

/**
 * A queue on `preferred`, else on the other engine where the kernel refuses
 * it; `forced` (by default `BLKTAP_IO_ENGINE`: libaio or io_uring)
 * overrides the preference.
 */
export function openQueue(
  maxInflight: number,
  preferred: IoEngine,
  forced = Deno.env.get("BLKTAP_IO_ENGINE"),
): AioQueue {
  if (forced === "libaio" || forced === "io_uring") return new AioQueue(maxInflight, forced);
  if (forced) throw new Error(`BLKTAP_IO_ENGINE=${forced}: expected libaio or io_uring`);
  try {
    return new AioQueue(maxInflight, preferred);
  } catch (error) {
    if (!(error instanceof SysError)) throw error;
    // io_uring disabled (sysctl, seccomp) or too old here; libaio is always there.
    return new AioQueue(maxInflight, preferred === "io_uring" ? "libaio" : "io_uring");
  }
}
