/**
 * What a disk process serves (DESIGN.md §1): a mapping holding the ring
 * pages then the data pages, a way to wait for "requests published" and a
 * way to say "responses published". Two kinds exist: ctrl's shared-memory
 * ring device (./shm_ring_device.ts, kicks over ctrl's Unix socket) and
 * the kernel module's /dev/blktapN (./kernel_ring_device.ts, poll and
 * ioctl). The disk process sees only this interface.
 * @module
 */

/** A ring device as the serving end (the disk process) sees it. */
export interface RingDevice {
  /** The ring pages (struct blkif_sring). */
  readonly ring: Uint8Array;
  /** The data pool: gref `g` is `pool.subarray(g * 4096, (g + 1) * 4096)`. */
  readonly pool: Uint8Array;
  /**
   * Calls `onRequests` whenever the front end published requests (and
   * asked to be told), and `onFailure` once if the device stops serving
   * this process (the front end refused it).
   */
  start(onRequests: () => void, onFailure: (error: Error) => void): void;
  /** Responses were published (and the front end asked to be told). Throws if refused. */
  notify(): void;
  /** Stops waiting, unmaps and closes. */
  close(): Promise<void>;
}
