/**
 * The file layer beneath format drivers (QEMU's `bs->file`): a growable
 * byte array on disk. Format drivers (qcow, vmdk, ...) keep their data and
 * metadata in an {@linkcode ImageFile}; the raw drivers expose one as a disk.
 * Crash-simulation tests substitute a fault-injecting implementation.
 * @module
 */

import type { FileRun } from "../../ffi/file.ts";

/** A run of file bytes that is either allocated data or a hole. */
export type FileExtent = FileRun;

/** Byte-addressed storage with explicit durability. */
export interface ImageFile {
  /** Path for error messages. */
  readonly path: string;
  /** Whether writes may be issued (opened read-write). */
  readonly writable: boolean;
  /** Current length of the file. */
  lengthBytes(): number;
  /** The descriptor, when the file is read and written through the page cache. */
  readonly pageCacheFd?: number;
  /** Fills `buffer` from `offsetBytes`; bytes past the end read as zeros. Any alignment. */
  read(offsetBytes: number, buffer: Uint8Array): Promise<void>;
  /** Writes all of `data`; extends the file when writing past its end. Any alignment. */
  write(offsetBytes: number, data: Uint8Array): Promise<void>;
  /**
   * Optional: reads consecutive file bytes into several buffers with one
   * request (preadv), for a ring request whose segments are scattered pages.
   */
  readv?(offsetBytes: number, buffers: Uint8Array[]): Promise<void>;
  /** Optional: writes several buffers to consecutive file bytes with one request (pwritev). */
  writev?(offsetBytes: number, buffers: Uint8Array[]): Promise<void>;
  /** Makes every completed write durable (fdatasync). */
  flush(): Promise<void>;
  /**
   * Makes the completed writes inside `[offset, offset+length)` durable,
   * with the metadata needed to read them (size, allocation), without
   * writing back the file's other dirty pages (a ranged fdatasync). Absent:
   * use `flush`, which is stronger.
   */
  flushRange?(offsetBytes: number, lengthBytes: number): Promise<void>;
  /** Sets the length; growing leaves a hole. */
  truncate(lengthBytes: number): Promise<void>;
  /** Deallocates a range inside the file; it reads as zeros afterwards. */
  punchHole(offsetBytes: number, lengthBytes: number): Promise<void>;
  /** False when `punchHole` deallocates nothing (a block device); absent means true. */
  readonly canPunchHoles?: boolean;
  /** Preallocates a range, extending the file if needed; contents read as zeros where new. */
  allocate(offsetBytes: number, lengthBytes: number): Promise<void>;
  /** Data and hole runs covering `[offset, offset+length)` clipped to the file. */
  extents(offsetBytes: number, lengthBytes: number): Promise<FileExtent[]>;
  /** Bytes allocated on disk (`du`). */
  allocatedBytes(): number;
  close(): Promise<void>;
}

/** How an image is opened (CLI `--readonly`, `--cache`). */
export interface ImageOpenOptions {
  /** Open without write permission. */
  readOnly?: boolean;
  /** `none` = O_DIRECT (default), `writeback` = page cache, as QEMU's cache modes. */
  cache?: "none" | "writeback";
  /**
   * A tool is filling a new image it deletes on failure (`convert`): the
   * format may skip the barriers that order its metadata and keep metadata
   * until `flush`, which still makes everything durable. A crash or a kill
   * before that flush may leave the image unreadable. Never for served disks.
   */
  unordered?: boolean;
  /**
   * A tool fills the file with large writes and flushes once at the end
   * (img2qcow, convert), and the file layer tunes for that: flush-behind
   * (a background fdatasync as writes add up, so the disk drains during the
   * copy; raw/flush_behind.ts) and, through the page cache, at most
   * two (raw/aio_file.ts) large writes in flight. Durability
   * is unchanged: only the final flush vouches for the data. The `aio` file
   * layer only.
   */
  filling?: boolean;
  /**
   * Hold QEMU's image locks while open (src/formats/raw/image_lock.ts): as
   * a writer when read-write, as a reader when read-only. Default: lock
   * read-write opens only, so readers that do not serve (`info`, `map`)
   * take none, as `qemu-img -U`. `openImage` passes its choice on to the
   * whole chain (backing files and extents are then read-locked).
   */
  lock?: boolean;
  /**
   * The image's format was probed as raw (not named by the user): refuse
   * writes that would make its first bytes probe as another format
   * (src/formats/raw/probe_guard.ts), as QEMU's raw driver does.
   */
  probedRaw?: boolean;
}
