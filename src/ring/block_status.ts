/**
 * The data page of a {@linkcode BLKTAP_OP_BLOCK_STATUS} request (a blktap
 * extension of blkif): the one codec both ends use.
 *
 *   [0, 8)    u64 query_length_bytes  front end -> back end; the back end
 *                                      never writes it, so a request
 *                                      re-issued after a disk-process
 *                                      restart reads the same query
 *   [8, 12)   u32 extent_count        back end -> front end, 1..capacity
 *   [12, 16)  u32 reserved (0)
 *   [16, ...) extent_count x { u64 offset_bytes, u64 length_bytes,
 *                              u32 flags (bit 0 hole, bit 1 zero) }
 *
 * The request's sector_number is the first sector asked about; the answer
 * starts there and its extents are consecutive. It may cover less than
 * asked (at most {@linkcode block_status_extents_per_page_max} extents fit
 * in the page): the front end asks again from where it stopped, as NBD
 * allows short block-status replies. Little-endian, like the ring.
 * @module
 */
import type { Extent } from "../formats/driver.ts";
import { BLKTAP_OP_BLOCK_STATUS, PAGE_BYTES, SECTOR_BYTES } from "./blkif.ts";
import { writeRwRequest } from "./request.ts";

const QUERY_LENGTH = 0;
const REPLY_COUNT = 8;
const REPLY_EXTENTS = 16;
const EXTENT_OFFSET = 0;
const EXTENT_LENGTH = 8;
const EXTENT_FLAGS = 16;
/** Bytes of one encoded extent. */
export const block_status_extent_bytes = 20;
/** Extents one page holds: (4096 - 16) / 20 = 204. */
export const block_status_extents_per_page_max = Math.floor(
  (PAGE_BYTES - REPLY_EXTENTS) / block_status_extent_bytes,
);
/**
 * Longest range one request may ask about: what one NBD BLOCK_STATUS can
 * ask (u32 length), and a bound on the driver work behind one request.
 */
export const block_status_length_bytes_max = 2 ** 32;

/** Extent flag: not allocated (NBD_STATE_HOLE). */
export const BLOCK_STATUS_FLAG_HOLE = 1;
/** Extent flag: reads as zeros (NBD_STATE_ZERO). */
export const BLOCK_STATUS_FLAG_ZERO = 2;
const FLAGS_KNOWN = BLOCK_STATUS_FLAG_HOLE | BLOCK_STATUS_FLAG_ZERO;

function pageView(page: Uint8Array): DataView {
  if (page.byteLength < PAGE_BYTES) throw new RangeError(`page of ${page.byteLength} bytes`);
  return new DataView(page.buffer, page.byteOffset, PAGE_BYTES);
}

/** A BLOCK_STATUS ring entry: whole page `gref`, asking from `sector`. */
export function writeBlockStatusRequest(
  view: DataView,
  offset: number,
  request: { id: bigint; sector: number; gref: number },
): void {
  writeRwRequest(view, offset, {
    operation: BLKTAP_OP_BLOCK_STATUS,
    id: request.id,
    sector: request.sector,
    segments: [{ gref: request.gref, firstSect: 0, lastSect: PAGE_BYTES / SECTOR_BYTES - 1 }],
  });
}

/** Front end: asks about `lengthBytes` from the request's sector. */
export function writeBlockStatusQuery(page: Uint8Array, lengthBytes: number): void {
  if (!Number.isSafeInteger(lengthBytes) || lengthBytes <= 0) {
    throw new RangeError(`block status length ${lengthBytes}`);
  }
  if (lengthBytes > block_status_length_bytes_max) {
    throw new RangeError(`block status length ${lengthBytes} > ${block_status_length_bytes_max}`);
  }
  pageView(page).setBigUint64(QUERY_LENGTH, BigInt(lengthBytes), true);
}

/** Back end: the query length as written (unchecked: the validator bounds it). */
export function readBlockStatusQuery(page: Uint8Array): bigint {
  return pageView(page).getBigUint64(QUERY_LENGTH, true);
}

