/**
 * Per-disk counters exposed to ctrl (`blktap stats`): operations, bytes,
 * errors and a latency histogram with power-of-two microsecond buckets.
 * @module
 */
import type { RequestKind } from "./validate.ts";

/** Buckets: [0,1) µs, [1,2), [2,4), ... up to 2^30 µs. */
export const latency_buckets = 32;

/** Counters as sent to ctrl. */
export interface DiskStats {
  ops: Record<RequestKind, number>;
  bytesRead: number;
  bytesWritten: number;
  /** Requests answered with an error status (invalid ones included). */
  errors: number;
  /** Requests refused by validation. */
  invalid: number;
  inflight: number;
  /** Count per bucket; bucket i holds latencies in [2^(i-1), 2^i) µs. */
  latencyHistogram: number[];
  latencyUsP50: number;
  latencyUsP99: number;
}

/** Accumulates counters as requests complete. */
export class DiskCounters {
  readonly ops: Record<RequestKind, number> = {
    read: 0,
    write: 0,
    flush: 0,
    barrier: 0,
    discard: 0,
    "block-status": 0,
  };
  bytesRead = 0;
  bytesWritten = 0;
  errors = 0;
  invalid = 0;
  readonly histogram: number[] = new Array(latency_buckets).fill(0);

  /** Records one completed request. */
  complete(kind: RequestKind, lengthBytes: number, latencyUs: number, ok: boolean): void {
    this.ops[kind] += 1;
    if (!ok) this.errors += 1;
    else if (kind === "read") this.bytesRead += lengthBytes;
    else if (kind === "write" || kind === "barrier" || kind === "flush") {
      this.bytesWritten += lengthBytes;
    }
    const bucket = latencyUs < 1
      ? 0
      : Math.min(latency_buckets - 1, Math.floor(Math.log2(latencyUs)) + 1);
    this.histogram[bucket] += 1;
  }

  rejected(): void {
    this.invalid += 1;
    this.errors += 1;
  }

  /** Upper bound (µs) of the bucket holding the `q` quantile. */
  quantileUs(q: number): number {
    const total = this.histogram.reduce((a, b) => a + b, 0);
    if (total === 0) return 0;
    let seen = 0;
    for (let i = 0; i < latency_buckets; i += 1) {
      seen += this.histogram[i];
      if (seen >= q * total) return 2 ** i;
    }
    return 2 ** latency_buckets;
  }

  snapshot(inflight: number): DiskStats {
    return {
      ops: { ...this.ops },
      bytesRead: this.bytesRead,
      bytesWritten: this.bytesWritten,
      errors: this.errors,
      invalid: this.invalid,
      inflight,
      latencyHistogram: [...this.histogram],
      latencyUsP50: this.quantileUs(0.5),
      latencyUsP99: this.quantileUs(0.99),
    };
  }
}
