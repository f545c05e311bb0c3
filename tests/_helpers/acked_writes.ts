/**
 * SIGKILL tests of format drivers: a writer process writes seeded batches
 * and logs every write the driver *answered*; the test kills it at a
 * random moment, rebuilds from the same seed what the writer did, and
 * requires every logged (answered) write to read back — flushed or not
 * (src/formats/driver.ts, `write`: a killed process loses nothing it
 * answered). Writes of the batch in flight that are not logged may or may
 * not be there.
 *
 * Log lines: `ready`, then `w B I` once write I of batch B was answered,
 * `f B` once the flush after batch B returned.
 * @module
 */
import assert from "node:assert/strict";
import type { BlockDriver } from "../../src/formats/driver.ts";
import type { Random } from "./random.ts";
import { Random as Rng } from "./random.ts";

/** A random write: sizes from 1 byte to 200 KiB, aligned or not, often straddling clusters. */
export function randomWrite(rng: Random, diskBytes: number): [number, number] {
  const kind = rng.next();
  let length: number;
  let offset: number;
  if (kind < 0.3) {
    length = rng.int(1, 16) * 4096;
    offset = rng.int(0, Math.floor((diskBytes - length) / 4096)) * 4096;
  } else if (kind < 0.5) {
    length = rng.int(1, 16) * 512;
    offset = rng.int(0, Math.floor((diskBytes - length) / 512)) * 512;
  } else {
    length = rng.int(1, rng.pick([100, 700, 5000, 70_000, 200_000]));
    offset = rng.int(0, diskBytes - length);
  }
  return [offset, length];
}

/** Fill for a write: mostly random bytes, sometimes zeros (tests zero elision). */
export function writeData(rng: Random, length: number): Uint8Array {
  return rng.next() < 0.15 ? new Uint8Array(length) : rng.bytes(length);
}

/**
 * One batch: up to 8 writes with disjoint ranges, issued together.
 * Deterministic in `rng`, so a verifier can replay what a writer did.
 */
export function crashBatch(rng: Random, diskBytes: number): [number, Uint8Array][] {
  const count = rng.int(1, 8);
  const writes: [number, Uint8Array][] = [];
  for (let i = 0; i < count; i += 1) {
    let [offset, length] = randomWrite(rng, diskBytes);
    while (writes.some(([o, d]) => offset < o + d.byteLength && o < offset + length)) {
      [offset, length] = randomWrite(rng, diskBytes);
    }
    writes.push([offset, writeData(rng, length)]);
  }
  return writes;
}

/**
 * The writer's side: batches from `seed` through `driver`, a flush after
 * every `flushEvery` batches, each answer logged with `log` (synchronous,
 * so a line is in the file before the next step).
 */
export async function writeLoggedBatches(
  driver: BlockDriver,
  seed: number,
  log: (line: string) => void,
  flushEvery: number,
  batchesMax = Infinity,
): Promise<void> {
  const rng = new Rng(seed);
  log("ready");
  for (let b = 0; b < batchesMax; b += 1) {
    const writes = crashBatch(rng, driver.sizeBytes);
    await Promise.all(writes.map(async ([offset, data], i) => {
      await driver.write(offset, data);
      log(`w ${b} ${i}`);
    }));
    if ((b + 1) % flushEvery === 0) {
      await driver.flush();
      log(`f ${b}`);
    }
  }
}

/** What the disk must hold after a kill. */
export interface AfterKill {
  /** The disk as the answered writes left it (over `base`). */
  model: Uint8Array;
  /** 1 where a write not known to be answered may have landed (or not). */
  ambiguous: Uint8Array;
  /** Writes known to be answered. */
  answered: number;
  /** Of those, written after the last logged flush. */
  answeredUnflushed: number;
}

/** Replays the writer's batches from `seed` against its log. */
export function afterKill(base: Uint8Array, seed: number, logText: string): AfterKill {
  const lines = logText.trim().split("\n").slice(1);
  const acked = new Set(lines.filter((l) => l.startsWith("w ")).map((l) => l.slice(2)));
  const flushes = lines.filter((l) => l.startsWith("f ")).map((l) => Number(l.slice(2)));
  const lastFlushed = flushes.length > 0 ? flushes[flushes.length - 1] : -1;
  const batches = lines.reduce((n, l) => Math.max(n, Number(l.split(" ")[1]) + 1), 0);
  const rng = new Rng(seed);
  const model = base.slice();
  const ambiguous = new Uint8Array(base.byteLength);
  let answered = 0;
  let answeredUnflushed = 0;
  // One batch past the last logged one may have started too.
  for (let b = 0; b <= batches; b += 1) {
    crashBatch(rng, base.byteLength).forEach(([offset, data], i) => {
      if (acked.has(`${b} ${i}`)) {
        model.set(data, offset);
        answered += 1;
        if (b > lastFlushed) answeredUnflushed += 1;
      } else ambiguous.fill(1, offset, offset + data.byteLength);
    });
  }
  return { model, ambiguous, answered, answeredUnflushed };
}

/** Asserts `got` equals the model wherever no unanswered write may have landed. */
export function assertAnsweredWrites(got: Uint8Array, expected: AfterKill, what: string): void {
  for (let i = 0; i < got.byteLength; i += 1) {
    if (expected.ambiguous[i] === 0 && got[i] !== expected.model[i]) {
      assert.fail(`${what}: byte ${i} is ${got[i]}, an answered write left ${expected.model[i]}`);
    }
  }
}
