/**
 * A token bucket for per-disk QoS: `ratePerSecond` tokens refill
 * continuously up to `burst`. A request costing more than the burst passes
 * once the bucket is full (the balance goes negative), so nothing starves.
 * @module
 */

/** IOPS or bytes/s limiter; a rate of 0 means unlimited. */
export class TokenBucket {
  ratePerSecond: number;
  burst: number;
  #tokens: number;
  #lastMs: number;
  readonly #now: () => number;

  constructor(
    ratePerSecond: number,
    burst: number,
    now: () => number = performance.now.bind(performance),
  ) {
    this.ratePerSecond = ratePerSecond;
    this.burst = Math.max(burst, 1);
    this.#tokens = this.burst;
    this.#now = now;
    this.#lastMs = now();
  }

  get unlimited(): boolean {
    return this.ratePerSecond <= 0;
  }

  #refill(): void {
    const now = this.#now();
    this.#tokens = Math.min(
      this.burst,
      this.#tokens + ((now - this.#lastMs) * this.ratePerSecond) / 1000,
    );
    this.#lastMs = now;
  }

  /** Milliseconds until `cost` can be taken (0 = now). */
  waitMs(cost: number): number {
    if (this.unlimited) return 0;
    this.#refill();
    const needed = Math.min(cost, this.burst);
    if (this.#tokens >= needed) return 0;
    return Math.ceil(((needed - this.#tokens) * 1000) / this.ratePerSecond);
  }

  /** Takes `cost` tokens; call only when {@linkcode waitMs} said 0. */
  take(cost: number): void {
    if (!this.unlimited) this.#tokens -= cost;
  }
}
