/**
 * Allocation of a ring device's data pages: runs of contiguous pages (so a
 * request's buffer is one piece of memory, one iovec, and O_DIRECT-aligned)
 * found first-fit from a rotating cursor.
 * @module
 */

/** A free-page map for `pages` pages. */
export class PagePool {
  readonly pages: number;
  readonly #used: Uint8Array;
  #free: number;
  #cursor = 0;
  #waiters: (() => void)[] = [];

  constructor(pages: number) {
    this.pages = pages;
    this.#used = new Uint8Array(pages);
    this.#free = pages;
  }

  get freePages(): number {
    return this.#free;
  }

  /** First page of `count` contiguous free pages, now used; undefined if none. */
  allocate(count: number): number | undefined {
    if (count < 1 || count > this.pages) {
      throw new RangeError(`allocate ${count} of ${this.pages} pages`);
    }
    if (count > this.#free) return undefined;
    let run = 0;
    for (let scanned = 0; scanned < this.pages + count; scanned += 1) {
      const page = (this.#cursor + scanned) % this.pages;
      if (page === 0) run = 0; // runs do not wrap around the end of the pool
      run = this.#used[page] ? 0 : run + 1;
      if (run === count) {
        const first = page - count + 1;
        this.#used.fill(1, first, first + count);
        this.#free -= count;
        this.#cursor = (page + 1) % this.pages;
        return first;
      }
    }
    return undefined;
  }

  /** Waits until `count` contiguous pages can be had, then takes them. */
  async allocateWait(count: number): Promise<number> {
    for (;;) {
      const first = this.allocate(count);
      if (first !== undefined) return first;
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
  }

  /** Gives back `count` pages from `first`. */
  release(first: number, count: number): void {
    for (let p = first; p < first + count; p += 1) {
      if (!this.#used[p]) throw new Error(`page ${p} freed twice`);
      this.#used[p] = 0;
    }
    this.#free += count;
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w();
  }
}
