/**
 * The crash simulator (tests/_helpers/crash_sim.ts) on qcow: every write
 * I/O of a seeded workload is a crash point, with what no completed flush
 * covers dropped, reordered or torn. Each crash image passes our check
 * (QEMU has none for qcow v1), reads as the guest model allows, recovers
 * on a read-write open without leaks, and a share of them QEMU reads as we
 * do (`qemu-img compare`).
 */
import assert from "node:assert/strict";
import {
  type CrashFormat,
  type CrashSimResult,
  simulateCrashes,
} from "../../_helpers/crash_sim.ts";
import { testSeed } from "../../_helpers/random.ts";
import { hasQemu, inTempDir } from "./_util.ts";
import { QCOW_BACKED, QCOW_BLKTAP, QCOW_QEMU } from "./_crash_format.ts";

const size_bytes = 4 << 20;
const points_per_layout = 5000;
const qemu_every = 50;

async function simulate(
  format: CrashFormat,
  name: string,
  points = points_per_layout,
): Promise<CrashSimResult> {
  const rng = testSeed(name);
  let result!: CrashSimResult;
  await inTempDir(async (dir) => {
    result = await simulateCrashes(format, {
      seed: rng.seed,
      dir,
      sizeBytes: size_bytes,
      ios: points,
      reopenEvery: 10,
      qemuEvery: hasQemu ? qemu_every : 0,
    });
  });
  console.log(`${name}: ${JSON.stringify(result)}`);
  assert.ok(result.points >= points, `${result.points} crash points`);
  assert.ok(result.guestFlushes >= 5 && result.volatileMax > 10, JSON.stringify(result));
  if (hasQemu) {
    assert.ok(result.qemuChecked >= result.points / qemu_every - 1, "QEMU compared its share");
  }
  return result;
}

Deno.test("qcow crash simulation: every crash point of a blktap-layout image (2 MiB extents)", async () => {
  await simulate(QCOW_BLKTAP, "qcow crash sim (blktap layout)");
});

Deno.test("qcow crash simulation: every crash point over a backing file (512-byte clusters, COW)", async () => {
  await simulate(QCOW_BACKED, "qcow crash sim (backed)");
});

Deno.test({
  name: "qcow crash simulation: every crash point of an image QEMU created (no Xen header)",
  ignore: !hasQemu,
  fn: async () => {
    await simulate(QCOW_QEMU, "qcow crash sim (QEMU-made)", 2500);
  },
});
