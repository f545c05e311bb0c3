/**
 * File descriptors through the shim: open with O_DIRECT, positional I/O,
 * fdatasync, fallocate, SEEK_DATA/SEEK_HOLE. Errors name the call and file.
 * @module
 */
import { check, SysError } from "./errno.ts";
import { addressOf } from "./memory.ts";
import { shim } from "./shim.ts";

const O_RDONLY = 0o0;
const O_RDWR = 0o2;
const O_CREAT = 0o100;
const O_EXCL = 0o200;
const O_DIRECT = 0o40000;
const O_NOFOLLOW = 0o400000;
const EAGAIN = 11;
const EIO = 5;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const FALLOC_FL_ZERO_RANGE = 0x10;
/** poll(2) event bits. */
export const POLLIN = 0x001;
export const POLLERR = 0x008;
export const POLLHUP = 0x010;

/** What an open file is. */
export type FileKind = "file" | "block-device" | "directory" | "other";

/** How to open a file. */
export interface OpenOptions {
  /** Open read-write (default read-only). */
  write?: boolean;
  /** Bypass the page cache (O_DIRECT). */
  direct?: boolean;
  /** Create the file; fails if it exists. */
  createNew?: boolean;
  /** Mode for a created file (default 0644). */
  mode?: number;
  /** Fail with ELOOP when the last component of the path is a symbolic link (O_NOFOLLOW). */
  noFollow?: boolean;
}

const encoder = new TextEncoder();

function cString(text: string): Uint8Array<ArrayBuffer> {
  return encoder.encode(`${text}\0`);
}

/** A stretch of a file that is all data or all hole. */
export interface FileRun {
  offsetBytes: number;
  lengthBytes: number;
  data: boolean;
}

/** An open file descriptor with the path it was opened by. */
export class File {
  readonly fd: number;
  readonly path: string;
  /** Whether the descriptor has O_DIRECT. */
  readonly direct: boolean;
  #closed = false;

  private constructor(fd: number, path: string, direct: boolean) {
    this.fd = fd;
    this.path = path;
    this.direct = direct;
  }

  /** Opens `path`; throws {@linkcode SysError} naming the path. */
  static open(path: string, options: OpenOptions = {}): File {
    let flags = options.write ? O_RDWR : O_RDONLY;
    if (options.createNew) flags |= O_CREAT | O_EXCL;
    if (options.direct) flags |= O_DIRECT;
    if (options.noFollow) flags |= O_NOFOLLOW;
    const fd = check(shim.shim_open(cString(path), flags, options.mode ?? 0o644), "open", path);
    return new File(fd, path, options.direct ?? false);
  }

  /** Size in bytes and kind (regular file, block device, ...). */
  stat(): { sizeBytes: number; kind: FileKind } {
    const kindOut = new Int32Array(1);
    const sizeBytes = check(shim.shim_fsize(this.fd, kindOut), "fstat", this.path);
    const kinds: FileKind[] = ["other", "file", "block-device", "directory"];
    return { sizeBytes, kind: kinds[kindOut[0]] };
  }

  /** Bytes allocated on disk, as `du` counts them. */
  allocatedBytes(): number {
    return check(shim.shim_fallocated(this.fd), "fstat", this.path);
  }

  /** Blocking positional read; returns bytes read (short at end of file). */
  pread(bytes: Uint8Array, offsetBytes: number): number {
    return check(
      shim.shim_pread(
        this.fd,
        BigInt(addressOf(bytes)),
        BigInt(bytes.byteLength),
        BigInt(offsetBytes),
      ),
      "pread",
      this.path,
    );
  }

  /**
   * Reads what the page cache holds of `bytes.length` bytes at `offsetBytes`
   * without waiting for the device (RWF_NOWAIT): the bytes read, 0 where
   * nothing could be read without waiting, possibly short where part is
   * cached or at the end of the file.
   */
  preadCached(bytes: Uint8Array, offsetBytes: number): number {
    const n = Number(shim.shim_pread_cached(this.fd, bytes, bytes.byteLength, BigInt(offsetBytes)));
    return this.#cachedBytes(n);
  }

  /** {@linkcode preadCached} on another thread: `bytes` must stay put until it settles. */
  async preadCachedBeside(bytes: Uint8Array, offsetBytes: number): Promise<number> {
    const n = await shim.shim_pread_cached_beside(
      this.fd,
      bytes,
      bytes.byteLength,
      BigInt(offsetBytes),
    );
    return this.#cachedBytes(Number(n));
  }

  /** Whether every page of the range is in the page cache (cachestat(2), Linux 6.5). */
  allCached(offsetBytes: number, lengthBytes: number): boolean {
    const result = shim.shim_all_cached(this.fd, BigInt(offsetBytes), BigInt(lengthBytes));
    return check(result, "cachestat", this.path) === 1;
  }

