/**
 * Block status asked of a disk process over its ring (blktap's
 * BLOCK_STATUS operation, src/ring/block_status.ts): a query may need
 * several requests, each answering up to a page of extents from where the
 * last stopped, and a disk process without block status answers
 * EOPNOTSUPP (everything is data then).
 * @module
 */
import * as B from "./blkif.ts";
import { BlockError, type Extent } from "../formats/driver.ts";
import { throwForStatus } from "./ring_producer.ts";
import {
  block_status_length_bytes_max,
  decodeBlockStatusReply,
  writeBlockStatusQuery,
} from "./block_status.ts";

/**
 * Ring requests one `blockStatus` call makes at most (each answers up to a
 * page of extents); past that it answers short, as NBD allows.
 */
export const block_status_requests_per_call_max = 8;

/** One BLOCK_STATUS request and the page that carries its query and answer. */
export interface BlockStatusAsker {
  /** The pool page `gref` as bytes. */
  page: Uint8Array;
  /** Issues the request for `sector` with the query in `page`; resolves to its status. */
  submit(sector: number): Promise<number>;
  /** Name for error messages. */
  path: string;
}

/** The disk process has no block status (EOPNOTSUPP): callers report all data. */
export class BlockStatusUnsupported extends Error {}

/**
 * Asks again from where each answer stopped, up to a bound; the result is
 * non-empty and consecutive from `offsetBytes`, possibly short.
 * Throws {@linkcode BlockStatusUnsupported} when the first answer is EOPNOTSUPP.
 */
export async function blockStatusRounds(
  asker: BlockStatusAsker,
  offsetBytes: number,
  end: number,
): Promise<Extent[]> {
  const extents: Extent[] = [];
  let position = offsetBytes;
  for (let round = 0; round < block_status_requests_per_call_max && position < end; round++) {
    const answer = await _blockStatusOnce(asker, position, end);
    // No answer (EOPNOTSUPP), or one ending inside the sector before
    // `position`: "data" is always a true answer, up to the next sector.
    const reached = answer ? _appendFrom(extents, answer, position) : position;
    if (reached > position) {
      position = reached;
      continue;
    }
    if (!answer && round === 0) throw new BlockStatusUnsupported();
    const stop = answer ? Math.min(end, _nextSector(position)) : end;
    const data = { offsetBytes: position, lengthBytes: stop - position };
    _appendFrom(extents, [{ ...data, hole: false, zero: false }], position);
    position = stop;
  }
  if (extents.length === 0 || extents[0].offsetBytes !== offsetBytes) {
    throw new Error(`${asker.path}: block status arithmetic at ${offsetBytes}`);
  }
  return extents;
}

// One BLOCK_STATUS request for [position, end) from the sector holding
// `position`; undefined when the disk process has no block status.
async function _blockStatusOnce(
  asker: BlockStatusAsker,
  position: number,
  end: number,
): Promise<Extent[] | undefined> {
  const start = position - (position % B.SECTOR_BYTES);
  const length = Math.min(end - start, block_status_length_bytes_max);
  writeBlockStatusQuery(asker.page, length);
  const status = await asker.submit(start / B.SECTOR_BYTES);
  if (status === B.BLKIF_RSP_EOPNOTSUPP) return undefined;
  throwForStatus(status, "block status", asker.path);
  try {
    return decodeBlockStatusReply(asker.page, start, length);
  } catch (error) {
    throw new BlockError("EIO", `${asker.path}: ${(error as Error).message}`);
  }
}

// Appends `answer` clipped to start at `position` (merging equal
// neighbours); returns where the extents now end.
function _appendFrom(extents: Extent[], answer: Extent[], position: number): number {
  for (const e of answer) {
    const start = Math.max(e.offsetBytes, position);
    const stop = e.offsetBytes + e.lengthBytes;
    if (stop <= start) continue;
    const last = extents[extents.length - 1];
    if (last && last.offsetBytes + last.lengthBytes !== start) {
      throw new Error(`block status: extent at ${start} after one ending elsewhere`);
    }
    const piece = { offsetBytes: start, lengthBytes: stop - start, hole: e.hole, zero: e.zero };
    if (last && last.hole === e.hole && last.zero === e.zero) {
      last.lengthBytes = stop - last.offsetBytes;
    } else extents.push(piece);
    position = stop;
  }
  return position;
}

function _nextSector(offsetBytes: number): number {
  return (Math.floor(offsetBytes / B.SECTOR_BYTES) + 1) * B.SECTOR_BYTES;
}
