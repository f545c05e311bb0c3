/**
 * `/dev/blktap-control`, the kernel module's control device (ioctls of
 * kernel/blktap_abi.h): allocate and free minors, create and remove their
 * block devices `/dev/tapdevN`, query their status, fail their requests.
 * @module
 */
import { File, SysError } from "../../../ffi/file.ts";
import { addressOf } from "../../../ffi/memory.ts";
import * as K from "../../ring/blktap_abi.ts";

/** Ring geometry asked for on allocation. */
export interface KernelRingRequest {
  /** Ring pages are 1 << ringOrder (0..4). */
  ringOrder: number;
  /** Largest request in pages (1..256). */
  segmentsMax: number;
  /** Requests in flight (blk-mq tags); 0 = the ring's entries. */
  queueDepth: number;
}

/** The block device's parameters. */
export interface KernelDeviceParams {
  capacitySectors: number;
  logicalBlockBytes: number;
  physicalBlockBytes: number;
  readOnly: boolean;
  /** A volatile cache: flushes reach the disk process as FLUSH_DISKCACHE. */
  flush: boolean;
  /** Discards reach the disk process as DISCARD. */
  discard: boolean;
}

/** What BLKTAP_CTL_STATUS reports for a minor. */
export interface KernelMinorStatus {
  minor: number;
  /** /dev/tapdevN exists. */
  device: boolean;
  /** A disk process holds /dev/blktapN. */
  ringOpen: boolean;
  /** That process broke the ring protocol. */
  ringError: boolean;
  /** BLKTAP_CTL_FAIL was called: every request fails. */
  failed: boolean;
  /** Why the last protocol error happened ("none" if never). */
  lastRingError: string;
  deviceOpeners: number;
  capacitySectors: number;
  /** Requests taken from the block layer and not answered yet. */
  outstanding: number;
  completed: number;
  failedRequests: number;
  /** Requests published again to a new disk process. */
  reissued: number;
  protocolErrors: number;
  ringOpens: number;
  geometry: K.KernelRingGeometry;
}

/** An open control device. */
export class ControlDevice {
  readonly #file: File;

  private constructor(file: File) {
    this.#file = file;
  }

  /** Opens the control device and checks the module speaks our ABI. */
  static open(path = K.CONTROL_DEVICE): ControlDevice {
    let file: File;
    try {
      file = File.open(path, { write: true });
    } catch (error) {
      if (error instanceof SysError && error.code === "ENOENT") {
        throw new Error(`${path} not found: the blktap kernel module is not loaded`);
      }
      throw error;
    }
    const version = file.ioctl(K.CTL_VERSION, 0);
    if (version !== K.BLKTAP_ABI_VERSION) {
      file.close();
      throw new Error(`${path}: module ABI ${version}, this blktap speaks ${K.BLKTAP_ABI_VERSION}`);
    }
    return new ControlDevice(file);
  }

  /** Allocates a minor and its ring memory; /dev/blktapN appears. */
  alloc(ring: KernelRingRequest): number {
    const bytes = new Uint8Array(K.ALLOC_BYTES);
    const view = new DataView(bytes.buffer);
    view.setUint32(K.ALLOC_RING_ORDER, ring.ringOrder, true);
    view.setUint32(K.ALLOC_SEGMENTS_MAX, ring.segmentsMax, true);
    view.setUint32(K.ALLOC_QUEUE_DEPTH, ring.queueDepth, true);
    this.#file.ioctl(K.CTL_ALLOC, addressOf(bytes));
    return view.getUint32(K.ALLOC_MINOR, true);
  }

  /** Creates /dev/tapdevN. */
  createDevice(minor: number, params: KernelDeviceParams): void {
    const bytes = new Uint8Array(K.DEVICE_PARAMS_BYTES);
    const view = new DataView(bytes.buffer);
    const flags = (params.readOnly ? K.DEVICE_READONLY : 0) | (params.flush ? K.DEVICE_FLUSH : 0) |
      (params.discard ? K.DEVICE_DISCARD : 0);
    view.setUint32(K.PARAMS_MINOR, minor, true);
    view.setUint32(K.PARAMS_FLAGS, flags, true);
    view.setBigUint64(K.PARAMS_CAPACITY_SECTORS, BigInt(params.capacitySectors), true);
    view.setUint32(K.PARAMS_LOGICAL_BLOCK_BYTES, params.logicalBlockBytes, true);
    view.setUint32(K.PARAMS_PHYSICAL_BLOCK_BYTES, params.physicalBlockBytes, true);
    this.#file.ioctl(K.CTL_CREATE_DEVICE, addressOf(bytes));
  }

  /** Removes /dev/tapdevN; throws EBUSY (as a clear error) while it is open. */
  removeDevice(minor: number): void {
    try {
      this.#file.ioctl(K.CTL_REMOVE_DEVICE, minor);
    } catch (error) {
      if (error instanceof SysError && error.code === "EBUSY") {
        throw new Error(`${K.diskDevicePath(minor)} is in use (open or mounted)`);
      }
      throw error;
    }
  }

  /** Frees a minor (its block device removed, its ring device closed). */
  free(minor: number): void {
    this.#file.ioctl(K.CTL_FREE, minor);
  }

  /** Every held and later request of `minor` fails (its supervisor gave up). */
  fail(minor: number): void {
    this.#file.ioctl(K.CTL_FAIL, minor);
  }

  /** The minor's state, or undefined if the module has no such minor. */
  status(minor: number): KernelMinorStatus | undefined {
    const bytes = new Uint8Array(K.STATUS_BYTES);
    const view = new DataView(bytes.buffer);
    view.setUint32(K.STATUS_MINOR, minor, true);
    try {
      this.#file.ioctl(K.CTL_STATUS, addressOf(bytes));
    } catch (error) {
      if (error instanceof SysError && error.code === "ENODEV") return undefined;
      throw error;
    }
    return decodeStatus(view);
  }

  close(): void {
    this.#file.close();
  }
}

function decodeStatus(view: DataView): KernelMinorStatus {
  const u32 = (at: number) => view.getUint32(at, true);
  const u64 = (at: number) => Number(view.getBigUint64(at, true));
  const state = u32(K.STATUS_STATE);
  return {
    minor: u32(K.STATUS_MINOR),
    device: (state & K.STATE_DEVICE) !== 0,
    ringOpen: (state & K.STATE_RING_OPEN) !== 0,
    ringError: (state & K.STATE_RING_ERROR) !== 0,
    failed: (state & K.STATE_FAILED) !== 0,
    lastRingError: K.RING_ERRORS[u32(K.STATUS_RING_ERROR)] ?? `code ${u32(K.STATUS_RING_ERROR)}`,
    deviceOpeners: u32(K.STATUS_DEVICE_OPENERS),
    capacitySectors: u64(K.STATUS_CAPACITY_SECTORS),
    outstanding: u64(K.STATUS_REQUESTS_OUTSTANDING),
    completed: u64(K.STATUS_REQUESTS_COMPLETED),
    failedRequests: u64(K.STATUS_REQUESTS_FAILED),
    reissued: u64(K.STATUS_REQUESTS_REISSUED),
    protocolErrors: u64(K.STATUS_PROTOCOL_ERRORS),
    ringOpens: u64(K.STATUS_RING_OPENS),
    geometry: K.readGeometry(view, K.STATUS_GEOMETRY),
  };
}
