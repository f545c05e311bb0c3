/**
 * Malformed blkif requests for fuzzing a disk process: each entry is a
 * plausible request with exactly one field out of range (the validator's
 * whole list: unknown operation, segment counts, grefs outside the pool,
 * first_sect > last_sect or > 7, ranges past the end, bad indirect,
 * discard and block-status fields), plus random bytes elsewhere. Every one must be answered
 * with the expected error status and must not touch the disk.
 * @module
 */
import * as B from "../../ring/blkif.ts";
import { writeSegment } from "../../ring/request.ts";
import { block_status_length_bytes_max, writeBlockStatusQuery } from "../../ring/block_status.ts";
import type { RingDisk } from "../../ring/ring_disk.ts";

/** The fields a malformed request breaks. */
export const MALFORMATIONS = [
  "unknown-operation",
  "zero-segments",
  "too-many-segments",
  "gref-outside-pool",
  "first-after-last",
  "last-sect-over-7",
  "range-past-end",
  "sector-huge",
  "indirect-bad-op",
  "indirect-zero-segments",
  "indirect-too-many-segments",
  "indirect-gref-outside-pool",
  "indirect-bad-segment",
  "discard-past-end",
  "discard-secure",
  "discard-bad-flag",
  "status-segments",
  "status-gref-outside-pool",
  "status-partial-page",
  "status-zero-length",
  "status-too-long",
  "status-past-end",
] as const;

export type Malformation = typeof MALFORMATIONS[number];

/** One malformed entry and the status it must get. */
export interface MalformedEntry {
  kind: Malformation;
  entry: Uint8Array;
  expectedStatus: number;
}

/** What the generator needs to know about the target. */
export interface MalformedContext {
  poolPages: number;
  sizeSectors: number;
  pool: Uint8Array;
}

/** Builds malformed entries from a random source in [0, 1). */
export class MalformedGenerator {
  readonly #random: () => number;
  readonly #ctx: MalformedContext;

  constructor(random: () => number, ctx: MalformedContext) {
    this.#random = random;
    this.#ctx = ctx;
  }

  #int(lo: number, hi: number): number {
    return lo + Math.floor(this.#random() * (hi - lo + 1));
  }

