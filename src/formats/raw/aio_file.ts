/**
 * The `aio` file layer: asynchronous I/O (ffi/aio.ts) with O_DIRECT
 * (cache=none) or through the page cache (cache=writeback). Requests that are not block-aligned in
 * memory, offset or length go through aligned bounce buffers; partial
 * blocks are read-modify-written under a range lock.
 * @module
 */
import { type AioQueue, fdsync_range_bytes_max, type IoVec, openQueue } from "../../../ffi/aio.ts";
import { SysError } from "../../../ffi/errno.ts";
import { File } from "../../../ffi/file.ts";
import { addressOf } from "../../../ffi/memory.ts";
import { giveBounce, takeBounce } from "./bounce_pool.ts";
import { FdImageFile } from "./fd_image_file.ts";
import { FlushBehind } from "./flush_behind.ts";
import { InFlightLimit } from "./in_flight_limit.ts";
import { RangeLock } from "./range_lock.ts";

/** O_DIRECT alignment: 4 KiB satisfies every logical block size in use. */
export const direct_alignment_bytes = 4096;
const max_inflight_requests = 256;

/** Page-cache writes from this size on are copied by a kernel worker, beside this thread. */
export const offload_bytes_min = 128 << 10;
/** Flush-behind (flush_behind.ts): a background fdatasync per this much written. */
export const flush_behind_bytes = 32 << 20;
/**
 * Offloaded page-cache writes in flight per file being filled: ext4 takes
 * the inode lock for each, so more only make io_uring's workers spin on it
 * (qcow2->raw: 18-20% of all CPU samples in rwsem_spin_on_owner under
 * ext4_buffered_write_iter); two keep one worker copying while the next
 * waits in the kernel. 1, 2 and 3 measured alike; unlimited 1.3-1.4x.
 */
export const fill_page_cache_writes_max = 2;

let directQueue: AioQueue | undefined;
let pageCacheQueue: AioQueue | undefined;
let smallPageCacheWrites: AioQueue | undefined;
let ioUringOnly = false;

/**
 * Puts every queue of this process on io_uring, for a tool that runs for a
 * second or two (img2qcow, convert): a libaio context costs 30-50 ms when
 * the process exits (exit_aio waits out two RCU grace periods), which a
 * server never notices and a tool does. Call before the first request.
 */
export function useIoUringOnly(): void {
  ioUringOnly = true;
}

/**
 * One kernel I/O queue per process and kind of request, so requests to all
 * files batch together. O_DIRECT: libaio (completions come from the
 * interrupt). Page cache, as measured through ctrl side by side with the
 * previous choice (bench/results/nbd-writeback-ab-*): io_uring for reads,
 * which copies cached pages during submission and sends misses to its
 * workers (libaio would read a miss synchronously; offloading hits to the
 * workers cost more CPU than the copy: 1 MiB reads 0.81x). Large writes
 * through io_uring offloaded to its workers, so the copy runs beside this
 * thread rather than inside a blocking io_submit (1 MiB writes 1.20-1.27x).
 * Small writes stay on libaio: its io_submit copies 4 KiB faster than a
 * hand-off to an io_uring worker, where ext4 (no non-blocking buffered
 * writes) sends every buffered write (4 KiB writes 0.86x on io_uring).
 */
function queueFor(direct: boolean, write: boolean, bytes: number): AioQueue {
  if (direct) {
    return directQueue ??= openQueue(max_inflight_requests, ioUringOnly ? "io_uring" : "libaio");
  }
  if (write && bytes < offload_bytes_min && !ioUringOnly) {
    return smallPageCacheWrites ??= openQueue(max_inflight_requests, "libaio");
  }
  return pageCacheQueue ??= openQueue(max_inflight_requests, "io_uring");
}

const noLock = () => {};

function isAligned(value: number, alignment: number): boolean {
  return value % alignment === 0;
}

function toIovecs(buffers: Uint8Array[]): IoVec[] {
  return buffers.map((b) => ({ address: addressOf(b), lengthBytes: b.byteLength }));
}

/** An image file served through libaio. */
export class AioFile extends FdImageFile {
  readonly direct: boolean;
  readonly #alignment: number;
  readonly #writeLocks = new RangeLock();
  #fdsyncWorks = true;
  readonly #flushBehind: FlushBehind | undefined;
  readonly #fillWrites: InFlightLimit | undefined;

  /** `filling`: ImageOpenOptions.filling (image_file.ts). */
  constructor(file: File, writable: boolean, filling = false) {
    super(file, writable);
    this.direct = file.direct;
    this.#alignment = file.direct ? direct_alignment_bytes : 1;
    if (filling && writable) {
      this.#flushBehind = new FlushBehind(() => this.#fdatasync(), flush_behind_bytes);
      if (!file.direct) this.#fillWrites = new InFlightLimit(fill_page_cache_writes_max);
    }
  }

