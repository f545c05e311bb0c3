/**
 * Group-committed fdatasync: the barrier between dependent groups of
 * writes (data and refcounts before the L2 entry that uses them). Callers
 * ask for "an fdatasync that started after my writes completed"; one runs
 * at a time, and every caller arriving while it runs shares the next one,
 * so many writes in flight pay for one barrier (QEMU's qcow2 cache
 * dependencies have the same effect).
 * @module
 */

/** A barrier that runs `flush` for waiting callers in groups. */
export class GroupSync {
  readonly #flush: () => Promise<void>;
  #running?: Promise<void>;
  #next?: Promise<void>;
  #afterNext: (() => void)[] = [];
  /** Barriers completed (for tests and stats). */
  completed = 0;

  constructor(flush: () => Promise<void>) {
    this.#flush = flush;
  }

  /** Resolves after an fdatasync that started after this call. */
  sync(): Promise<void> {
    if (!this.#running) return this.#start();
    this.#next ??= this.#running.catch(() => {}).then(() => {
      this.#next = undefined;
      return this.#start();
    });
    return this.#next;
  }

  /**
   * Runs `action` once a barrier that starts after this call completes,
   * without forcing one (deferred frees ride on the next natural barrier).
   */
  afterNextSync(action: () => void): void {
    this.#afterNext.push(action);
  }

  /** Actions waiting for a barrier. */
  get pendingActions(): number {
    return this.#afterNext.length;
  }

  #start(): Promise<void> {
    const actions = this.#afterNext;
    this.#afterNext = [];
    const run = this.#flush().then(() => {
      this.completed += 1;
      for (const action of actions) action();
    }, (error) => {
      this.#afterNext.unshift(...actions); // not covered: wait for the next one
      throw error;
    });
    this.#running = run;
    run.catch(() => {}).then(() => {
      if (this.#running === run) this.#running = undefined;
    });
    return run;
  }
}
