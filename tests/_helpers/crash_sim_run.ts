/**
 * One crash simulation as a format's crash_sim_test.ts runs it: a seeded
 * run (`SEED=n` replays) in a temp folder, asserting it reached its crash
 * points with flushes and I/Os in flight, and that QEMU judged its share.
 * @module
 */
import assert from "node:assert/strict";
import { type CrashFormat, type CrashSimResult, simulateCrashes } from "./crash_sim.ts";
import { testSeed } from "./random.ts";
import { hasTool } from "./tools.ts";

/** Runs `points` crash points of `format`; every `qemuEvery`-th goes to QEMU when installed. */
export async function runCrashSimulation(
  format: CrashFormat,
  name: string,
  points: number,
  qemuEvery: number,
): Promise<CrashSimResult> {
  const rng = testSeed(name);
  const qemu = hasTool("qemu-img");
  const dir = await Deno.makeTempDir({ prefix: "blktap-crash-" });
  let result: CrashSimResult;
  try {
    result = await simulateCrashes(format, {
      seed: rng.seed,
      dir,
      sizeBytes: 4 << 20,
      ios: points,
      reopenEvery: 10,
      qemuEvery: qemu ? qemuEvery : 0,
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  console.log(`${name}: ${JSON.stringify(result)}`);
  assert.ok(result.points >= points, `${result.points} crash points`);
  assert.ok(result.guestFlushes >= 5 && result.volatileMax > 10, JSON.stringify(result));
  if (qemu) assert.ok(result.qemuChecked >= result.points / qemuEvery - 1, "QEMU judged its share");
  return result;
}
