/**
 * The user ABI of the blktap kernel module (kernel/blktap_abi.h, its single
 * source): device names, ioctl numbers and the layout of the structures they
 * carry. The ring itself is Xen's blkif ring (./blkif.ts). Both files are
 * checked against the C headers by tests/kernel/abi_test.ts.
 * @module
 */

/** BLKTAP_ABI_VERSION this code speaks. */
export const BLKTAP_ABI_VERSION = 1;

/** `/dev/blktap-control`. */
export const CONTROL_DEVICE = "/dev/blktap-control";
/** `/dev/blktapN`: the ring device of minor N. */
export function ringDevicePath(minor: number): string {
  return `/dev/blktap${minor}`;
}
/** `/dev/tapdevN`: the block device of minor N. */
export function diskDevicePath(minor: number): string {
  return `/dev/tapdev${minor}`;
}

/** Minors 0 .. minors_max - 1. */
export const minors_max = 256;
/** Largest ring: 1 << ring_order_max pages. */
export const ring_order_max = 4;
/** Largest request, in data pages. */
export const segments_max = 256;

// blktap_device_params.flags
export const DEVICE_READONLY = 1 << 0;
export const DEVICE_FLUSH = 1 << 1;
export const DEVICE_DISCARD = 1 << 2;

// blktap_status.state
export const STATE_DEVICE = 1 << 0;
export const STATE_RING_OPEN = 1 << 1;
export const STATE_RING_ERROR = 1 << 2;
export const STATE_FAILED = 1 << 3;
export const STATE_REMOVING = 1 << 4;

/** blktap_status.ring_error: why the module refused a disk process's responses. */
export const RING_ERRORS = [
  "none",
  "rsp_prod beyond the published requests",
  "a response id that names no request",
  "a second response to one request",
  "a response with another operation",
  "an unknown response status",
] as const;
export const RING_ERROR_RSP_PROD = 1;
export const RING_ERROR_ID = 2;
export const RING_ERROR_DUPLICATE = 3;
export const RING_ERROR_OPERATION = 4;
export const RING_ERROR_STATUS = 5;

// Linux's _IOC encoding (asm-generic/ioctl.h): dir 2 bits, size 14, type 8, nr 8.
const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;
const MAGIC = 0xb7;

function ioc(dir: number, nr: number, sizeBytes: number): number {
  return ((dir << 30) >>> 0) + (sizeBytes << 16) + (MAGIC << 8) + nr;
}

/** sizeof of the ioctl structures. */
export const ALLOC_BYTES = 16;
export const GEOMETRY_BYTES = 32;
export const DEVICE_PARAMS_BYTES = 32;
export const STATUS_BYTES = 128;

export const CTL_VERSION = ioc(IOC_NONE, 0x00, 0);
export const CTL_ALLOC = ioc(IOC_READ | IOC_WRITE, 0x01, ALLOC_BYTES);
export const CTL_FREE = ioc(IOC_NONE, 0x02, 0);
export const CTL_CREATE_DEVICE = ioc(IOC_WRITE, 0x03, DEVICE_PARAMS_BYTES);
export const CTL_REMOVE_DEVICE = ioc(IOC_NONE, 0x04, 0);
export const CTL_STATUS = ioc(IOC_READ | IOC_WRITE, 0x05, STATUS_BYTES);
export const CTL_FAIL = ioc(IOC_NONE, 0x06, 0);
export const IOC_GEOMETRY = ioc(IOC_READ, 0x10, GEOMETRY_BYTES);
export const IOC_RESPOND = ioc(IOC_NONE, 0x11, 0);

// struct blktap_alloc
export const ALLOC_MINOR = 0;
export const ALLOC_RING_ORDER = 4;
export const ALLOC_SEGMENTS_MAX = 8;
export const ALLOC_QUEUE_DEPTH = 12;

// struct blktap_geometry
export const GEOMETRY_RING_PAGES = 0;
export const GEOMETRY_RING_ENTRIES = 4;
export const GEOMETRY_QUEUE_DEPTH = 8;
export const GEOMETRY_SEGMENTS_MAX = 12;
export const GEOMETRY_SLOT_PAGES = 16;
export const GEOMETRY_POOL_PAGES = 20;
export const GEOMETRY_MMAP_BYTES = 24;

// struct blktap_device_params
export const PARAMS_MINOR = 0;
export const PARAMS_FLAGS = 4;
export const PARAMS_CAPACITY_SECTORS = 8;
export const PARAMS_LOGICAL_BLOCK_BYTES = 16;
export const PARAMS_PHYSICAL_BLOCK_BYTES = 20;
export const PARAMS_DISCARD_GRANULARITY_BYTES = 24;

// struct blktap_status
export const STATUS_MINOR = 0;
export const STATUS_STATE = 4;
export const STATUS_RING_ERROR = 8;
export const STATUS_DEVICE_OPENERS = 12;
export const STATUS_CAPACITY_SECTORS = 16;
export const STATUS_REQUESTS_OUTSTANDING = 24;
export const STATUS_REQUESTS_COMPLETED = 32;
export const STATUS_REQUESTS_FAILED = 40;
export const STATUS_REQUESTS_REISSUED = 48;
export const STATUS_PROTOCOL_ERRORS = 56;
export const STATUS_RING_OPENS = 64;
export const STATUS_GEOMETRY = 72;

/** What /dev/blktapN maps (struct blktap_geometry). */
export interface KernelRingGeometry {
  ringPages: number;
  ringEntries: number;
  queueDepth: number;
  segmentsMax: number;
  slotPages: number;
  poolPages: number;
  mmapBytes: number;
}

/** Decodes a struct blktap_geometry at `offset`. */
export function readGeometry(view: DataView, offset = 0): KernelRingGeometry {
  const u32 = (at: number) => view.getUint32(offset + at, true);
  return {
    ringPages: u32(GEOMETRY_RING_PAGES),
    ringEntries: u32(GEOMETRY_RING_ENTRIES),
    queueDepth: u32(GEOMETRY_QUEUE_DEPTH),
    segmentsMax: u32(GEOMETRY_SEGMENTS_MAX),
    slotPages: u32(GEOMETRY_SLOT_PAGES),
    poolPages: u32(GEOMETRY_POOL_PAGES),
    mmapBytes: Number(view.getBigUint64(offset + GEOMETRY_MMAP_BYTES, true)),
  };
}
