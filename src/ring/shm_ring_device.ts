/**
 * The userspace ring device: one shared-memory file per minor holding the
 * ring pages, then the data page pool. ctrl creates it; the disk process
 * maps the same file. A request's grefs are page numbers in the pool.
 * Kicks travel separately (src/ring/kick_channel.ts).
 * @module
 */
import { File } from "../../ffi/file.ts";
import { NativeMemory } from "../../ffi/memory.ts";
import { PAGE_BYTES } from "./blkif.ts";
import type { RingDevice } from "./ring_device.ts";

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

  /** Creates (or replaces) the file at `path` and maps it; contents are zero. */
  static create(path: string, layout: RingDeviceLayout): ShmRingDevice {
    checkLayout(layout);
    try {
      Deno.removeSync(path);
    } catch {
      // absent
    }
    const file = File.open(path, { write: true, createNew: true, mode: 0o600 });
    try {
      file.truncate((layout.ringPages + layout.poolPages) * PAGE_BYTES);
      return new ShmRingDevice(path, layout, file);
    } catch (error) {
      file.close();
      throw error;
    }
  }

  /** Maps an existing ring device; its size must match `layout`. */
  static open(path: string, layout: RingDeviceLayout): ShmRingDevice {
    checkLayout(layout);
    const file = File.open(path, { write: true });
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

/**
 * A shared-memory ring device as the disk process serves it: "requests
 * published" arrives as a kick on ctrl's channel (the disk process passes it
 * to {@linkcode ShmRingEnd.kicked}), "responses published" is a kick back.
 */
export class ShmRingEnd implements RingDevice {
  readonly device: ShmRingDevice;
  readonly #kickPeer: () => void;
  #onRequests: (() => void) | undefined;

  constructor(device: ShmRingDevice, kickPeer: () => void) {
    this.device = device;
    this.#kickPeer = kickPeer;
  }

  get ring(): Uint8Array {
    return this.device.ring;
  }

  get pool(): Uint8Array {
    return this.device.pool;
  }

  start(onRequests: () => void): void {
    this.#onRequests = onRequests;
  }

  /** ctrl kicked: requests were published. */
  kicked(): void {
    this.#onRequests?.();
  }

  notify(): void {
    this.#kickPeer();
  }

  close(): Promise<void> {
    this.#onRequests = undefined;
    this.device.close();
    return Promise.resolve();
  }
}

function checkLayout(layout: RingDeviceLayout): void {
  const { ringPages, poolPages } = layout;
  if (![1, 2, 4, 8, 16].includes(ringPages)) throw new RangeError(`ring pages ${ringPages}`);
  if (!Number.isInteger(poolPages) || poolPages < 1 || poolPages > pool_pages_max) {
    throw new RangeError(`pool pages ${poolPages} outside 1..${pool_pages_max}`);
  }
}
