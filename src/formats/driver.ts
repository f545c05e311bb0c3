/**
 * The block driver interface (DESIGN.md §4): what every format driver
 * (`aio`, `sync`, `qcow`, `vmdk`, `ram`, ...) offers to the disk process and
 * the tools. It reads like nbdkit's plugin API: capabilities first, then
 * data callbacks. Offsets and lengths are guest bytes.
 *
 * Drivers extend {@linkcode BlockDriverBase}, which checks every range once
 * and supplies the default behaviour for callbacks a format does not
 * implement (write-zeroes by writing zeros, FUA by flushing, one data extent
 * for block status), so no driver carries its own copy of those.
 * @module
 */
import type { SocketFd } from "../../ffi/socket.ts";

/**
 * What a driver does; front ends advertise exactly these and nothing else
 * (NBD: src/frontends/nbd/export.ts; the ring carries them from the disk
 * process in its `ready` message to {@linkcode RingDisk}). A capability no
 * front end reads does not belong here.
 */
export interface DriverCapabilities {
  /** Writes are allowed (false for read-only opens and read-only formats). NBD: not READ_ONLY. */
  readonly canWrite: boolean;
  /** `flush` makes completed writes durable. NBD: SEND_FLUSH, and SEND_FUA (FUA is a flush after the write). */
  readonly canFlush: boolean;
  /**
   * `discard` deallocates the range (it may then read as zeros or as
   * before). NBD: SEND_TRIM. Without it `discard` fails with EOPNOTSUPP.
   */
  readonly canDiscard: boolean;
  /**
   * `writeZeroes` zeroes without writing the zeros (fallocate, a hole):
   * NBD: SEND_FAST_ZERO. Without it, a `fast` write-zeroes fails with
   * EOPNOTSUPP and a plain one writes zeros.
   */
  readonly canZero: boolean;
  /** `blockStatus` reports real holes and zeros. NBD: sparse reads; the ring: block status. */
  readonly canExtents: boolean;
  /** Several connections may share the disk: flush covers all their writes. NBD: CAN_MULTI_CONN. */
  readonly canMultiConn: boolean;
}

/**
 * The capabilities of an allocating image format (qcow, vmdk, a chain
 * stand-in): flush is real, extents report real holes, several connections
 * may share the disk; no discard or fast zeroing of its own (a format that
 * implements them sets its own flags).
 */
export function imageFormatCapabilities(canWrite: boolean): DriverCapabilities {
  return {
    canWrite,
    canFlush: true,
    canDiscard: false,
    canZero: false,
    canExtents: true,
    canMultiConn: true,
  };
}

/** One run of guest bytes with the same allocation state. */
export interface Extent {
  offsetBytes: number;
  lengthBytes: number;
  /** Not allocated in this image or its chain (NBD_STATE_HOLE). */
  hole: boolean;
  /** Reads as zeros (NBD_STATE_ZERO). */
  zero: boolean;
}

/** Options of a write. */
export interface WriteOptions {
  /** Force unit access: durable before the promise resolves. */
  fua?: boolean;
}

/** Options of a write-zeroes. */
export interface ZeroOptions {
  /** The range may be deallocated instead of written (NBD without NO_HOLE). */
  mayTrim?: boolean;
  /** Fail with EOPNOTSUPP rather than fall back to a slow write (FAST_ZERO). */
  fast?: boolean;
  fua?: boolean;
}

/** Errno-style codes a driver may fail with; front ends map them to wire codes. */
/**
 * Optional, for drivers that own I/O memory (the ring client owns the ring's
 * data pages): front ends borrow a buffer, receive a payload straight into it
 * and pass it to `write`, or pass it to `read` and send from it, so no
 * payload is copied in TypeScript.
 */
export interface BufferLender {
  /** A buffer of exactly `lengthBytes` from the pool, or undefined when it is exhausted. */
  borrowBuffer(lengthBytes: number): Uint8Array | undefined;
  /** Gives a borrowed buffer back once the request using it has completed. */
  returnBuffer(buffer: Uint8Array): void;
}

