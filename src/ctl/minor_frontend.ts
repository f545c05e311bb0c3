/**
 * Where a minor's requests come from, as supervision sees it: ctrl's own
 * shared-memory ring (its {@linkcode RingDisk}, which NBD and the test front
 * end use) or the kernel module's ring behind `/dev/tapdevN`. {@linkcode Minor}
 * drives either through this interface.
 * @module
 */
import type { AttachConfig } from "../disk/protocol.ts";
import type { KernelMinor } from "../frontends/kernel/kernel_minor.ts";
import { RingDisk, type ServedDisk } from "../ring/ring_disk.ts";
import type { ShmRingDevice } from "../ring/shm_ring_device.ts";
import type { Fence } from "../ring/ring.ts";

/** The front end of one minor. */
export interface MinorFrontend {
  /** The minor as a block device inside ctrl (shared-memory minors only). */
  readonly disk: RingDisk | undefined;
  /** Where the disk process finds its ring device. */
  readonly ring: Pick<AttachConfig, "kernelMinor" | "shmPath" | "ringPages" | "poolPages">;
  /** A disk process serves `served`; `kick` reaches it over ctrl's channel. */
  attach(kick: () => void, served: ServedDisk): void;
  /** The disk process is gone. */
  detach(): void;
  /** Before a new disk process starts; returns the requests it will be given again. */
  rearm(): number;
  /** The disk cannot be served any more: every held and later request fails. */
  fail(): void;
  /** The disk process kicked over ctrl's channel. */
  onKick(): void;
  /** Requests issued and not answered. */
  readonly outstanding: number;
  /** First step of destroy, while the disk process still serves; throws to refuse. */
  beginDestroy(): void;
  /** Last step of destroy, once no disk process is left. */
  close(): void;
  /** Fields for `list` and `stats`. */
  describe(): Record<string, unknown>;
}

/** ctrl's shared-memory ring device and the RingDisk producing on it. */
export class ShmFrontend implements MinorFrontend {
  readonly disk: RingDisk;
  readonly #device: ShmRingDevice;

  constructor(
    name: string,
    device: ShmRingDevice,
    options: { fence: Fence; readOnly: boolean; sizeBytes: number },
  ) {
    this.#device = device;
    this.disk = new RingDisk(name, device, options);
  }

  get ring() {
    const { path, layout } = this.#device;
    return { shmPath: path, ringPages: layout.ringPages, poolPages: layout.poolPages };
  }

  attach(kick: () => void, served: ServedDisk): void {
    this.disk.attach(kick, served);
  }

  detach(): void {
    this.disk.detach();
  }

  rearm(): number {
    return this.disk.rearm();
  }

  fail(): void {
    this.disk.fail();
  }

  onKick(): void {
    this.disk.onKick();
  }

  get outstanding(): number {
    return this.disk.outstanding;
  }

  beginDestroy(): void {}

  close(): void {
    this.disk.fail();
    this.#device.close();
    this.#device.unlink();
  }

  describe(): Record<string, unknown> {
    return { answeredInCtrl: this.disk.answeredHere() };
  }
}

/**
 * A kernel minor: requests live in the module, which holds what a dying
 * disk process did not answer and publishes it to the next one; ctrl only
 * creates the block device, fails requests when it gives up, and removes
 * the device on destroy (refused while it is open).
 */
export class KernelFrontend implements MinorFrontend {
  readonly disk = undefined;
  readonly kernel: KernelMinor;

  constructor(kernel: KernelMinor) {
    this.kernel = kernel;
  }

  get ring() {
    const { geometry } = this.kernel.status();
    return {
      kernelMinor: this.kernel.minor,
      shmPath: "",
      ringPages: geometry.ringPages,
      poolPages: geometry.poolPages,
    };
  }

  attach(_kick: () => void, served: ServedDisk): void {
    const { canWrite, canDiscard } = served.capabilities;
    this.kernel.attach({ sizeBytes: served.sizeBytes, canWrite, canDiscard });
  }

  detach(): void {}

  rearm(): number {
    return this.kernel.outstanding;
  }

  fail(): void {
    this.kernel.fail();
  }

  onKick(): void {}

  get outstanding(): number {
    return this.kernel.outstanding;
  }

  beginDestroy(): void {
    this.kernel.removeDevice();
  }

  close(): void {
    this.kernel.free();
  }

  describe(): Record<string, unknown> {
    const s = this.kernel.control.status(this.kernel.minor);
    if (!s) return { device: this.kernel.devicePath, kernel: null };
    return {
      device: this.kernel.devicePath,
      kernel: {
        minor: s.minor,
        device: s.device,
        ringOpen: s.ringOpen,
        ringError: s.ringError,
        failed: s.failed,
        lastRingError: s.lastRingError,
        deviceOpeners: s.deviceOpeners,
        capacitySectors: s.capacitySectors,
        outstanding: s.outstanding,
        completed: s.completed,
        failedRequests: s.failedRequests,
        reissued: s.reissued,
        protocolErrors: s.protocolErrors,
        ringOpens: s.ringOpens,
      },
    };
  }
}

/**
 * A registered minor whose front end could not be found again on restart
 * (say a kernel minor while the module is not loaded): it stays listed as
 * failed and in the registry, keeping its number, until destroyed.
 */
export class UnavailableFrontend implements MinorFrontend {
  readonly disk = undefined;
  readonly #reason: string;
  readonly #ring: MinorFrontend["ring"];

  constructor(reason: string, ring: MinorFrontend["ring"]) {
    this.#reason = reason;
    this.#ring = ring;
  }

  get ring() {
    return this.#ring;
  }

  attach(): void {
    throw new Error(this.#reason);
  }

  detach(): void {}

  rearm(): number {
    return 0;
  }

  fail(): void {}

  onKick(): void {}

  get outstanding(): number {
    return 0;
  }

  beginDestroy(): void {}

  close(): void {}

  describe(): Record<string, unknown> {
    return { unavailable: this.#reason };
  }
}
