/**
 * Reading and validating one blkif request from the ring, as blkback does
 * before touching memory: every field is checked against the ring device
 * (grefs inside the pool, first_sect <= last_sect <= 7, segment counts) and
 * the disk (range inside it, writes allowed). A bad request becomes an
 * error status, never an exception or an access outside the pool.
 * @module
 */
import * as B from "../ring/blkif.ts";
import { block_status_length_bytes_max, readBlockStatusQuery } from "../ring/block_status.ts";

/** What the disk process does for a request. */
export type RequestKind = "read" | "write" | "flush" | "barrier" | "discard" | "block-status";

/** A request that passed validation. */
export interface ParsedRequest {
  id: bigint;
  /** The `operation` byte, echoed in the response. */
  operation: number;
  kind: RequestKind;
  offsetBytes: number;
  /** Bytes moved; for block status, the length asked about (no data moves). */
  lengthBytes: number;
  /**
   * Pool memory of the segments, adjacent pieces merged; empty for
   * flush/discard; for block status, the one page of query and answer.
   */
  buffers: Uint8Array[];
}

/** A request refused with a status. */
export interface RejectedRequest {
  id: bigint;
  operation: number;
  status: number;
  reason: string;
}

/** What the validator needs to know about the ring device and disk. */
export interface ValidationContext {
  pool: Uint8Array;
  poolPages: number;
  sizeBytes: number;
  readOnly: boolean;
  /** Whether secure discard is supported (it is not, yet). */
  secureDiscard?: boolean;
}

type Result = ParsedRequest | RejectedRequest;

function reject(id: bigint, operation: number, status: number, reason: string): RejectedRequest {
  return { id, operation, status, reason };
}

/** True for a {@linkcode RejectedRequest}. */
export function isRejected(r: Result): r is RejectedRequest {
  return (r as RejectedRequest).status !== undefined;
}

/** Parses the entry at `offset` of `ring`; the ring bytes are read once here. */
export function parseRequest(ring: DataView, offset: number, ctx: ValidationContext): Result {
  const operation = ring.getUint8(offset + B.REQ_OPERATION);
  const id = ring.getBigUint64(offset + B.REQ_ID, true);
  switch (operation) {
    case B.BLKIF_OP_READ:
    case B.BLKIF_OP_WRITE:
    case B.BLKIF_OP_WRITE_BARRIER:
    case B.BLKIF_OP_FLUSH_DISKCACHE:
      return parseDirect(ring, offset, id, operation, ctx);
    case B.BLKIF_OP_DISCARD:
      return parseDiscard(ring, offset, id, ctx);
    case B.BLKIF_OP_INDIRECT:
      return parseIndirect(ring, offset, id, ctx);
    case B.BLKTAP_OP_BLOCK_STATUS:
      return parseBlockStatus(ring, offset, id, ctx);
    default:
      return reject(id, operation, B.BLKIF_RSP_EOPNOTSUPP, `unknown operation ${operation}`);
  }
}

const KIND_OF_OP: Record<number, RequestKind> = {
  [B.BLKIF_OP_READ]: "read",
  [B.BLKIF_OP_WRITE]: "write",
  [B.BLKIF_OP_WRITE_BARRIER]: "barrier",
  [B.BLKIF_OP_FLUSH_DISKCACHE]: "flush",
};

function parseDirect(
  ring: DataView,
  offset: number,
  id: bigint,
  operation: number,
  ctx: ValidationContext,
) {
  const kind = KIND_OF_OP[operation];
  const count = ring.getUint8(offset + B.REQ_NR_SEGMENTS);
  // Flush and barrier may carry no data; reads and writes must carry some.
  const minimum = kind === "read" || kind === "write" ? 1 : 0;
  if (count < minimum || count > B.SEGMENTS_PER_REQUEST_MAX) {
    return reject(id, operation, B.BLKIF_RSP_ERROR, `nr_segments ${count}`);
  }
  const sector = ring.getBigUint64(offset + B.REQ_SECTOR_NUMBER, true);
  const segments: number[] = [];
  for (let i = 0; i < count; i += 1) {
    const at = offset + B.REQ_SEG + i * B.SEGMENT_BYTES;
    segments.push(
      ring.getUint32(at + B.SEG_GREF, true),
      ring.getUint8(at + B.SEG_FIRST_SECT),
      ring.getUint8(at + B.SEG_LAST_SECT),
    );
  }
  return build(id, operation, kind, sector, segments, ctx);
}

