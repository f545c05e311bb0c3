/**
 * Exclusive locks on byte ranges. O_DIRECT writes of partial blocks are
 * read-modify-write of whole blocks; two of them touching the same block
 * must not interleave, or one would write back stale bytes of the other.
 * @module
 */

interface Held {
  start: number;
  end: number;
  released: Promise<void>;
  release: () => void;
}

/** A set of held ranges; `acquire` waits until no held range overlaps. */
export class RangeLock {
  #held: Held[] = [];

  /** Waits for `[start, end)` to be free, holds it, returns the release function. */
  async acquire(start: number, end: number): Promise<() => void> {
    for (;;) {
      const release = this.tryAcquire(start, end);
      if (release) return release;
      await this.#blocker(start, end)!.released;
    }
  }

  /** Holds `[start, end)` at once if it is free (no promise turn); else undefined. */
  tryAcquire(start: number, end: number): (() => void) | undefined {
    if (this.#blocker(start, end)) return undefined;
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const held: Held = { start, end, released, release };
    this.#held.push(held);
    return () => {
      this.#held.splice(this.#held.indexOf(held), 1);
      held.release();
    };
  }

  #blocker(start: number, end: number): Held | undefined {
    return this.#held.find((h) => h.start < end && start < h.end);
  }
}
