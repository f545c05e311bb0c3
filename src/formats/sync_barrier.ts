/**
 * Group commit for ordering barriers: writers that need "everything I wrote
 * so far is durable before my next write" share one fdatasync. A call
 * resolves after an fdatasync that *started* after the call, so it covers
 * every write the caller completed before calling; while one runs, all
 * callers arriving meanwhile share the next one.
 * @module
 */

/** One file's barrier. */
export class SyncBarrier {
  readonly #sync: () => Promise<void>;
  #running?: Promise<void>;
  #queued?: Promise<void>;
  /** fdatasyncs issued (tests and benchmarks read it). */
  count = 0;

  /** `sync` makes every completed write durable (the file's `flush`). */
  constructor(sync: () => Promise<void>) {
    this.#sync = sync;
  }

  /** Resolves once an fdatasync started after this call has completed. */
  wait(): Promise<void> {
    if (this.#queued) return this.#queued;
    if (!this.#running) return this.#start();
    const queued = this.#running.catch(() => {}).then(() => {
      this.#queued = undefined;
      return this.#start();
    });
    this.#queued = queued;
    return queued;
  }

  #start(): Promise<void> {
    this.count += 1;
    const run: Promise<void> = this.#sync().finally(() => {
      if (this.#running === run) this.#running = undefined;
    });
    this.#running = run;
    return run;
  }
}