/**
 * Back end: writes the answer for `[startBytes, startBytes+lengthBytes)`
 * from a driver's extents (clipped to the range, neighbours with equal
 * flags merged, at most a page's worth). Returns the bytes it covers;
 * throws if the extents do not start at `startBytes` (a driver bug must
 * not reach the front end as an answer).
 */
export function encodeBlockStatusReply(
  page: Uint8Array,
  extents: Extent[],
  startBytes: number,
  lengthBytes: number,
): number {
  const view = pageView(page);
  const end = startBytes + lengthBytes;
  let count = 0;
  let position = startBytes;
  let lastFlags = -1;
  for (const e of extents) {
    if (position >= end) break;
    const stop = Math.min(e.offsetBytes + e.lengthBytes, end);
    if (e.offsetBytes > position) break; // a gap: the answer stops where coverage stops
    if (stop <= position) continue;
    const flags = (e.hole ? BLOCK_STATUS_FLAG_HOLE : 0) | (e.zero ? BLOCK_STATUS_FLAG_ZERO : 0);
    if (flags === lastFlags) {
      const at = REPLY_EXTENTS + (count - 1) * block_status_extent_bytes;
      view.setBigUint64(at + EXTENT_LENGTH, BigInt(stop - _extentStart(view, at)), true);
    } else {
      if (count === block_status_extents_per_page_max) break;
      _putExtent(view, count, position, stop - position, flags);
      count += 1;
      lastFlags = flags;
    }
    position = stop;
  }
  if (count === 0) throw new RangeError(`block status: no extent at ${startBytes}`);
  view.setUint32(REPLY_COUNT, count, true);
  view.setUint32(REPLY_COUNT + 4, 0, true);
  return position - startBytes;
}

function _extentStart(view: DataView, at: number): number {
  return Number(view.getBigUint64(at + EXTENT_OFFSET, true));
}

function _putExtent(
  view: DataView,
  index: number,
  offsetBytes: number,
  lengthBytes: number,
  flags: number,
): void {
  const at = REPLY_EXTENTS + index * block_status_extent_bytes;
  view.setBigUint64(at + EXTENT_OFFSET, BigInt(offsetBytes), true);
  view.setBigUint64(at + EXTENT_LENGTH, BigInt(lengthBytes), true);
  view.setUint32(at + EXTENT_FLAGS, flags, true);
}

/**
 * Front end: reads the answer to a query for `[startBytes,
 * startBytes+lengthBytes)`. Checks what the back end wrote before trusting
 * it: a count inside the page, extents consecutive from `startBytes`,
 * non-empty, inside the range, known flags. Throws a RangeError otherwise.
 */
export function decodeBlockStatusReply(
  page: Uint8Array,
  startBytes: number,
  lengthBytes: number,
): Extent[] {
  const view = pageView(page);
  const count = view.getUint32(REPLY_COUNT, true);
  if (count < 1 || count > block_status_extents_per_page_max) {
    throw new RangeError(`block status reply: ${count} extents`);
  }
  const end = startBytes + lengthBytes;
  const extents: Extent[] = [];
  let position = startBytes;
  for (let i = 0; i < count; i += 1) {
    const at = REPLY_EXTENTS + i * block_status_extent_bytes;
    const offsetBytes = view.getBigUint64(at + EXTENT_OFFSET, true);
    const extentBytes = view.getBigUint64(at + EXTENT_LENGTH, true);
    const flags = view.getUint32(at + EXTENT_FLAGS, true);
    if (offsetBytes !== BigInt(position) || extentBytes === 0n) {
      throw new RangeError(`block status reply: extent ${i} at ${offsetBytes}+${extentBytes}`);
    }
    if (extentBytes > BigInt(end - position) || (flags & ~FLAGS_KNOWN) !== 0) {
      throw new RangeError(`block status reply: extent ${i} length ${extentBytes} flags ${flags}`);
    }
    const hole = (flags & BLOCK_STATUS_FLAG_HOLE) !== 0;
    const zero = (flags & BLOCK_STATUS_FLAG_ZERO) !== 0;
    extents.push({ offsetBytes: position, lengthBytes: Number(extentBytes), hole, zero });
    position += Number(extentBytes);
  }
  return extents;
}
