/**
 * The userspace ring device: one shared-memory file per minor holding the
 * ring pages, then the data page pool. ctrl creates it; the disk process
 * maps the same file. A request's grefs are page numbers in the pool.
 * Kicks travel separately (src/ring/kick_channel.ts).
 *
 * The file lives in a shared-memory folder, so it is a private file
 * (ffi/mapped_file.ts): a symbolic link or someone else's file where a ring
 * device goes is refused, never followed.
 * @module
 */
import { MappedFile } from "../../ffi/mapped_file.ts";
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
  readonly #mapped: MappedFile;

  private constructor(layout: RingDeviceLayout, mapped: MappedFile) {
    this.path = mapped.path;
    this.layout = layout;
    this.#mapped = mapped;
    const ringBytes = layout.ringPages * PAGE_BYTES;
    this.ring = mapped.bytes.subarray(0, ringBytes);
    this.pool = mapped.bytes.subarray(ringBytes, deviceBytes(layout));
  }

  /**
   * Creates the file at `path` and maps it; contents are zero. A stale ring
   * device of ours there is replaced; anything else (a symbolic link, a
   * file of another user or with another mode) is refused.
   */
  static create(path: string, layout: RingDeviceLayout): ShmRingDevice {
    checkLayout(layout);
    return new ShmRingDevice(layout, MappedFile.create(path, deviceBytes(layout), "ring device"));
  }

  /**
   * Maps an existing ring device; its size must match `layout`. Throws a
   * `SysError` ENOENT when there is none, an error naming the problem when
   * the file there is not a private file of ours.
   */
  static open(path: string, layout: RingDeviceLayout): ShmRingDevice {
    checkLayout(layout);
    return new ShmRingDevice(layout, MappedFile.open(path, deviceBytes(layout), "ring device"));
  }

  /** Unmaps and closes; the file stays. */
  close(): void {
    this.#mapped.close();
  }

  /** Removes the file (mappings stay valid until closed). */
  unlink(): void {
    this.#mapped.unlink();
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

function deviceBytes(layout: RingDeviceLayout): number {
  return (layout.ringPages + layout.poolPages) * PAGE_BYTES;
}

function checkLayout(layout: RingDeviceLayout): void {
  const { ringPages, poolPages } = layout;
  if (![1, 2, 4, 8, 16].includes(ringPages)) throw new RangeError(`ring pages ${ringPages}`);
  if (!Number.isInteger(poolPages) || poolPages < 1 || poolPages > pool_pages_max) {
    throw new RangeError(`pool pages ${poolPages} outside 1..${pool_pages_max}`);
  }
}
