/**
 * Exclusive locks on byte ranges. O_DIRECT writes of partial blocks are
 * read-modify-write of whole blocks; two of them touching the same block
 * must not interleave, or one would write back stale bytes of the other.
 * @module
 */

interface Held {
  start: number;
  end: number;
  /** Who waits for this range's release; made only when someone waits (most holds are never contended). */
  waiters: (() => void)[] | undefined;
}

/** A set of held ranges; `acquire` waits until no held range overlaps. */
export class RangeLock {
  #held: Held[] = [];

  /** Waits for `[start, end)` to be free, holds it, returns the release function. */
  async acquire(start: number, end: number): Promise<() => void> {
    for (;;) {
      const release = this.tryAcquire(start, end);
      if (release) return release;
      const blocker = this.#blocker(start, end)!;
      await new Promise<void>((resolve) => (blocker.waiters ??= []).push(resolve));
    }
  }

  /** Holds `[start, end)` at once if it is free (no promise turn); else undefined. */
  tryAcquire(start: number, end: number): (() => void) | undefined {
    if (this.#blocker(start, end)) return undefined;
    const held: Held = { start, end, waiters: undefined };
    this.#held.push(held);
    return () => this.#release(held);
  }

  #release(held: Held): void {
    const list = this.#held;
    const at = list.indexOf(held);
    if (at < 0) return; // released already
    // Order does not matter: any overlapping range blocks.
    const last = list.pop()!;
    if (last !== held) list[at] = last;
    const waiters = held.waiters;
    if (waiters) { for (const wake of waiters) wake(); }
  }

  #blocker(start: number, end: number): Held | undefined {
    return this.#held.find((h) => h.start < end && start < h.end);
  }
}