/**
 * Optional, for drivers that know without I/O where the disk reads as zeros
 * (the ring client remembers what its disk process called unallocated): a
 * front end answers such a read without a buffer or a driver call (NBD: one
 * hole chunk, as QEMU's server answers reads of unallocated clusters).
 */
export interface ZeroReader {
  /**
   * True when every byte of the range is known to read as zeros: the read
   * is then answered (and counted) as zeros. False: read it with `read`.
   * Never waits; the range must lie inside the disk.
   */
  readAsZeros(offsetBytes: number, lengthBytes: number): boolean;
}

/**
 * A driver whose bytes may be read straight from the page cache of a file
 * it names, so a front end can send them to a socket without copying them
 * (ctrl's ring disk of a raw image, see src/ring/page_cache.ts).
 */
export interface CachedSpanSource {
  /** The range's bytes, if all of them are cached now; undefined otherwise. */
  leaseCached(offsetBytes: number, lengthBytes: number): CachedSpan | undefined;
}

/** Cached bytes of a file, to be sent from it (see {@linkcode CachedSpanSource}). */
export interface CachedSpan {
  readonly lengthBytes: number;
  /**
   * Writes `head` then the bytes to `socket` (waiting for room at most
   * `waitMs` at a time); false, with nothing written, when the lease was
   * refused meanwhile (read them again the usual way). Throws when the
   * socket failed (some bytes may have been written).
   */
  send(socket: SocketFd, head: Uint8Array, waitMs: number): Promise<boolean>;
  /** Gives the lease back unsent. */
  drop(): void;
}

export type BlockErrorCode =
  | "EINVAL"
  | "EIO"
  | "EPERM"
  | "ENOSPC"
  | "EOPNOTSUPP"
  | "EOVERFLOW";

/** A failed block operation, with the image it concerns. */
export class BlockError extends Error {
  readonly code: BlockErrorCode;
  constructor(code: BlockErrorCode, message: string) {
    super(message);
    this.name = "BlockError";
    this.code = code;
  }
}

/** The contract every format driver fulfils. */
export interface BlockDriver {
  /** Driver name as used in `type:path` (`aio`, `qcow`, ...). */
  readonly format: string;
  /** The image this driver serves. */
  readonly path: string;
  /** Virtual (guest-visible) size. */
  readonly sizeBytes: number;
  readonly capabilities: DriverCapabilities;
  /**
   * Optional: the descriptor of a file whose bytes are the disk's at the
   * same offsets, read and written through the page cache (no O_DIRECT), so
   * that another reader of the file sees every answered write. ctrl reads
   * cached bytes there itself (src/ring/page_cache.ts).
   */
  readonly pageCacheFd?: number;
  /**
   * Fills `buffer` with the guest bytes at `offsetBytes`. Any alignment is
   * accepted; unallocated ranges read from the parent or as zeros.
   */
  read(offsetBytes: number, buffer: Uint8Array): Promise<void>;
  /**
   * Writes `data` at `offsetBytes`. Throws EPERM on a read-only driver.
   *
   * Crash contract (every format; the ring keeps no copy of answered writes):
   * 1. Process death (SIGKILL): when the promise resolves, the data and
   *    every metadata change it needs are in the image file (a completed
   *    pwrite: the page cache is enough, O_DIRECT or buffered). Nothing an
   *    answered write relies on lives only in this process.
   * 2. Power loss: writes not covered by a completed `flush` may be
   *    dropped, reordered or torn at 512 bytes. Metadata never reaches the
   *    disk before the data it points at, nor a table before the tables it
   *    points at, wherever a crash could otherwise show bytes never written
   *    (backing data turned into zeros, stale content of reused space) or a
   *    structure `check` calls corrupt: such a metadata write is issued
   *    only once what it depends on is durable (fdatasync), group-committed
   *    so that allocating writes in flight share one fdatasync. Where a
   *    crash cannot show anything wrong (a new cluster in never-used space
   *    that reads as zeros, in an image without a backing file, whose guest
   *    view was zeros) the barrier is skipped — the crash simulator
   *    (tests/_helpers/crash_sim.ts), which knows the guest's view, checks
   *    every such crash point.
   * 3. `flush`: everything answered before it is durable when it resolves.
   * With `fua`, durable before the promise resolves.
   */
  write(offsetBytes: number, data: Uint8Array, options?: WriteOptions): Promise<void>;
  /**
   * Optional: fills `buffers` in order from the guest bytes at `offsetBytes`
   * (one consecutive range scattered over several buffers, as a blkif
   * request's segments are). Drivers that can do it as one vectored I/O
   * override `_readv` in {@linkcode BlockDriverBase}.
   */
  readv?(offsetBytes: number, buffers: Uint8Array[]): Promise<void>;
  /** Optional: writes `buffers` in order at `offsetBytes` (the gather form of `write`). */
  writev?(offsetBytes: number, buffers: Uint8Array[]): Promise<void>;
  /** Resolves once every write answered before the call is durable (see `write`). */
  flush(): Promise<void>;
  /**
   * Optional, for formats with compressed clusters (qcow, qcow2; `convert -c`):
   * writes one whole cluster, aligned, compressed where that saves space.
   * Only into an unallocated cluster of an image being written sequentially.
   */
  writeCompressed?(offsetBytes: number, data: Uint8Array): Promise<void>;
  /**
   * The range is unused: it is deallocated and may afterwards read as
   * zeros or as before. Fails with EOPNOTSUPP unless `canDiscard`.
   */
  discard(offsetBytes: number, lengthBytes: number): Promise<void>;
  /** Makes the range read as zeros. */
  writeZeroes(offsetBytes: number, lengthBytes: number, options?: ZeroOptions): Promise<void>;
  /** Allocation state of the range, as consecutive extents covering it from the start. */
  blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]>;
  /** Releases files and memory; the driver must not be used afterwards. */
  close(): Promise<void>;
}

