/**
 * Per-disk counters (`blktap stats`): operations, bytes, errors and a
 * latency histogram with power-of-two microsecond buckets.
 *
 * The counters live in a fixed array of cells ({@linkcode counter_cells}
 * doubles holding integers, exact up to 2^53) that may be shared memory: a
 * disk process counts straight into its minor's stats file
 * (`stats_file.ts`), so what it counted survives it being SIGKILLed, and
 * ctrl adds a dead process's counts into the totals since create
 * ({@linkcode addTotals}).
 * @module
 */
import type { RequestKind } from "./validate.ts";

/** Buckets: [0,1) µs, [1,2), [2,4), ... up to 2^30 µs. */
export const latency_buckets = 32;

/** Request kinds in cell order. */
export const REQUEST_KINDS: readonly RequestKind[] = [
  "read",
  "write",
  "flush",
  "barrier",
  "discard",
  "block-status",
];

const KIND_CELL = Object.fromEntries(REQUEST_KINDS.map((k, i) => [k, i])) as Record<
  RequestKind,
  number
>;

// Cell indexes: one per kind, then bytes, errors, invalid, the gauge of
// requests in flight, then the histogram.
const cell_bytes_read = REQUEST_KINDS.length;
const cell_bytes_written = cell_bytes_read + 1;
const cell_errors = cell_bytes_read + 2;
const cell_invalid = cell_bytes_read + 3;
const cell_inflight = cell_bytes_read + 4;
const cell_histogram = cell_bytes_read + 5;

/** Cells a counter set occupies (the stats file's layout depends on it: append only). */
export const counter_cells = cell_histogram + latency_buckets;

/** Counts that add up across disk processes (what ctrl keeps since create). */
export interface CounterTotals {
  ops: Record<RequestKind, number>;
  bytesRead: number;
  bytesWritten: number;
  /** Requests answered with an error status (invalid ones included). */
  errors: number;
  /** Requests refused by validation. */
  invalid: number;
  /** Count per bucket; bucket i holds latencies in [2^(i-1), 2^i) µs. */
  latencyHistogram: number[];
}

/** Counters as shown: totals plus what is derived or live. */
export interface DiskStats extends CounterTotals {
  /** Requests running now (0 for a disk process that is gone). */
  inflight: number;
  latencyUsP50: number;
  latencyUsP99: number;
}

/** Totals of nothing. */
export function emptyTotals(): CounterTotals {
  return {
    ops: Object.fromEntries(REQUEST_KINDS.map((k) => [k, 0])) as Record<RequestKind, number>,
    bytesRead: 0,
    bytesWritten: 0,
    errors: 0,
    invalid: 0,
    latencyHistogram: new Array(latency_buckets).fill(0),
  };
}

/** `a + b`, field by field (a dead disk process's counts folded into the totals). */
export function addTotals(a: CounterTotals, b: CounterTotals): CounterTotals {
  const sum = emptyTotals();
  for (const k of REQUEST_KINDS) sum.ops[k] = (a.ops[k] ?? 0) + (b.ops[k] ?? 0);
  sum.bytesRead = a.bytesRead + b.bytesRead;
  sum.bytesWritten = a.bytesWritten + b.bytesWritten;
  sum.errors = a.errors + b.errors;
  sum.invalid = a.invalid + b.invalid;
  for (let i = 0; i < latency_buckets; i += 1) {
    sum.latencyHistogram[i] = (a.latencyHistogram[i] ?? 0) + (b.latencyHistogram[i] ?? 0);
  }
  return sum;
}

/** Upper bound (µs) of the bucket holding the `q` quantile of `histogram`. */
export function quantileUs(histogram: readonly number[], q: number): number {
  const total = histogram.reduce((a, b) => a + b, 0);
  if (total === 0) return 0;
  let seen = 0;
  for (let i = 0; i < latency_buckets; i += 1) {
    seen += histogram[i];
    if (seen >= q * total) return 2 ** i;
  }
  return 2 ** latency_buckets;
}

/** Totals shown with their quantiles and the in-flight gauge. */
export function withDerived(totals: CounterTotals, inflight: number): DiskStats {
  return {
    ...totals,
    inflight,
    latencyUsP50: quantileUs(totals.latencyHistogram, 0.5),
    latencyUsP99: quantileUs(totals.latencyHistogram, 0.99),
  };
}

/** Accumulates counters as requests complete, in `cells` (private memory by default). */
export class DiskCounters {
  readonly #cells: Float64Array;

  constructor(cells: Float64Array = new Float64Array(counter_cells)) {
    if (cells.length < counter_cells) {
      throw new RangeError(`counters need ${counter_cells} cells, got ${cells.length}`);
    }
    this.#cells = cells;
  }

  /** Records one completed request. */
  complete(kind: RequestKind, lengthBytes: number, latencyUs: number, ok: boolean): void {
    const c = this.#cells;
    c[KIND_CELL[kind]] += 1;
    if (!ok) c[cell_errors] += 1;
    else if (kind === "read") c[cell_bytes_read] += lengthBytes;
    else if (kind === "write" || kind === "barrier" || kind === "flush") {
      c[cell_bytes_written] += lengthBytes;
    }
    const bucket = latencyUs < 1
      ? 0
      : Math.min(latency_buckets - 1, Math.floor(Math.log2(latencyUs)) + 1);
    c[cell_histogram + bucket] += 1;
  }

  /** Records one request refused by validation. */
  rejected(): void {
    this.#cells[cell_invalid] += 1;
    this.#cells[cell_errors] += 1;
  }

  /** Requests running now (a gauge the disk process keeps current). */
  get inflight(): number {
    return this.#cells[cell_inflight];
  }

  set inflight(count: number) {
    this.#cells[cell_inflight] = count;
  }

  /** The counts so far. */
  totals(): CounterTotals {
    const c = this.#cells;
    const totals = emptyTotals();
    REQUEST_KINDS.forEach((k, i) => (totals.ops[k] = c[i]));
    totals.bytesRead = c[cell_bytes_read];
    totals.bytesWritten = c[cell_bytes_written];
    totals.errors = c[cell_errors];
    totals.invalid = c[cell_invalid];
    totals.latencyHistogram = Array.from(c.subarray(cell_histogram, counter_cells));
    return totals;
  }

  /** Counts, quantiles and the gauge. */
  snapshot(): DiskStats {
    return withDerived(this.totals(), this.inflight);
  }

  /** Zeroes every cell (a new disk process starts counting). */
  reset(): void {
    this.#cells.fill(0, 0, counter_cells);
  }
}
