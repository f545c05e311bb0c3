/**
 * Writes a disk process acknowledged but has not yet made safe against its
 * own death. A driver with a write-back metadata cache (qcow's L2 tables)
 * acknowledges a write whose mapping lives only in the process until the
 * next flush; if the process is killed, the write is gone although the
 * front end was told it completed. For such disks the front end keeps a
 * copy of each acknowledged write until a flush covers it, and replays the
 * copies into a restarted process before anything else (DESIGN.md §5:
 * clients see latency, not errors - nor lost writes).
 * @module
 */

/** Bytes of unflushed writes kept before ctrl asks for a flush itself. */
export const replay_log_bytes_max = 64 << 20;
/** Writes replayed at once (never two overlapping ones together). */
export const replay_batch_max = 32;

/** One acknowledged write. */
export interface LoggedWrite {
  /** Completion order: a flush issued after completion `seq` covers it. */
  seq: number;
  sector: number;
  data: Uint8Array;
}

/** Acknowledged, not yet flushed writes, in completion order. */
export class ReplayLog {
  #writes: LoggedWrite[] = [];
  #bytes = 0;
  #seq = 0;

  get bytes(): number {
    return this.#bytes;
  }

  get length(): number {
    return this.#writes.length;
  }

  /** Sequence number of the last completion recorded. */
  get lastSeq(): number {
    return this.#seq;
  }

  /** Records a completed write (`data` is copied by the caller). */
  add(sector: number, data: Uint8Array): void {
    this.#seq += 1;
    this.#writes.push({ seq: this.#seq, sector, data });
    this.#bytes += data.byteLength;
  }

  /** A flush issued after completion `seq` succeeded: those writes are safe. */
  trim(seq: number): void {
    let drop = 0;
    while (drop < this.#writes.length && this.#writes[drop].seq <= seq) {
      this.#bytes -= this.#writes[drop].data.byteLength;
      drop += 1;
    }
    this.#writes = this.#writes.slice(drop);
  }

  clear(): void {
    this.trim(this.#seq);
  }

  /**
   * The writes in order, cut into batches whose members do not overlap,
   * so each batch may run concurrently and batches run one after another.
   */
  batches(): LoggedWrite[][] {
    const batches: LoggedWrite[][] = [];
    let batch: LoggedWrite[] = [];
    for (const w of this.#writes) {
      const overlaps = batch.some((b) => _overlap(b, w));
      if (overlaps || batch.length >= replay_batch_max) {
        batches.push(batch);
        batch = [];
      }
      batch.push(w);
    }
    if (batch.length > 0) batches.push(batch);
    return batches;
  }
}

function _overlap(a: LoggedWrite, b: LoggedWrite): boolean {
  const aEnd = a.sector + a.data.byteLength / 512;
  const bEnd = b.sector + b.data.byteLength / 512;
  return a.sector < bEnd && b.sector < aEnd;
}
