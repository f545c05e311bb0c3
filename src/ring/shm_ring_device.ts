/**
 * The userspace ring device: one shared-memory file per minor holding the
 * ring pages, then the data page pool. ctrl creates it; the disk process
 * maps the same file. A request's grefs are page numbers in the pool.
 * Kicks travel separately (src/ring/kick_channel.ts).
 *
 * The file lives in a shared-memory folder, so it is handled as a private
 * file (ffi/private_path.ts): created with O_EXCL|O_NOFOLLOW and mode
 * 0600, opened with O_NOFOLLOW and checked (regular file, ours, 0600); a
 * symbolic link or someone else's file where a ring device goes is refused,
 * never followed.
 * @module
 */
import { SysError } from "../../ffi/errno.ts";
import type { File } from "../../ffi/file.ts";
import { NativeMemory } from "../../ffi/memory.ts";
import { createPrivateFile, openPrivateFile } from "../../ffi/private_path.ts";
import { PAGE_BYTES } from "./blkif.ts";

/** Page counts of a ring device. */
export interface RingDeviceLayout {
  /** Ring pages (1 << ring-page-order). */
  ringPages: number;
  /** Data pages available to requests (and indirect segment pages). */
  poolPages: number;
}

/** Largest data pool per minor: 1 GiB. */
export const pool_pages_max = 262144;

/** Where ctrl puts ring devices when the run dir is not on tmpfs. */
export function defaultShmDir(): string {
  try {
    if (Deno.statSync("/dev/shm").isDirectory) return "/dev/shm";
  } catch {
    // fall through
  }
  return Deno.env.get("TMPDIR") ?? "/tmp";
}

/** A mapped ring device. */
export class ShmRingDevice {
  readonly path: string;
  readonly layout: RingDeviceLayout;
  /** The ring pages. */
  readonly ring: Uint8Array;
  /** The data pool: page `g` is `pool.subarray(g * 4096, (g + 1) * 4096)`. */
  readonly pool: Uint8Array;
  readonly #memory: NativeMemory;
  readonly #file: File;

  private constructor(path: string, layout: RingDeviceLayout, file: File) {
    this.path = path;
    this.layout = layout;
    this.#file = file;
    const ringBytes = layout.ringPages * PAGE_BYTES;
    const total = ringBytes + layout.poolPages * PAGE_BYTES;
    this.#memory = NativeMemory.mapShared(file.fd, total, 0, path);
    this.ring = this.#memory.bytes.subarray(0, ringBytes);
    this.pool = this.#memory.bytes.subarray(ringBytes, total);
  }

  /**
   * Creates the file at `path` and maps it; contents are zero. A stale ring
   * device of ours there is replaced; anything else (a symbolic link, a
   * file of another user or with another mode) is refused.
   */
  static create(path: string, layout: RingDeviceLayout): ShmRingDevice {
    checkLayout(layout);
    const file = createRingFile(path);
    try {
      file.truncate((layout.ringPages + layout.poolPages) * PAGE_BYTES);
      return new ShmRingDevice(path, layout, file);
    } catch (error) {
      file.close();
      throw error;
    }
  }

  /**
   * Maps an existing ring device; its size must match `layout`. Throws a
   * {@linkcode SysError} ENOENT when there is none, an error naming the
   * problem when the file there is not a private file of ours.
   */
  static open(path: string, layout: RingDeviceLayout): ShmRingDevice {
    checkLayout(layout);
    const file = openPrivateFile(path, ring_device_what);
    try {
      const { sizeBytes } = file.stat();
      const expected = (layout.ringPages + layout.poolPages) * PAGE_BYTES;
      if (sizeBytes !== expected) {
        throw new Error(`${path}: ring device is ${sizeBytes} bytes, expected ${expected}`);
      }
      return new ShmRingDevice(path, layout, file);
    } catch (error) {
      file.close();
      throw error;
    }
  }

  /** Unmaps and closes; the file stays. */
  close(): void {
    this.#memory.release();
    this.#file.close();
  }

  /** Removes the file (mappings stay valid until closed). */
  unlink(): void {
    try {
      Deno.removeSync(this.path);
    } catch {
      // already gone
    }
  }
}

const ring_device_what = "ring device";

// A ring device of ours left by a ctrl that died before recording it is
// replaced; openPrivateFile refuses anything else before it is removed.
function createRingFile(path: string): File {
  try {
    return createPrivateFile(path, ring_device_what);
  } catch (error) {
    if (!(error instanceof SysError && error.code === "EEXIST")) throw error;
  }
  openPrivateFile(path, ring_device_what).close();
  Deno.removeSync(path);
  return createPrivateFile(path, ring_device_what);
}

function checkLayout(layout: RingDeviceLayout): void {
  const { ringPages, poolPages } = layout;
  if (![1, 2, 4, 8, 16].includes(ringPages)) throw new RangeError(`ring pages ${ringPages}`);
  if (!Number.isInteger(poolPages) || poolPages < 1 || poolPages > pool_pages_max) {
    throw new RangeError(`pool pages ${poolPages} outside 1..${pool_pages_max}`);
  }
}