  #cachedBytes(result: number): number {
    return result === -EAGAIN ? 0 : check(result, "preadv2", this.path);
  }

  /** Blocking positional write of all of `bytes`. */
  pwriteAll(bytes: Uint8Array, offsetBytes: number): void {
    let done = 0;
    while (done < bytes.byteLength) {
      done += check(
        shim.shim_pwrite(
          this.fd,
          BigInt(addressOf(bytes) + done),
          BigInt(bytes.byteLength - done),
          BigInt(offsetBytes + done),
        ),
        "pwrite",
        this.path,
      );
    }
  }

  /** {@linkcode pwriteAll} on another thread: `bytes` must stay put until it settles. */
  async pwriteAllBeside(bytes: Uint8Array, offsetBytes: number): Promise<void> {
    const address = addressOf(bytes);
    let done = 0;
    while (done < bytes.byteLength) {
      const n = await shim.shim_pwrite_beside(
        this.fd,
        BigInt(address + done),
        BigInt(bytes.byteLength - done),
        BigInt(offsetBytes + done),
      );
      const wrote = check(n, "pwrite", this.path);
      if (wrote === 0) throw new SysError("pwrite", EIO, this.path); // no progress: never spin
      done += wrote;
    }
  }

  /** Reads exactly `bytes.length` bytes, zero-filling past the end of file. */
  preadFull(bytes: Uint8Array, offsetBytes: number): void {
    let done = 0;
    while (done < bytes.byteLength) {
      const n = this.pread(bytes.subarray(done), offsetBytes + done);
      if (n === 0) {
        bytes.fill(0, done);
        return;
      }
      done += n;
    }
  }

  fdatasync(): void {
    check(shim.shim_fdatasync(this.fd), "fdatasync", this.path);
  }

  fsync(): void {
    check(shim.shim_fsync(this.fd), "fsync", this.path);
  }

  truncate(lengthBytes: number): void {
    check(shim.shim_ftruncate(this.fd, BigInt(lengthBytes)), "ftruncate", this.path);
  }

  /** Preallocates `[offset, offset+length)` (extends the file). */
  allocate(offsetBytes: number, lengthBytes: number): void {
    this.#fallocate(0, offsetBytes, lengthBytes);
  }

  /** Deallocates a range; it reads back as zeros. */
  punchHole(offsetBytes: number, lengthBytes: number): void {
    this.#fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offsetBytes, lengthBytes);
  }

  /** Zeroes a range, keeping it allocated (FALLOC_FL_ZERO_RANGE). */
  zeroRange(offsetBytes: number, lengthBytes: number): void {
    this.#fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offsetBytes, lengthBytes);
  }

  #fallocate(mode: number, offsetBytes: number, lengthBytes: number): void {
    check(
      shim.shim_fallocate(this.fd, mode, BigInt(offsetBytes), BigInt(lengthBytes)),
      "fallocate",
      this.path,
    );
  }

  /** Next offset >= `offsetBytes` holding data, or null if none. */
  seekData(offsetBytes: number): number | null {
    return this.#seek(offsetBytes, SEEK_DATA);
  }

  /** Next offset >= `offsetBytes` in a hole (end of file counts as a hole). */
  seekHole(offsetBytes: number): number | null {
    return this.#seek(offsetBytes, SEEK_HOLE);
  }

  /**
   * The data and holes of [offsetBytes, endBytes) in order, from
   * SEEK_DATA/SEEK_HOLE (a page-cached write counts as data).
   */
  runs(offsetBytes: number, endBytes: number): FileRun[] {
    const runs: FileRun[] = [];
    let position = offsetBytes;
    while (position < endBytes) {
      const dataStart = Math.min(this.seekData(position) ?? endBytes, endBytes);
      if (dataStart > position) {
        runs.push({ offsetBytes: position, lengthBytes: dataStart - position, data: false });
      }
      if (dataStart >= endBytes) break;
      const holeStart = Math.min(this.seekHole(dataStart) ?? endBytes, endBytes);
      runs.push({ offsetBytes: dataStart, lengthBytes: holeStart - dataStart, data: true });
      position = holeStart;
    }
    return runs;
  }

  #seek(offsetBytes: number, whence: number): number | null {
    const result = Number(shim.shim_lseek(this.fd, BigInt(offsetBytes), whence));
    if (result === -6 /* ENXIO: past the last data */) return null;
    return check(result, "lseek", this.path);
  }

  /**
   * Waits up to `timeoutMs` (-1: forever) for `events` (POLLIN...) off the
   * JavaScript thread; resolves to the revents, 0 on timeout.
   */
  async poll(events: number, timeoutMs: number): Promise<number> {
    return check(await shim.shim_poll(this.fd, events, timeoutMs), "poll", this.path);
  }

  /** ioctl with a pointer or integer argument. */
  ioctl(request: number, arg: number | bigint): number {
    return check(shim.shim_ioctl(this.fd, BigInt(request), BigInt(arg)), "ioctl", this.path);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    check(shim.shim_close(this.fd), "close", this.path);
  }
}

export { SysError };
