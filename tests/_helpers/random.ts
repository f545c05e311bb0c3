/**
 * Seeded randomness for tests: every randomized test prints its seed, and
 * `SEED=n` replays it.
 * @module
 */
import { prng } from "../../src/frontends/exercise/test_frontend.ts";

/** A seeded PRNG (the exercise front end's mulberry32) with helpers. */
export class Random {
  /** Uniform in [0, 1). */
  readonly next: () => number;
  constructor(readonly seed: number) {
    this.next = prng(seed);
  }

  /** Integer in [min, max]. */
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }

  /** One of `items`. */
  pick<T>(items: readonly T[]): T {
    return items[this.int(0, items.length - 1)];
  }

  /** `length` random bytes. */
  bytes(length: number): Uint8Array {
    const out = new Uint8Array(length);
    for (let i = 0; i < length; i += 4) {
      const word = (this.next() * 4294967296) >>> 0;
      out[i] = word;
      if (i + 1 < length) out[i + 1] = word >>> 8;
      if (i + 2 < length) out[i + 2] = word >>> 16;
      if (i + 3 < length) out[i + 3] = word >>> 24;
    }
    return out;
  }
}

/** The seed from `$SEED`, else a fresh one; logged so a failure can be replayed. */
export function testSeed(name: string): Random {
  const fromEnv = Deno.env.get("SEED");
  const seed = fromEnv !== undefined ? Number(fromEnv) : Math.floor(Math.random() * 2 ** 31);
  console.log(`${name}: SEED=${seed}`);
  return new Random(seed);
}
