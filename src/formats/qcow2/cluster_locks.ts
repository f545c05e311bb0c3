/**
 * Shared and exclusive locks on ranges of guest clusters. Reads and
 * in-place writes of allocated clusters share a range; anything that
 * changes a cluster's mapping (allocation, copy-on-write, zeroing,
 * discard, compressed writes) holds it exclusively, so no request can use
 * a host offset the mapping change is about to free, and no cluster is
 * allocated twice. Requests to different clusters never wait for each
 * other. Waiting exclusive requests hold back new shared ones on their
 * range, so a stream of reads cannot starve a write.
 * @module
 */

interface Holder {
  first: number;
  end: number;
  exclusive: boolean;
  granted: boolean;
  /** Who waits for this holder to go (made only when someone does). */
  waiters?: (() => void)[];
}

/** The lock table (ranges are `[first, end)` cluster indexes). */
export class ClusterLocks {
  #holders: Holder[] = [];
  /** Exclusive holders and waiters: while there are none, shared locks are granted at once. */
  #exclusives = 0;

  /** A shared lock granted at once when nothing exclusive is held or waited for; else undefined. */
  tryShared(first: number, end: number): (() => void) | undefined {
    if (this.#exclusives > 0) return undefined;
    const me: Holder = { first, end, exclusive: false, granted: true };
    this.#holders.push(me);
    return () => this.#release(me);
  }

  /** Waits until `[first, end)` can be held in the given mode; returns the release. */
  async acquire(first: number, end: number, exclusive: boolean): Promise<() => void> {
    const me: Holder = { first, end, exclusive, granted: false };
    if (exclusive) this.#exclusives += 1;
    for (;;) {
      const blocker = this.#blocker(me);
      if (!blocker) break;
      if (!this.#holders.includes(me)) this.#holders.push(me); // queued: visible to shared requests
      await new Promise<void>((resolve) => (blocker.waiters ??= []).push(resolve));
    }
    if (!this.#holders.includes(me)) this.#holders.push(me);
    me.granted = true;
    return () => this.#release(me);
  }

  #release(me: Holder): void {
    const at = this.#holders.indexOf(me);
    if (at < 0) return;
    this.#holders.splice(at, 1);
    if (me.exclusive) this.#exclusives -= 1;
    for (const wake of me.waiters ?? []) wake();
  }

  #blocker(me: Holder): Holder | undefined {
    for (const h of this.#holders) {
      if (h === me || h.first >= me.end || me.first >= h.end) continue;
      if (me.exclusive) {
        // Granted holders block; queued exclusive ones ahead of us too (FIFO among writers).
        if (h.granted || (h.exclusive && this.#holders.indexOf(h) < this.#holders.indexOf(me))) {
          return h;
        }
        if (h.exclusive && !this.#holders.includes(me)) return h;
      } else if (h.exclusive) {
        return h; // granted or waiting exclusive: shared requests wait behind it
      }
    }
    return undefined;
  }

  /** Ranges held or waited for (for tests). */
  get size(): number {
    return this.#holders.length;
  }
}
