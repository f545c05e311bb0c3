/**
 * Writing blkif requests into ring entries and segment descriptors into
 * indirect pages, as a front end does. The back end's reading and
 * validation is in src/disk/validate.ts.
 * @module
 */
import {
  BLKIF_OP_DISCARD,
  BLKIF_OP_INDIRECT,
  DISCARD_FLAG,
  DISCARD_HANDLE,
  DISCARD_ID,
  DISCARD_NR_SECTORS,
  DISCARD_SECTOR_NUMBER,
  ENTRY_BYTES,
  INDIRECT_GREFS,
  INDIRECT_HANDLE,
  INDIRECT_ID,
  INDIRECT_NR_SEGMENTS,
  INDIRECT_OP,
  INDIRECT_PAGES_PER_REQUEST_MAX,
  INDIRECT_SECTOR_NUMBER,
  REQ_HANDLE,
  REQ_ID,
  REQ_NR_SEGMENTS,
  REQ_OPERATION,
  REQ_SECTOR_NUMBER,
  REQ_SEG,
  SEG_FIRST_SECT,
  SEG_GREF,
  SEG_LAST_SECT,
  SEGMENT_BYTES,
  SEGMENTS_PER_REQUEST_MAX,
} from "./blkif.ts";

/** One blkif segment: sectors first..last of page `gref` (inclusive). */
export interface Segment {
  gref: number;
  firstSect: number;
  lastSect: number;
}

function clearEntry(view: DataView, offset: number): void {
  for (let i = 0; i < ENTRY_BYTES; i += 8) view.setBigUint64(offset + i, 0n, true);
}

/** Writes one segment descriptor at `offset` (in an entry or an indirect page). */
export function writeSegment(view: DataView, offset: number, segment: Segment): void {
  view.setUint32(offset + SEG_GREF, segment.gref, true);
  view.setUint8(offset + SEG_FIRST_SECT, segment.firstSect);
  view.setUint8(offset + SEG_LAST_SECT, segment.lastSect);
  view.setUint16(offset + SEG_LAST_SECT + 1, 0, true);
}

/** A direct READ/WRITE/WRITE_BARRIER/FLUSH_DISKCACHE request (up to 11 segments). */
export function writeRwRequest(
  view: DataView,
  offset: number,
  request: { operation: number; id: bigint; sector: number; segments: Segment[]; handle?: number },
): void {
  if (request.segments.length > SEGMENTS_PER_REQUEST_MAX) {
    throw new RangeError(`${request.segments.length} segments > ${SEGMENTS_PER_REQUEST_MAX}`);
  }
  clearEntry(view, offset);
  view.setUint8(offset + REQ_OPERATION, request.operation);
  view.setUint8(offset + REQ_NR_SEGMENTS, request.segments.length);
  view.setUint16(offset + REQ_HANDLE, request.handle ?? 0, true);
  view.setBigUint64(offset + REQ_ID, request.id, true);
  view.setBigUint64(offset + REQ_SECTOR_NUMBER, BigInt(request.sector), true);
  request.segments.forEach((s, i) => writeSegment(view, offset + REQ_SEG + i * SEGMENT_BYTES, s));
}

/** A DISCARD request. */
export function writeDiscardRequest(
  view: DataView,
  offset: number,
  request: { id: bigint; sector: number; nrSectors: number; flag?: number; handle?: number },
): void {
  clearEntry(view, offset);
  view.setUint8(offset, BLKIF_OP_DISCARD);
  view.setUint8(offset + DISCARD_FLAG, request.flag ?? 0);
  view.setUint16(offset + DISCARD_HANDLE, request.handle ?? 0, true);
  view.setBigUint64(offset + DISCARD_ID, request.id, true);
  view.setBigUint64(offset + DISCARD_SECTOR_NUMBER, BigInt(request.sector), true);
  view.setBigUint64(offset + DISCARD_NR_SECTORS, BigInt(request.nrSectors), true);
}

/**
 * An INDIRECT request; the segment descriptors are already in the pages
 * named by `indirectGrefs` (512 per page).
 */
export function writeIndirectRequest(
  view: DataView,
  offset: number,
  request: {
    indirectOp: number;
    id: bigint;
    sector: number;
    nrSegments: number;
    indirectGrefs: number[];
    handle?: number;
  },
): void {
  if (request.indirectGrefs.length > INDIRECT_PAGES_PER_REQUEST_MAX) {
    throw new RangeError(`${request.indirectGrefs.length} indirect pages`);
  }
  clearEntry(view, offset);
  view.setUint8(offset, BLKIF_OP_INDIRECT);
  view.setUint8(offset + INDIRECT_OP, request.indirectOp);
  view.setUint16(offset + INDIRECT_NR_SEGMENTS, request.nrSegments, true);
  view.setBigUint64(offset + INDIRECT_ID, request.id, true);
  view.setBigUint64(offset + INDIRECT_SECTOR_NUMBER, BigInt(request.sector), true);
  view.setUint16(offset + INDIRECT_HANDLE, request.handle ?? 0, true);
  request.indirectGrefs.forEach((g, i) => view.setUint32(offset + INDIRECT_GREFS + 4 * i, g, true));
}

/** Sectors covered by `segments`. */
export function segmentSectors(segments: Segment[]): number {
  let n = 0;
  for (const s of segments) n += s.lastSect - s.firstSect + 1;
  return n;
}
