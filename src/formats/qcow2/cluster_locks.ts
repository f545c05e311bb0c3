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
  released: Promise<void>;
  release: () => void;
  granted: boolean;
}

/** The lock table (ranges are `[first, end)` cluster indexes). */
export class ClusterLocks {
  #holders: Holder[] = [];

  /** Waits until `[first, end)` can be held in the given mode; returns the release. */
  async acquire(first: number, end: number, exclusive: boolean): Promise<() => void> {
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const me: Holder = { first, end, exclusive, released, release, granted: false };
    for (;;) {
      const blocker = this.#blocker(me);
      if (!blocker) break;
      if (!this.#holders.includes(me)) this.#holders.push(me); // queued: visible to shared requests
      await blocker.released;
    }
    if (!this.#holders.includes(me)) this.#holders.push(me);
    me.granted = true;
    return () => {
      const at = this.#holders.indexOf(me);
      if (at >= 0) this.#holders.splice(at, 1);
      me.release();
    };
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
