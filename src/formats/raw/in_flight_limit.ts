/**
 * At most N operations at once, the rest started in arrival order as
 * earlier ones finish (a counting semaphore for promises).
 * @module
 */

/** Runs operations with at most `max` in flight. */
export class InFlightLimit {
  readonly max: number;
  #running = 0;
  readonly #waiting: (() => void)[] = [];

  constructor(max: number) {
    if (!(Number.isInteger(max) && max >= 1)) throw new RangeError(`in-flight limit ${max}`);
    this.max = max;
  }

  /** Operations started and not finished. */
  get running(): number {
    return this.#running;
  }

  /** Runs `operation` once a slot is free; settles as it does. */
  async run<T>(operation: () => Promise<T>): Promise<T> {
    if (this.#running < this.max && this.#waiting.length === 0) this.#running += 1;
    // A finishing operation hands its slot straight to the first waiter.
    else await new Promise<void>((resolve) => this.#waiting.push(resolve));
    try {
      return await operation();
    } finally {
      const next = this.#waiting.shift();
      if (next) next();
      else this.#running -= 1;
    }
  }
}
