/**
 * Asynchronous I/O through libaio. Requests issued in the same JavaScript
 * turn are submitted together by one `io_submit`; completions are reaped by
 * a non-blocking FFI call running off the event loop.
 * @module
 */
import { check, SysError } from "./errno.ts";
import { shim } from "./shim.ts";

/** One piece of a vectored request: native address and length. */
export interface IoVec {
  address: number;
  lengthBytes: number;
}

const OP_PREADV = 0;
const OP_PWRITEV = 1;
const OP_FDSYNC = 2;
const REQUEST_RECORD_BYTES = 40;
const IOVEC_BYTES = 16;
// Mirrors SHIM_SUBMIT_MAX in shim/libaio_shim.c.
const submit_batch_max = 256;
const iovecs_per_batch_max = 8192;
const reap_timeout_us = 1_000_000n;
// How long the JavaScript thread may block in io_getevents before handing
// the wait to another thread (env BLKTAP_AIO_SPIN_US). Off by default: it
// saves a thread hop per completion but stalls a process that also serves
// sockets (the NBD server measured 12k instead of 33k random-write IOPS).
const spin_wait_us = BigInt(Deno.env.get("BLKTAP_AIO_SPIN_US") ?? "0");
const SYSCALL_NAMES = ["preadv", "pwritev", "fdsync"];

interface Pending {
  opcode: number;
  fd: number;
  offsetBytes: number;
  iovecs: IoVec[];
  path: string;
  resolve: (bytes: number) => void;
  reject: (error: Error) => void;
}

/** A libaio context with a bounded number of requests in flight. */
export class AioQueue {
  readonly maxInflight: number;
  #handle: bigint;
  #events: DataView;
  #slots: (Pending | undefined)[];
  #freeSlots: number[];
  #queued: Pending[] = [];
  #flushScheduled = false;
  #reaping = false;
  #records: Uint8Array<ArrayBuffer>;
  #recordView: DataView;
  #iovecs: Uint8Array<ArrayBuffer>;
  #iovecView: DataView;
  #iovecsAddress: number;
  #closed = false;