function parseIndirect(ring: DataView, offset: number, id: bigint, ctx: ValidationContext): Result {
  const operation = B.BLKIF_OP_INDIRECT;
  const inner = ring.getUint8(offset + B.INDIRECT_OP);
  if (inner !== B.BLKIF_OP_READ && inner !== B.BLKIF_OP_WRITE) {
    return reject(id, operation, B.BLKIF_RSP_EOPNOTSUPP, `indirect_op ${inner}`);
  }
  const count = ring.getUint16(offset + B.INDIRECT_NR_SEGMENTS, true);
  if (count < 1 || count > B.indirect_segments_max) {
    return reject(id, operation, B.BLKIF_RSP_ERROR, `indirect nr_segments ${count}`);
  }
  const pages = Math.ceil(count / B.SEGMENTS_PER_INDIRECT_PAGE);
  const pool = new DataView(ctx.pool.buffer, ctx.pool.byteOffset, ctx.pool.byteLength);
  const segments: number[] = [];
  for (let p = 0; p < pages; p += 1) {
    const gref = ring.getUint32(offset + B.INDIRECT_GREFS + 4 * p, true);
    if (gref >= ctx.poolPages) {
      return reject(id, operation, B.BLKIF_RSP_ERROR, `indirect gref ${gref} outside the pool`);
    }
    const inPage = Math.min(B.SEGMENTS_PER_INDIRECT_PAGE, count - p * B.SEGMENTS_PER_INDIRECT_PAGE);
    for (let i = 0; i < inPage; i += 1) {
      const at = gref * B.PAGE_BYTES + i * B.SEGMENT_BYTES;
      segments.push(
        pool.getUint32(at + B.SEG_GREF, true),
        pool.getUint8(at + B.SEG_FIRST_SECT),
        pool.getUint8(at + B.SEG_LAST_SECT),
      );
    }
  }
  const sector = ring.getBigUint64(offset + B.INDIRECT_SECTOR_NUMBER, true);
  const kind: RequestKind = inner === B.BLKIF_OP_READ ? "read" : "write";
  return build(id, operation, kind, sector, segments, ctx);
}

// `segments` is flat triples (gref, first_sect, last_sect).
function build(
  id: bigint,
  operation: number,
  kind: RequestKind,
  sector: bigint,
  segments: number[],
  ctx: ValidationContext,
): Result {
  const buffers: Uint8Array[] = [];
  let lengthBytes = 0;
  let pieceStart = -1;
  let pieceEnd = -1;
  for (let i = 0; i < segments.length; i += 3) {
    const [gref, first, last] = [segments[i], segments[i + 1], segments[i + 2]];
    if (gref >= ctx.poolPages) {
      return reject(id, operation, B.BLKIF_RSP_ERROR, `gref ${gref} outside the pool`);
    }
    if (first > last || last >= B.SECTORS_PER_PAGE) {
      return reject(id, operation, B.BLKIF_RSP_ERROR, `segment sectors ${first}..${last}`);
    }
    const start = gref * B.PAGE_BYTES + first * B.SECTOR_BYTES;
    const end = gref * B.PAGE_BYTES + (last + 1) * B.SECTOR_BYTES;
    lengthBytes += end - start;
    if (start === pieceEnd) {
      pieceEnd = end;
      continue;
    }
    if (pieceStart >= 0) buffers.push(ctx.pool.subarray(pieceStart, pieceEnd));
    [pieceStart, pieceEnd] = [start, end];
  }
  if (pieceStart >= 0) buffers.push(ctx.pool.subarray(pieceStart, pieceEnd));
  // A flush without data names no sector (blkfront leaves it 0 or stale).
  if (lengthBytes === 0) return { id, operation, kind, offsetBytes: 0, lengthBytes, buffers };
  const range = checkRange(sector, lengthBytes, ctx);
  if (typeof range === "string") return reject(id, operation, B.BLKIF_RSP_ERROR, range);
  if (kind !== "read" && lengthBytes > 0 && ctx.readOnly) {
    return reject(id, operation, B.BLKIF_RSP_ERROR, "write to a read-only disk");
  }
  return { id, operation, kind, offsetBytes: range, lengthBytes, buffers };
}