/** Size of the zero buffer used by the default write-zeroes. */
const zero_chunk_bytes = 1 << 20;
let zeroChunk: Uint8Array | undefined;

/**
 * The default write-zeroes: zeros written through `write` in chunks of
 * `zero_chunk_bytes`; EOPNOTSUPP (naming `path`) when `fast` is asked.
 */
export async function writeZeroChunks(
  path: string,
  offsetBytes: number,
  lengthBytes: number,
  options: ZeroOptions,
  write: (offsetBytes: number, data: Uint8Array) => Promise<void>,
): Promise<void> {
  if (options.fast) throw new BlockError("EOPNOTSUPP", `${path}: no fast zeroing`);
  zeroChunk ??= new Uint8Array(zero_chunk_bytes);
  for (let done = 0; done < lengthBytes; done += zero_chunk_bytes) {
    const length = Math.min(zero_chunk_bytes, lengthBytes - done);
    await write(offsetBytes + done, zeroChunk.subarray(0, length));
  }
}

/**
 * Base class for drivers: validates ranges and write permission once, then
 * calls the `_`-prefixed hooks; provides defaults for optional callbacks.
 */
export abstract class BlockDriverBase implements BlockDriver {
  abstract readonly format: string;
  abstract readonly path: string;
  abstract readonly sizeBytes: number;
  abstract readonly capabilities: DriverCapabilities;

  protected abstract _read(offsetBytes: number, buffer: Uint8Array): Promise<void>;
  protected abstract _write(offsetBytes: number, data: Uint8Array): Promise<void>;
  protected abstract _flush(): Promise<void>;
  abstract close(): Promise<void>;

  /** Drivers that set `canDiscard` override this; `discard` never calls it otherwise. */
  protected _discard(_offsetBytes: number, _lengthBytes: number): Promise<void> {
    return Promise.reject(this.#unsupported("discard"));
  }

  #unsupported(what: string): BlockError {
    return new BlockError("EOPNOTSUPP", `${this.path}: the ${this.format} driver has no ${what}`);
  }