  constructor(maxInflight = 128) {
    this.maxInflight = maxInflight;
    this.#handle = BigInt(check(shim.shim_aio_create(maxInflight), "io_setup"));
    const eventsAddress = Number(shim.shim_aio_events(this.#handle));
    const pointer = Deno.UnsafePointer.create(BigInt(eventsAddress))!;
    this.#events = new DataView(
      new Deno.UnsafePointerView(pointer).getArrayBuffer(maxInflight * 16),
    );
    this.#slots = new Array(maxInflight).fill(undefined);
    this.#freeSlots = Array.from({ length: maxInflight }, (_, i) => maxInflight - 1 - i);
    this.#records = new Uint8Array(submit_batch_max * REQUEST_RECORD_BYTES);
    this.#recordView = new DataView(this.#records.buffer);
    this.#iovecs = new Uint8Array(iovecs_per_batch_max * IOVEC_BYTES);
    this.#iovecView = new DataView(this.#iovecs.buffer);
    // Off-heap (large) typed arrays never move, so the address is stable.
    this.#iovecsAddress = Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(this.#iovecs)));
  }

  /** Number of requests submitted or queued and not yet completed. */
  get inflight(): number {
    return this.maxInflight - this.#freeSlots.length + this.#queued.length;
  }

  /** Vectored read; resolves to the bytes read (short only at end of file). */
  readv(fd: number, offsetBytes: number, iovecs: IoVec[], path = ""): Promise<number> {
    return this.#enqueue(OP_PREADV, fd, offsetBytes, iovecs, path);
  }

  /** Vectored write; resolves to the bytes written. */
  writev(fd: number, offsetBytes: number, iovecs: IoVec[], path = ""): Promise<number> {
    return this.#enqueue(OP_PWRITEV, fd, offsetBytes, iovecs, path);
  }

  /** fdatasync through the queue (IOCB_CMD_FDSYNC). */
  fdsync(fd: number, path = ""): Promise<number> {
    return this.#enqueue(OP_FDSYNC, fd, 0, [], path);
  }

  #enqueue(opcode: number, fd: number, offsetBytes: number, iovecs: IoVec[], path: string) {
    if (this.#closed) return Promise.reject(new Error("AioQueue used after close"));
    if (iovecs.length > iovecs_per_batch_max) {
      return Promise.reject(new SysError(SYSCALL_NAMES[opcode], 22, path));
    }
    return new Promise<number>((resolve, reject) => {
      this.#queued.push({ opcode, fd, offsetBytes, iovecs, path, resolve, reject });
      if (!this.#flushScheduled) {
        this.#flushScheduled = true;
        queueMicrotask(() => this.#submitQueued());
      }
    });
  }

  #submitQueued(): void {
    this.#flushScheduled = false;
    while (this.#queued.length > 0 && this.#freeSlots.length > 0) {
      const batch = this.#packBatch();
      const taken = Number(shim.shim_aio_submit(this.#handle, this.#records, batch.length));
      const accepted = taken < 0 ? 0 : taken;
      for (let i = accepted; i < batch.length; i += 1) {
        this.#freeSlots.push(batch[i]);
        const pending = this.#slots[batch[i]]!;
        this.#slots[batch[i]] = undefined;
        if (taken < 0) pending.reject(new SysError("io_submit", -taken, pending.path));
        else this.#queued.unshift(pending);
      }
      if (accepted < batch.length) break;
    }
    if (this.maxInflight - this.#freeSlots.length > 0) this.#startReaping();
  }

  // Moves queued requests into slots and request records; returns the slots.
  #packBatch(): number[] {
    const slots: number[] = [];
    let iovecCount = 0;
    while (
      this.#queued.length > 0 && this.#freeSlots.length > 0 && slots.length < submit_batch_max
    ) {
      const next = this.#queued[0];
      if (iovecCount + next.iovecs.length > iovecs_per_batch_max) break;
      this.#queued.shift();
      const slot = this.#freeSlots.pop()!;
      this.#slots[slot] = next;
      const record = slots.length * REQUEST_RECORD_BYTES;
      const v = this.#recordView;
      v.setUint32(record, next.opcode, true);
      v.setInt32(record + 4, next.fd, true);
      v.setBigUint64(record + 8, BigInt(next.offsetBytes), true);
      v.setBigUint64(record + 16, BigInt(this.#iovecAddress(iovecCount)), true);
      v.setUint32(record + 24, next.iovecs.length, true);
      v.setBigUint64(record + 32, BigInt(slot), true);
      for (const iov of next.iovecs) {
        this.#iovecView.setBigUint64(iovecCount * IOVEC_BYTES, BigInt(iov.address), true);
        this.#iovecView.setBigUint64(iovecCount * IOVEC_BYTES + 8, BigInt(iov.lengthBytes), true);
        iovecCount += 1;
      }
      slots.push(slot);
    }
    return slots;
  }

  #iovecAddress(index: number): number {
    return this.#iovecsAddress + index * IOVEC_BYTES;
  }

  async #startReaping(): Promise<void> {
    if (this.#reaping) return;
    this.#reaping = true;
    try {
      while (this.maxInflight - this.#freeSlots.length > 0) {
        let count = Number(shim.shim_aio_poll(this.#handle, 0, 0n));
        if (count === 0 && spin_wait_us > 0n) {
          count = Number(shim.shim_aio_poll(this.#handle, 1, spin_wait_us));
        }
        if (count === 0) count = Number(await shim.shim_aio_wait(this.#handle, 1, reap_timeout_us));
        if (count < 0) throw new SysError("io_getevents", -count);
        this.#complete(count);
        if (this.#queued.length > 0) this.#submitQueued();
      }
    } finally {
      this.#reaping = false;
    }
  }

  #complete(count: number): void {
    for (let i = 0; i < count; i += 1) {
      const slot = Number(this.#events.getBigUint64(i * 16, true));
      const result = Number(this.#events.getBigInt64(i * 16 + 8, true));
      const pending = this.#slots[slot]!;
      this.#slots[slot] = undefined;
      this.#freeSlots.push(slot);
      if (result < 0) {
        pending.reject(new SysError(SYSCALL_NAMES[pending.opcode], -result, pending.path));
      } else {
        pending.resolve(result);
      }
    }
  }

  /** Destroys the context; requests still in flight must have completed. */
  close(): void {
    if (this.#closed) return;
    if (this.inflight > 0) {
      throw new Error(`AioQueue.close with ${this.inflight} requests in flight`);
    }
    this.#closed = true;
    check(shim.shim_aio_destroy(this.#handle), "io_destroy");
  }
}