  #validSegment(): { gref: number; firstSect: number; lastSect: number } {
    const firstSect = this.#int(0, 7);
    return {
      gref: this.#int(0, this.#ctx.poolPages - 1),
      firstSect,
      lastSect: this.#int(firstSect, 7),
    };
  }

  /**
   * One malformed entry (the id field is the submitter's to set).
   * `scratchPage` is a pool page owned by the caller until the answer
   * arrives: indirect entries put their descriptors there.
   */
  next(scratchPage: number): MalformedEntry {
    const kind = MALFORMATIONS[this.#int(0, MALFORMATIONS.length - 1)];
    const entry = new Uint8Array(B.ENTRY_BYTES);
    for (let i = 0; i < entry.length; i += 1) entry[i] = this.#int(0, 255);
    const view = new DataView(entry.buffer);
    const expectedStatus = this.#break(kind, view, scratchPage);
    return { kind, entry, expectedStatus };
  }

  // Writes a request valid in every field but the one `kind` names.
  #break(kind: Malformation, v: DataView, scratchPage: number): number {
    if (kind === "unknown-operation") {
      v.setUint8(0, this.#unknownOperation());
      return B.BLKIF_RSP_EOPNOTSUPP;
    }
    if (kind.startsWith("status")) return this.#breakBlockStatus(kind, v, scratchPage);
    if (kind.startsWith("indirect")) return this.#breakIndirect(kind, v, scratchPage);
    if (kind.startsWith("discard")) return this.#breakDiscard(kind, v);
    const op = this.#int(B.BLKIF_OP_READ, B.BLKIF_OP_WRITE);
    const segments = Array.from(
      { length: this.#int(1, B.SEGMENTS_PER_REQUEST_MAX) },
      () => this.#validSegment(),
    );
    const victim = segments[this.#int(0, segments.length - 1)];
    let count = segments.length;
    if (kind === "zero-segments") count = 0;
    if (kind === "too-many-segments") count = this.#int(B.SEGMENTS_PER_REQUEST_MAX + 1, 255);
    if (kind === "gref-outside-pool") victim.gref = this.#int(this.#ctx.poolPages, 0xffffffff);
    if (kind === "first-after-last") [victim.firstSect, victim.lastSect] = [this.#int(1, 7), 0];
    if (kind === "last-sect-over-7") victim.lastSect = this.#int(8, 255);
    const sectors = segments.reduce((n, s) => n + s.lastSect - s.firstSect + 1, 0);
    let sector = this.#int(0, Math.max(0, this.#ctx.sizeSectors - 88));
    if (kind === "range-past-end") {
      sector = this.#int(this.#ctx.sizeSectors - sectors + 1, this.#ctx.sizeSectors + 8);
    }
    v.setUint8(B.REQ_OPERATION, op);
    v.setUint8(B.REQ_NR_SEGMENTS, count);
    if (kind === "sector-huge") {
      v.setBigUint64(
        B.REQ_SECTOR_NUMBER,
        BigInt(this.#ctx.sizeSectors) + BigInt(this.#int(1, 2 ** 31)) * 2n ** 32n,
        true,
      );
    } else {
      v.setBigUint64(B.REQ_SECTOR_NUMBER, BigInt(sector), true);
    }
    segments.forEach((s, i) => writeSegment(v, B.REQ_SEG + i * B.SEGMENT_BYTES, s));
    return B.BLKIF_RSP_ERROR;
  }

  #breakIndirect(kind: Malformation, v: DataView, page: number): number {
    const count = this.#int(1, B.indirect_segments_max);
    const pool = new DataView(
      this.#ctx.pool.buffer,
      this.#ctx.pool.byteOffset,
      this.#ctx.pool.byteLength,
    );
    const segments = Array.from({ length: count }, () => this.#validSegment());
    if (kind === "indirect-bad-segment") {
      const victim = segments[this.#int(0, count - 1)];
      if (this.#random() < 0.5) victim.lastSect = this.#int(8, 255);
      else victim.gref = this.#int(this.#ctx.poolPages, 0xffffffff);
    }
    segments.forEach((s, i) => writeSegment(pool, page * B.PAGE_BYTES + i * B.SEGMENT_BYTES, s));
    v.setUint8(0, B.BLKIF_OP_INDIRECT);
    v.setUint8(B.INDIRECT_OP, this.#int(0, 1));
    v.setUint16(B.INDIRECT_NR_SEGMENTS, count, true);
    v.setBigUint64(B.INDIRECT_SECTOR_NUMBER, 0n, true);
    v.setUint32(B.INDIRECT_GREFS, page, true);
    if (kind === "indirect-bad-op") {
      v.setUint8(B.INDIRECT_OP, this.#int(2, 255));
      return B.BLKIF_RSP_EOPNOTSUPP;
    }
    if (kind === "indirect-zero-segments") v.setUint16(B.INDIRECT_NR_SEGMENTS, 0, true);
    if (kind === "indirect-too-many-segments") {
      v.setUint16(B.INDIRECT_NR_SEGMENTS, this.#int(B.indirect_segments_max + 1, 0xffff), true);
    }
    if (kind === "indirect-gref-outside-pool") {
      v.setUint32(B.INDIRECT_GREFS, this.#int(this.#ctx.poolPages, 0xffffffff), true);
    }
    return B.BLKIF_RSP_ERROR;
  }

  // Xen's reserved number, or anything above Xen's range but blktap's own.
  #unknownOperation(): number {
    if (this.#random() < 0.2) return B.BLKIF_OP_RESERVED_1;
    const op = this.#int(B.BLKIF_OP_INDIRECT + 1, 254);
    return op >= B.BLKTAP_OP_BLOCK_STATUS ? op + 1 : op;
  }

  // The query goes into the caller's scratch page, whole-page segment.
  #breakBlockStatus(kind: Malformation, v: DataView, page: number): number {
    const size = this.#ctx.sizeSectors;
    const sector = this.#int(0, size - 1);
    let length = this.#int(1, (size - sector) * B.SECTOR_BYTES);
    const segment = { gref: page, firstSect: 0, lastSect: B.SECTORS_PER_PAGE - 1 };
    let count = 1;
    if (kind === "status-segments") count = this.#random() < 0.5 ? 0 : this.#int(2, 255);
    if (kind === "status-gref-outside-pool") {
      segment.gref = this.#int(this.#ctx.poolPages, 0xffffffff);
    }
    if (kind === "status-partial-page") {
      if (this.#random() < 0.5) segment.firstSect = this.#int(1, 7);
      else segment.lastSect = this.#int(0, 6);
    }
    if (kind === "status-past-end") length = (size - sector) * B.SECTOR_BYTES + this.#int(1, 4096);
    const query = this.#ctx.pool.subarray(page * B.PAGE_BYTES, (page + 1) * B.PAGE_BYTES);
    const queryView = new DataView(query.buffer, query.byteOffset, B.PAGE_BYTES);
    if (kind === "status-zero-length") queryView.setBigUint64(0, 0n, true);
    else if (kind === "status-too-long") {
      const over = BigInt(this.#int(1, 2 ** 31)) * (this.#random() < 0.5 ? 1n : 2n ** 32n);
      queryView.setBigUint64(0, BigInt(block_status_length_bytes_max) + over, true);
    } else writeBlockStatusQuery(query, length);
    v.setUint8(B.REQ_OPERATION, B.BLKTAP_OP_BLOCK_STATUS);
    v.setUint8(B.REQ_NR_SEGMENTS, count);
    v.setBigUint64(B.REQ_SECTOR_NUMBER, BigInt(sector), true);
    writeSegment(v, B.REQ_SEG, segment);
    return B.BLKIF_RSP_ERROR;
  }

  #breakDiscard(kind: Malformation, v: DataView): number {
    const size = this.#ctx.sizeSectors;
    v.setUint8(0, B.BLKIF_OP_DISCARD);
    v.setUint8(B.DISCARD_FLAG, 0);
    const sector = this.#int(0, size - 1);
    v.setBigUint64(B.DISCARD_SECTOR_NUMBER, BigInt(sector), true);
    v.setBigUint64(B.DISCARD_NR_SECTORS, BigInt(this.#int(0, size - sector)), true);
    if (kind === "discard-past-end") {
      v.setBigUint64(B.DISCARD_NR_SECTORS, BigInt(size - sector + this.#int(1, 2 ** 31)), true);
      if (this.#random() < 0.3) v.setBigUint64(B.DISCARD_SECTOR_NUMBER, 2n ** 64n - 1n, true);
      return B.BLKIF_RSP_ERROR;
    }
    if (kind === "discard-secure") {
      v.setUint8(B.DISCARD_FLAG, B.BLKIF_DISCARD_SECURE);
      return B.BLKIF_RSP_EOPNOTSUPP;
    }
    v.setUint8(B.DISCARD_FLAG, this.#int(1, 127) << 1);
    return B.BLKIF_RSP_ERROR;
  }
}

/** Result of a fuzz run. */
export interface FuzzResult {
  entries: number;
  /** Entries answered with a status other than the expected error. */
  wrongStatus: number;
  /** Entries answered OKAY (the worst kind of wrong). */
  acceptedMalformed: number;
  byKind: Record<string, number>;
  firstWrong?: string;
}

/**
 * A malformed entry not answered within this long fails the run: the
 * validator answers at once, so waiting longer means a hang, and a fuzz
 * run must fail on a hang rather than stall.
 */
export const fuzz_case_timeout_ms_default = 15_000;

/**
 * Submits `entries` malformed requests, `depth` at a time. Rejects, naming
 * the entry, when one is not answered within `caseTimeoutMs`.
 */
export async function fuzzRing(
  disk: RingDisk,
  entries: number,
  depth: number,
  random: () => number,
  caseTimeoutMs = fuzz_case_timeout_ms_default,
): Promise<FuzzResult> {
  const generator = new MalformedGenerator(random, {
    poolPages: disk.pages.pages,
    sizeSectors: Math.floor(disk.sizeBytes / B.SECTOR_BYTES),
    pool: disk.pool,
  });
  const result: FuzzResult = { entries: 0, wrongStatus: 0, acceptedMalformed: 0, byKind: {} };
  // What each worker waits for, and since when: the watchdog's view.
  const pending: ({ number: number; kind: Malformation; sinceMs: number } | undefined)[] = [];
  let left = entries;
  const worker = async (slot: number) => {
    const scratchPage = await disk.pages.allocateWait(1);
    try {
      while (left > 0) {
        const m = generator.next(scratchPage);
        pending[slot] = { number: entries - left, kind: m.kind, sinceMs: performance.now() };
        left -= 1;
        await submitOne(disk, m, result);
        pending[slot] = undefined;
      }
    } finally {
      disk.pages.release(scratchPage, 1);
    }
  };
  const hang = Promise.withResolvers<never>();
  const watchdog = setInterval(() => {
    const now = performance.now();
    const stuck = pending.find((p) => p && now - p.sinceMs > caseTimeoutMs);
    if (stuck) {
      hang.reject(
        new Error(
          `malformed entry ${stuck.number} (${stuck.kind}) unanswered after ${caseTimeoutMs} ms`,
        ),
      );
    }
  }, Math.min(1000, caseTimeoutMs));
  try {
    const workers = Array.from({ length: depth }, (_, slot) => worker(slot));
    await Promise.race([Promise.all(workers), hang.promise]);
  } finally {
    clearInterval(watchdog);
  }
  return result;
}

async function submitOne(disk: RingDisk, m: MalformedEntry, result: FuzzResult): Promise<void> {
  const status = await disk.producer.submitRaw(m.entry);
  result.entries += 1;
  result.byKind[m.kind] = (result.byKind[m.kind] ?? 0) + 1;
  if (status !== m.expectedStatus) {
    result.wrongStatus += 1;
    if (status === B.BLKIF_RSP_OKAY) result.acceptedMalformed += 1;
    result.firstWrong ??= `${m.kind}: status ${status}, expected ${m.expectedStatus}`;
  }
}
