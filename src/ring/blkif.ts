/**
 * The Xen blkif ABI (xen/include/public/io/blkif.h and io/ring.h), x86_64
 * layout, little-endian: constants, byte offsets and sizes. Everything that
 * reads or writes ring bytes takes its numbers from here, and
 * tests/ring/blkif_test.ts checks them against the C headers' layout.
 * @module
 */

/** Bytes of one page (grant) on x86_64. */
export const PAGE_BYTES = 4096;
/** Bytes of one sector: blkif addresses the disk in 512-byte units. */
export const SECTOR_BYTES = 512;
/** `first_sect`/`last_sect` range inside a page: 0..7. */
export const SECTORS_PER_PAGE = PAGE_BYTES / SECTOR_BYTES;

// Operations (BLKIF_OP_*).
export const BLKIF_OP_READ = 0;
export const BLKIF_OP_WRITE = 1;
export const BLKIF_OP_WRITE_BARRIER = 2;
export const BLKIF_OP_FLUSH_DISKCACHE = 3;
export const BLKIF_OP_RESERVED_1 = 4;
export const BLKIF_OP_DISCARD = 5;
export const BLKIF_OP_INDIRECT = 6;

/**
 * blktap extension, not in Xen's blkif.h: block status (which ranges are
 * holes or read as zeros), so NBD clients of ctrl see the image's holes.
 * Xen numbers its operations upwards from 0 (6 is the highest in 4.x
 * headers); 0x80 keeps ours clear of any it may add. A normal one-segment
 * request: sector_number is the first sector asked about, and the
 * segment's whole page carries the query and the answer
 * (src/ring/block_status.ts). Only blktap's own front end issues it; a Xen
 * guest never does.
 */
export const BLKTAP_OP_BLOCK_STATUS = 0x80;

// Response status (BLKIF_RSP_*).
export const BLKIF_RSP_OKAY = 0;
export const BLKIF_RSP_ERROR = -1;
export const BLKIF_RSP_EOPNOTSUPP = -2;

/** BLKIF_DISCARD_SECURE in the discard request's `flag`. */
export const BLKIF_DISCARD_SECURE = 1;

/** BLKIF_MAX_SEGMENTS_PER_REQUEST: segments carried in a direct request. */
export const SEGMENTS_PER_REQUEST_MAX = 11;
/** BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST. */
export const INDIRECT_PAGES_PER_REQUEST_MAX = 8;
/** Segment descriptors in one indirect page (PAGE_SIZE / sizeof(blkif_request_segment)). */
export const SEGMENTS_PER_INDIRECT_PAGE = 512;
/**
 * Segments we accept in an indirect request (Xen's `feature-max-indirect-segments`):
 * 256 segments = 1 MiB, one indirect page.
 */
export const indirect_segments_max = 256;
/** Largest ring: `ring-page-order` 4 = 16 pages. */
export const ring_page_order_max = 4;

// struct blkif_sring header: req_prod, req_event, rsp_prod, rsp_event,
// pvt (4), __pad[44]; entries start at 64.
export const SRING_REQ_PROD = 0;
export const SRING_REQ_EVENT = 4;
export const SRING_RSP_PROD = 8;
export const SRING_RSP_EVENT = 12;
export const SRING_HEADER_BYTES = 64;

/** sizeof(union blkif_sring_entry) = sizeof(struct blkif_request). */
export const ENTRY_BYTES = 112;
/** sizeof(struct blkif_response). */
export const RESPONSE_BYTES = 16;
/** sizeof(struct blkif_request_segment): gref u32, first_sect u8, last_sect u8, pad. */
export const SEGMENT_BYTES = 8;

// struct blkif_request.
export const REQ_OPERATION = 0;
export const REQ_NR_SEGMENTS = 1;
export const REQ_HANDLE = 2;
export const REQ_ID = 8;
export const REQ_SECTOR_NUMBER = 16;
export const REQ_SEG = 24;

// struct blkif_request_segment.
export const SEG_GREF = 0;
export const SEG_FIRST_SECT = 4;
export const SEG_LAST_SECT = 5;

// struct blkif_request_discard.
export const DISCARD_FLAG = 1;
export const DISCARD_HANDLE = 2;
export const DISCARD_ID = 8;
export const DISCARD_SECTOR_NUMBER = 16;
export const DISCARD_NR_SECTORS = 24;

// struct blkif_request_indirect.
export const INDIRECT_OP = 1;
export const INDIRECT_NR_SEGMENTS = 2;
export const INDIRECT_ID = 8;
export const INDIRECT_SECTOR_NUMBER = 16;
export const INDIRECT_HANDLE = 24;
export const INDIRECT_GREFS = 28;

// struct blkif_response.
export const RSP_ID = 0;
export const RSP_OPERATION = 8;
export const RSP_STATUS = 10;

/**
 * Entries in a ring of `ringBytes`: io/ring.h's __RING_SIZE, the number of
 * whole entries after the header rounded down to a power of two.
 */
export function ringEntries(ringBytes: number): number {
  const whole = Math.floor((ringBytes - SRING_HEADER_BYTES) / ENTRY_BYTES);
  if (whole < 1) throw new RangeError(`ring of ${ringBytes} bytes holds no entry`);
  return 2 ** Math.floor(Math.log2(whole));
}

/** Ring bytes for `ring-page-order` `order` (0..4). */
export function ringBytesForOrder(order: number): number {
  if (!Number.isInteger(order) || order < 0 || order > ring_page_order_max) {
    throw new RangeError(`ring-page-order ${order} outside 0..${ring_page_order_max}`);
  }
  return PAGE_BYTES << order;
}
