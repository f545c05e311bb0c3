/**
 * The kernel module's ring device `/dev/blktapN`, as the disk process uses
 * it (kernel/blktap_abi.h): one opener, a mapping of exactly the geometry's
 * `mmapBytes` (ring pages then the data pool), poll() readable when requests
 * were published (read() clears the event count), POLLERR once the module
 * refused this process's responses, BLKTAP_IOC_RESPOND for "responses
 * published". The pool is vmalloc_user memory remapped into this process,
 * so O_DIRECT and libaio work on it: the data path stays zero-copy here.
 * @module
 */
import { File, POLLERR, POLLHUP, POLLIN } from "../../ffi/file.ts";
import { addressOf, NativeMemory } from "../../ffi/memory.ts";
import { SysError } from "../../ffi/errno.ts";
import { PAGE_BYTES, ringEntries } from "./blkif.ts";
import {
  GEOMETRY_BYTES,
  IOC_GEOMETRY,
  IOC_RESPOND,
  type KernelRingGeometry,
  readGeometry,
  ringDevicePath,
} from "./blktap_abi.ts";
import type { RingDevice } from "./ring_device.ts";

/** How long one poll waits before looking whether the device was closed. */
export const poll_timeout_ms = 250;
/** How long open() retries while a previous disk process still holds the device. */
export const open_busy_retry_ms = 5000;

/** An open, mapped /dev/blktapN. */
export class KernelRingDevice implements RingDevice {
  readonly path: string;
  readonly geometry: KernelRingGeometry;
  readonly ring: Uint8Array;
  readonly pool: Uint8Array;
  readonly #file: File;
  readonly #memory: NativeMemory;
  #closed = false;
  #loop: Promise<void> = Promise.resolve();

  private constructor(file: File, geometry: KernelRingGeometry) {
    this.path = file.path;
    this.#file = file;
    this.geometry = geometry;
    this.#memory = NativeMemory.mapShared(file.fd, geometry.mmapBytes, 0, file.path);
    const ringBytes = geometry.ringPages * PAGE_BYTES;
    this.ring = this.#memory.bytes.subarray(0, ringBytes);
    this.pool = this.#memory.bytes.subarray(ringBytes, ringBytes + geometry.poolPages * PAGE_BYTES);
  }

  /**
   * Opens and maps the ring device of kernel minor `minor`. The module
   * re-publishes every request it holds to this opener. A device still held
   * by a previous disk process (EBUSY) is retried for a while.
   */
  static async open(minor: number): Promise<KernelRingDevice> {
    const path = ringDevicePath(minor);
    const file = await openRetryingBusy(path);
    try {
      const bytes = new Uint8Array(GEOMETRY_BYTES);
      file.ioctl(IOC_GEOMETRY, addressOf(bytes));
      const geometry = readGeometry(new DataView(bytes.buffer));
      checkGeometry(path, geometry);
      return new KernelRingDevice(file, geometry);
    } catch (error) {
      file.close();
      throw error;
    }
  }

  start(onRequests: () => void, onFailure: (error: Error) => void): void {
    this.#loop = this.#wait(onRequests, onFailure);
  }

  // Polls off the JavaScript thread; each readable poll clears the event
  // count (read) before the ring is looked at, so none is missed.
  async #wait(onRequests: () => void, onFailure: (error: Error) => void): Promise<void> {
    const events = new Uint8Array(8);
    while (!this.#closed) {
      let revents: number;
      try {
        revents = await this.#file.poll(POLLIN, poll_timeout_ms);
        if (this.#closed) return;
        if (revents & (POLLERR | POLLHUP)) {
          throw new Error(`${this.path}: the module refused this disk process (ring error)`);
        }
        if (revents & POLLIN) this.#file.pread(events, 0);
      } catch (error) {
        if (!this.#closed) onFailure(error as Error);
        return;
      }
      if (revents & POLLIN) onRequests();
    }
  }

  notify(): void {
    this.#file.ioctl(IOC_RESPOND, 0);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    // The poll thread must be out of poll() before the descriptor closes.
    await this.#loop;
    this.#memory.release();
    this.#file.close();
  }
}

async function openRetryingBusy(path: string): Promise<File> {
  for (let waited = 0;; waited += 50) {
    try {
      return File.open(path, { write: true });
    } catch (error) {
      if (!(error instanceof SysError) || error.code !== "EBUSY" || waited >= open_busy_retry_ms) {
        throw error;
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// The module and this code must agree on the ring before anything is read.
function checkGeometry(path: string, g: KernelRingGeometry): void {
  const expected = (g.ringPages + g.poolPages) * PAGE_BYTES;
  if (g.mmapBytes !== expected || ringEntries(g.ringPages * PAGE_BYTES) !== g.ringEntries) {
    throw new Error(`${path}: inconsistent ring geometry ${JSON.stringify(g)}`);
  }
}