  #aligned(offsetBytes: number, bytes: Uint8Array): boolean {
    return this.#directAddress(offsetBytes, bytes) !== undefined;
  }

  // The native address of `bytes` when they go to the kernel as they are
  // (aligned as O_DIRECT needs), else undefined: one address lookup per request.
  #directAddress(offsetBytes: number, bytes: Uint8Array): number | undefined {
    const address = addressOf(bytes);
    const a = this.#alignment;
    if (a === 1) return address;
    const aligned = isAligned(offsetBytes, a) && isAligned(bytes.byteLength, a) &&
      isAligned(address, a);
    return aligned ? address : undefined;
  }

  async read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    const address = this.#directAddress(offsetBytes, buffer);
    if (address !== undefined) {
      await this.#readFull(offsetBytes, buffer, address);
      return;
    }
    const start = offsetBytes - (offsetBytes % this.#alignment);
    const end = Math.ceil((offsetBytes + buffer.byteLength) / this.#alignment) * this.#alignment;
    const bounce = takeBounce(end - start);
    try {
      const window = bounce.bytes.subarray(0, end - start);
      await this.#readFull(start, window);
      buffer.set(window.subarray(offsetBytes - start, offsetBytes - start + buffer.byteLength));
    } finally {
      giveBounce(bounce);
    }
  }

  // Reads all of `buffer`; a short read means end of file: the rest is zeros.
  async #readFull(
    offsetBytes: number,
    buffer: Uint8Array,
    address = addressOf(buffer),
  ): Promise<void> {
    const iov: IoVec[] = [{ address, lengthBytes: buffer.byteLength }];
    const got = await this.#submit(false, offsetBytes, iov, buffer.byteLength);
    if (got < buffer.byteLength) {
      const resumable = (offsetBytes + got) % this.#alignment === 0;
      if (got > 0 && offsetBytes + got < this.length && resumable) {
        // A short read inside the file: finish it (possible for buffered I/O).
        // Under O_DIRECT a short read ends at the kernel's end of file, which
        // lags `length` while extending writes are in flight: the rest is zeros.
        return this.#readFull(offsetBytes + got, buffer.subarray(got), address + got);
      }
      buffer.fill(0, got);
    }
  }

  async write(offsetBytes: number, data: Uint8Array): Promise<void> {
    const a = this.#alignment;
    const start = offsetBytes - (offsetBytes % a);
    const end = Math.ceil((offsetBytes + data.byteLength) / a) * a;
    this.length = Math.max(this.length, offsetBytes + data.byteLength);
    const release = this.#lockFor(start, end) ?? await this.#writeLocks.acquire(start, end);
    try {
      const address = this.#directAddress(offsetBytes, data);
      if (address !== undefined) {
        await this.#writeFull(offsetBytes, data, address);
        this.#flushBehind?.wrote(data.byteLength);
      } else {
        await this.#readModifyWrite(start, end, offsetBytes, data);
        // The whole last block was written: cut the padding past every issued write.
        if (end > this.length) this.file.truncate(this.length);
      }
    } finally {
      release();
    }
  }

  #submit(write: boolean, offsetBytes: number, iov: IoVec[], bytes: number): Promise<number> {
    const queue = queueFor(this.direct, write, bytes);
    const offload = write && !this.direct && bytes >= offload_bytes_min;
    if (offload && this.#fillWrites) {
      return this.#fillWrites.run(() =>
        queue.writev(this.file.fd, offsetBytes, iov, this.path, true)
      );
    }
    if (write) return queue.writev(this.file.fd, offsetBytes, iov, this.path, offload);
    return queue.readv(this.file.fd, offsetBytes, iov, this.path);
  }

  // The write lock at once when it is free, or nothing to hold: only O_DIRECT
  // read-modify-writes blocks, so only it needs writes kept apart.
  #lockFor(start: number, end: number): (() => void) | undefined {
    return this.#alignment === 1 ? noLock : this.#writeLocks.tryAcquire(start, end);
  }

  async #readModifyWrite(start: number, end: number, offsetBytes: number, data: Uint8Array) {
    const bounce = takeBounce(end - start);
    try {
      const window = bounce.bytes.subarray(0, end - start);
      const a = this.#alignment;
      const headPartial = offsetBytes !== start;
      const tailPartial = offsetBytes + data.byteLength !== end;
      if (headPartial) await this.#readFull(start, window.subarray(0, a));
      if (tailPartial && !(headPartial && end - a === start)) {
        await this.#readFull(end - a, window.subarray(end - a - start));
      }
      window.set(data, offsetBytes - start);
      await this.#writeFull(start, window);
    } finally {
      giveBounce(bounce);
    }
  }

  async #writeFull(
    offsetBytes: number,
    data: Uint8Array,
    address = addressOf(data),
  ): Promise<void> {
    let done = 0;
    while (done < data.byteLength) {
      const iov: IoVec[] = [{
        address: address + done,
        lengthBytes: data.byteLength - done,
      }];
      const wrote = await this.#submit(true, offsetBytes + done, iov, data.byteLength - done);
      if (wrote === 0) throw new SysError("pwritev", 28, this.path);
      done += wrote;
    }
  }

  /** One preadv for all `buffers` when they are aligned; else one read each. */
  async readv(offsetBytes: number, buffers: Uint8Array[]): Promise<void> {
    if (!this.#allAligned(offsetBytes, buffers)) {
      await Promise.all(this.#pieces(offsetBytes, buffers).map(([at, b]) => this.read(at, b)));
      return;
    }
    const total = buffers.reduce((sum, b) => sum + b.byteLength, 0);
    const got = await this.#submit(false, offsetBytes, toIovecs(buffers), total);
    if (got >= total) return;
    // Short only at end of file (or a buffered short read): finish piece by piece.
    let position = 0;
    for (const buffer of buffers) {
      const end = position + buffer.byteLength;
      if (end > got) {
        const skip = Math.max(0, got - position);
        await this.read(offsetBytes + position + skip, buffer.subarray(skip));
      }
      position = end;
    }
  }

  /** One pwritev for all `buffers` when they are aligned; else one write each. */
  async writev(offsetBytes: number, buffers: Uint8Array[]): Promise<void> {
    if (!this.#allAligned(offsetBytes, buffers)) {
      await Promise.all(this.#pieces(offsetBytes, buffers).map(([at, b]) => this.write(at, b)));
      return;
    }
    const total = buffers.reduce((sum, b) => sum + b.byteLength, 0);
    this.length = Math.max(this.length, offsetBytes + total);
    const end = offsetBytes + total;
    const release = this.#lockFor(offsetBytes, end) ??
      await this.#writeLocks.acquire(offsetBytes, end);
    try {
      const wrote = await this.#submit(true, offsetBytes, toIovecs(buffers), total);
      let position = 0;
      for (const buffer of buffers) {
        const end = position + buffer.byteLength;
        if (end > wrote) {
          const skip = Math.max(0, wrote - position);
          await this.#writeFull(offsetBytes + position + skip, buffer.subarray(skip));
        }
        position = end;
      }
      this.#flushBehind?.wrote(total);
    } finally {
      release();
    }
  }

  #allAligned(offsetBytes: number, buffers: Uint8Array[]): boolean {
    let at = offsetBytes;
    for (const buffer of buffers) {
      if (!this.#aligned(at, buffer)) return false;
      at += buffer.byteLength;
    }
    return true;
  }

  #pieces(offsetBytes: number, buffers: Uint8Array[]): [number, Uint8Array][] {
    let at = offsetBytes;
    return buffers.map((buffer) => {
      const piece: [number, Uint8Array] = [at, buffer];
      at += buffer.byteLength;
      return piece;
    });
  }

  async flush(): Promise<void> {
    if (!this.writable) return;
    await this.#flushBehind?.settle();
    await this.#fdatasync();
  }

  /**
   * A ranged fdatasync through io_uring (page cache: dirty pages outside
   * the range stay in the cache); libaio, or O_DIRECT where nothing waits in
   * the page cache, syncs the whole file.
   */
  async flushRange(offsetBytes: number, lengthBytes: number): Promise<void> {
    if (!this.writable) return;
    const queue = this.direct ? undefined : queueFor(false, false, 0);
    if (queue?.engine !== "io_uring" || lengthBytes > fdsync_range_bytes_max) {
      return await this.flush();
    }
    await this.#flushBehind?.settle();
    try {
      await queue.fdsyncRange(this.file.fd, offsetBytes, lengthBytes, this.path);
    } catch (error) {
      if (!(error instanceof SysError && error.code === "EINVAL")) throw error;
      await this.flush(); // a file system without a ranged sync
    }
  }

  async #fdatasync(): Promise<void> {
    if (this.#fdsyncWorks) {
      try {
        await queueFor(this.direct, true, 0).fdsync(this.file.fd, this.path);
        return;
      } catch (error) {
        if (!(error instanceof SysError && error.code === "EINVAL")) throw error;
        this.#fdsyncWorks = false; // file system without aio fsync
      }
    }
    this.file.fdatasync();
  }

  override async close(): Promise<void> {
    // A background fdatasync still running would find the descriptor closed (or reused).
    await this.#flushBehind?.idle();
    await super.close();
  }
}