  /** Default: write zeros in chunks; refuses when `fast` is asked. */
  protected _writeZeroes(offsetBytes: number, lengthBytes: number, options: ZeroOptions) {
    return writeZeroChunks(
      this.path,
      offsetBytes,
      lengthBytes,
      options,
      (at, data) => this._write(at, data),
    );
  }

  /**
   * Default: one read per buffer, all issued in the same turn (the aio layer
   * submits them with one io_submit). Override for one vectored request.
   */
  protected _readv(offsetBytes: number, buffers: Uint8Array[]): Promise<void> {
    return _eachBuffer(offsetBytes, buffers, (at, b) => this._read(at, b));
  }

  /** Default: one write per buffer, issued together; see `_readv`. */
  protected _writev(offsetBytes: number, buffers: Uint8Array[]): Promise<void> {
    return _eachBuffer(offsetBytes, buffers, (at, b) => this._write(at, b));
  }

  /** Default: everything is allocated data. */
  protected _blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return Promise.resolve([{ offsetBytes, lengthBytes, hole: false, zero: false }]);
  }

  /** Throws EINVAL unless `[offset, offset+length)` lies inside the disk. */
  protected checkRange(offsetBytes: number, lengthBytes: number): void {
    if (
      !Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(lengthBytes) ||
      offsetBytes < 0 || lengthBytes < 0 || offsetBytes + lengthBytes > this.sizeBytes
    ) {
      throw new BlockError(
        "EINVAL",
        `${this.path}: range ${offsetBytes}+${lengthBytes} is outside the disk (${this.sizeBytes} bytes)`,
      );
    }
  }

  protected checkWritable(): void {
    if (!this.capabilities.canWrite) {
      throw new BlockError("EPERM", `${this.path}: opened read-only`);
    }
  }

  async read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    this.checkRange(offsetBytes, buffer.byteLength);
    if (buffer.byteLength > 0) await this._read(offsetBytes, buffer);
  }

  async write(offsetBytes: number, data: Uint8Array, options: WriteOptions = {}): Promise<void> {
    this.checkWritable();
    this.checkRange(offsetBytes, data.byteLength);
    if (data.byteLength > 0) await this._write(offsetBytes, data);
    if (options.fua) await this._flush();
  }

  readv(offsetBytes: number, buffers: Uint8Array[]): Promise<void> {
    this.checkRange(offsetBytes, _totalBytes(buffers));
    return this._readv(offsetBytes, buffers.filter((b) => b.byteLength > 0));
  }

  writev(offsetBytes: number, buffers: Uint8Array[]): Promise<void> {
    this.checkWritable();
    this.checkRange(offsetBytes, _totalBytes(buffers));
    return this._writev(offsetBytes, buffers.filter((b) => b.byteLength > 0));
  }

  flush(): Promise<void> {
    return this._flush();
  }

  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.checkWritable();
    this.checkRange(offsetBytes, lengthBytes);
    if (!this.capabilities.canDiscard) throw this.#unsupported("discard");
    if (lengthBytes > 0) await this._discard(offsetBytes, lengthBytes);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options: ZeroOptions = {}) {
    this.checkWritable();
    this.checkRange(offsetBytes, lengthBytes);
    if (lengthBytes > 0) await this._writeZeroes(offsetBytes, lengthBytes, options);
    if (options.fua) await this._flush();
  }

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.checkRange(offsetBytes, lengthBytes);
    if (lengthBytes === 0) return [];
    return await this._blockStatus(offsetBytes, lengthBytes);
  }
}

function _totalBytes(buffers: Uint8Array[]): number {
  let n = 0;
  for (const b of buffers) n += b.byteLength;
  return n;
}

async function _eachBuffer(
  offsetBytes: number,
  buffers: Uint8Array[],
  run: (offsetBytes: number, buffer: Uint8Array) => Promise<void>,
): Promise<void> {
  const pending: Promise<void>[] = [];
  let at = offsetBytes;
  for (const b of buffers) {
    pending.push(run(at, b));
    at += b.byteLength;
  }
  await Promise.all(pending);
}
