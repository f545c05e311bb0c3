/**
 * One minor of the kernel module as ctrl drives it: its ring device
 * `/dev/blktapN` exists from allocation (the disk process opens it), its
 * block device `/dev/tapdevN` from the moment the disk process reported the
 * image's size. Requests a dying disk process did not answer stay in the
 * module and are published again to the next one, so supervision has
 * nothing to re-issue here; failing them is an explicit decision
 * ({@linkcode KernelMinor.fail}).
 * @module
 */
import { diskDevicePath, ringDevicePath } from "../../ring/blktap_abi.ts";
import type { ControlDevice, KernelMinorStatus, KernelRingRequest } from "./control_device.ts";

/**
 * Ring of a new kernel minor: one ring page (32 entries, so 32 requests in
 * flight) and requests up to 1 MiB (256 pages, indirect beyond 11): a pool
 * of 32 * 257 pages, about 32 MiB of kernel memory.
 */
export const kernel_ring_default: KernelRingRequest = {
  ringOrder: 0,
  segmentsMax: 256,
  queueDepth: 0,
};

/** Block size the device advertises (the page cache's unit; 512-byte I/O still works). */
export const physical_block_bytes = 4096;

/** What the disk process reported about the image it serves. */
export interface ServedImage {
  sizeBytes: number;
  canWrite: boolean;
  canDiscard: boolean;
}

/** A kernel minor. */
export class KernelMinor {
  readonly control: ControlDevice;
  readonly minor: number;
  readonly readOnly: boolean;

  constructor(control: ControlDevice, minor: number, readOnly: boolean) {
    this.control = control;
    this.minor = minor;
    this.readOnly = readOnly;
  }

  /** Allocates a new minor. */
  static allocate(
    control: ControlDevice,
    readOnly: boolean,
    ring: KernelRingRequest = kernel_ring_default,
  ): KernelMinor {
    return new KernelMinor(control, control.alloc(ring), readOnly);
  }

  /** The minor `minor` if the module still has it (a restarted ctrl finds its minors). */
  static find(control: ControlDevice, minor: number, readOnly: boolean): KernelMinor | undefined {
    return control.status(minor) ? new KernelMinor(control, minor, readOnly) : undefined;
  }

  /** `/dev/tapdevN`. */
  get devicePath(): string {
    return diskDevicePath(this.minor);
  }

  /** `/dev/blktapN`. */
  get ringPath(): string {
    return ringDevicePath(this.minor);
  }

  status(): KernelMinorStatus {
    const status = this.control.status(this.minor);
    if (!status) throw new Error(`kernel minor ${this.minor} is gone (module reloaded?)`);
    return status;
  }

  /**
   * A disk process serves `image`: creates the block device if it does not
   * exist yet. An existing device keeps its size (a resume on another image
   * of another size is refused).
   */
  attach(image: ServedImage): void {
    const status = this.status();
    const capacitySectors = Math.floor(image.sizeBytes / 512);
    if (status.device) {
      if (status.capacitySectors !== capacitySectors) {
        throw new Error(
          `${this.devicePath} has ${status.capacitySectors} sectors; the image has ${capacitySectors}`,
        );
      }
      return;
    }
    const readOnly = this.readOnly || !image.canWrite;
    this.control.createDevice(this.minor, {
      capacitySectors,
      logicalBlockBytes: 512,
      physicalBlockBytes: physical_block_bytes,
      readOnly,
      flush: true,
      discard: image.canDiscard && !readOnly,
    });
  }

  /** Requests the module holds (answered by no disk process yet). */
  get outstanding(): number {
    return this.control.status(this.minor)?.outstanding ?? 0;
  }

  /** Every held and later request fails: the disk cannot be served any more. */
  fail(): void {
    this.control.fail(this.minor);
  }

  /** Removes the block device; refused (throws) while it is open or mounted. */
  removeDevice(): void {
    if (this.control.status(this.minor)?.device) this.control.removeDevice(this.minor);
  }

  /** Frees the minor (its block device removed, no disk process left). */
  free(): void {
    if (this.control.status(this.minor)) this.control.free(this.minor);
  }
}
