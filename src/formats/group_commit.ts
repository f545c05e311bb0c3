/**
 * Group commit: one run of a task serves every caller that asked for it
 * before the run started. The format drivers use it for the barrier
 * between data and the metadata that points at it (one fdatasync shared by
 * every allocating write in flight) and for table write-outs (one write of
 * a table block carries every entry changed before it started).
 * @module
 */

/**
 * Runs `task` on demand. Each call resolves with a run that *starts after
 * the call*; calls arriving while a run is queued (not yet started) share
 * it. Runs never overlap. A failed run rejects the calls it served; the
 * next call starts a new run.
 */
export class GroupCommit {
  readonly #task: () => Promise<void>;
  #queued: Promise<void> | undefined;
  #tail: Promise<void> = Promise.resolve();
  /** Runs started (for tests and counters). */
  runs = 0;

  constructor(task: () => Promise<void>) {
    this.#task = task;
  }

  /** A run of the task that starts after this call. */
  run(): Promise<void> {
    if (this.#queued) return this.#queued;
    const next = this.#tail.then(() => {
      this.#queued = undefined;
      this.runs += 1;
      return this.#task();
    });
    this.#queued = next;
    this.#tail = next.catch(() => {});
    return next;
  }

  /** Resolves when no run is queued or running (errors are the callers'). */
  idle(): Promise<void> {
    return this.#tail;
  }
}

/**
 * A file's fdatasync as a group commit: `sync()` returns once everything
 * written before it is durable; many writes in flight pay for one barrier.
 */
export class GroupSync {
  readonly #commit: GroupCommit;
  #afterNext: (() => void)[] = [];

  constructor(flush: () => Promise<void>) {
    this.#commit = new GroupCommit(async () => {
      const actions = this.#afterNext;
      this.#afterNext = [];
      try {
        await flush();
      } catch (error) {
        this.#afterNext.unshift(...actions); // not covered: wait for the next one
        throw error;
      }
      for (const action of actions) action();
    });
  }

  /** Durable: every write that completed before this call. */
  sync(): Promise<void> {
    return this.#commit.run();
  }

  /**
   * Runs `action` once a barrier that starts after this call completes,
   * without forcing one (qcow2's deferred frees ride on the next natural
   * barrier).
   */
  afterNextSync(action: () => void): void {
    this.#afterNext.push(action);
  }

  /** fdatasync calls made so far. */
  get syncs(): number {
    return this.#commit.runs;
  }
}