// Returns the byte offset, or why the range is out of the disk.
function checkRange(sector: bigint, lengthBytes: number, ctx: ValidationContext): number | string {
  const sizeSectors = BigInt(Math.floor(ctx.sizeBytes / B.SECTOR_BYTES));
  if (sector > sizeSectors || sector + BigInt(lengthBytes / B.SECTOR_BYTES) > sizeSectors) {
    return `sectors ${sector}+${lengthBytes / B.SECTOR_BYTES} past the end (${sizeSectors})`;
  }
  return Number(sector) * B.SECTOR_BYTES;
}

function parseDiscard(ring: DataView, offset: number, id: bigint, ctx: ValidationContext): Result {
  const operation = B.BLKIF_OP_DISCARD;
  const flag = ring.getUint8(offset + B.DISCARD_FLAG);
  if (ctx.readOnly) return reject(id, operation, B.BLKIF_RSP_ERROR, "discard on a read-only disk");
  if ((flag & ~B.BLKIF_DISCARD_SECURE) !== 0) {
    return reject(id, operation, B.BLKIF_RSP_ERROR, `discard flag ${flag}`);
  }
  if (flag & B.BLKIF_DISCARD_SECURE && !ctx.secureDiscard) {
    return reject(id, operation, B.BLKIF_RSP_EOPNOTSUPP, "secure discard");
  }
  const sector = ring.getBigUint64(offset + B.DISCARD_SECTOR_NUMBER, true);
  const count = ring.getBigUint64(offset + B.DISCARD_NR_SECTORS, true);
  const sizeSectors = BigInt(Math.floor(ctx.sizeBytes / B.SECTOR_BYTES));
  if (sector > sizeSectors || count > sizeSectors - sector) {
    return reject(id, operation, B.BLKIF_RSP_ERROR, `discard ${sector}+${count} past the end`);
  }
  const offsetBytes = Number(sector) * B.SECTOR_BYTES;
  return {
    id,
    operation,
    kind: "discard",
    offsetBytes,
    lengthBytes: Number(count) * B.SECTOR_BYTES,
    buffers: [],
  };
}

// One segment naming a whole pool page; the length asked about is read from
// that page once, here, and bounded (the front end may change the page
// after we looked: only this copy is used).
function parseBlockStatus(
  ring: DataView,
  offset: number,
  id: bigint,
  ctx: ValidationContext,
): Result {
  const operation = B.BLKTAP_OP_BLOCK_STATUS;
  const count = ring.getUint8(offset + B.REQ_NR_SEGMENTS);
  if (count !== 1) {
    return reject(id, operation, B.BLKIF_RSP_ERROR, `block status nr_segments ${count}`);
  }
  const gref = ring.getUint32(offset + B.REQ_SEG + B.SEG_GREF, true);
  const first = ring.getUint8(offset + B.REQ_SEG + B.SEG_FIRST_SECT);
  const last = ring.getUint8(offset + B.REQ_SEG + B.SEG_LAST_SECT);
  if (gref >= ctx.poolPages) {
    return reject(id, operation, B.BLKIF_RSP_ERROR, `gref ${gref} outside the pool`);
  }
  // The answer may fill the page: the segment must be all of it.
  if (first !== 0 || last !== B.SECTORS_PER_PAGE - 1) {
    return reject(id, operation, B.BLKIF_RSP_ERROR, `block status segment ${first}..${last}`);
  }
  const page = ctx.pool.subarray(gref * B.PAGE_BYTES, (gref + 1) * B.PAGE_BYTES);
  const length = readBlockStatusQuery(page);
  if (length === 0n || length > BigInt(block_status_length_bytes_max)) {
    return reject(id, operation, B.BLKIF_RSP_ERROR, `block status length ${length}`);
  }
  const sector = ring.getBigUint64(offset + B.REQ_SECTOR_NUMBER, true);
  const startBytes = sector * BigInt(B.SECTOR_BYTES);
  // Byte-granular end: a disk whose size is not whole sectors has its tail asked about too.
  if (startBytes + length > BigInt(ctx.sizeBytes)) {
    return reject(
      id,
      operation,
      B.BLKIF_RSP_ERROR,
      `block status ${startBytes}+${length} past the end`,
    );
  }
  const offsetBytes = Number(startBytes);
  const lengthBytes = Number(length);
  return { id, operation, kind: "block-status", offsetBytes, lengthBytes, buffers: [page] };
}
