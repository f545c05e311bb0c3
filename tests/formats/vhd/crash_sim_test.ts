/**
 * The crash simulator (tests/_helpers/crash_sim.ts) on vhd: every write
 * I/O of a seeded workload is a crash point, with what no completed flush
 * covers dropped, reordered or torn. Each crash image passes our check
 * (QEMU has none for vpc), reads as the guest model allows, recovers on a
 * read-write open without leaks, and for dynamic and fixed images a share
 * of them QEMU reads as we do (`qemu-img compare`; QEMU cannot open
 * differencing VHDs).
 */
import assert from "node:assert/strict";
import { type CrashFormat, simulateCrashes } from "../../_helpers/crash_sim.ts";
import { testSeed } from "../../_helpers/random.ts";
import { hasQemu, inTempDir } from "../qcow/_util.ts";
import {
  VHD_DIFF_RAW,
  VHD_DIFF_VHD,
  VHD_DYNAMIC,
  VHD_DYNAMIC_SMALL,
  VHD_FIXED,
} from "./_crash_format.ts";

const size_bytes = 4 << 20;
const qemu_every = 50;

/** Layouts and their crash points: 11,000 in all, most where allocations are frequent. */
const layouts: [string, CrashFormat, number][] = [
  ["dynamic, 8 KiB blocks", VHD_DYNAMIC_SMALL, 3500],
  ["differencing over raw, 32 KiB blocks", VHD_DIFF_RAW, 3500],
  ["differencing over a dynamic VHD, 16 KiB blocks", VHD_DIFF_VHD, 2000],
  ["dynamic, 2 MiB blocks", VHD_DYNAMIC, 1000],
  ["fixed", VHD_FIXED, 1000],
];

for (const [layout, format, points] of layouts) {
  Deno.test(`vhd crash simulation: every crash point (${layout})`, async () => {
    const rng = testSeed(`vhd crash sim (${layout})`);
    await inTempDir(async (dir) => {
      const qemu = hasQemu && format.qemuFormat !== undefined;
      const result = await simulateCrashes(format, {
        seed: rng.seed,
        dir,
        sizeBytes: size_bytes,
        ios: points,
        reopenEvery: 10,
        qemuEvery: qemu ? qemu_every : 0,
      });
      console.log(`vhd crash sim (${layout}): ${JSON.stringify(result)}`);
      assert.ok(result.points >= points, `${result.points} crash points`);
      assert.ok(result.guestFlushes >= 5 && result.volatileMax > 10, JSON.stringify(result));
      if (qemu) assert.ok(result.qemuChecked >= result.points / qemu_every - 1);
    });
  });
}

// The assertions above on guest flushes hold for every seed: the workload
// makes them even when no random draw asks for one.
Deno.test("crash simulation: the workload flushes whatever its random draws", async () => {
  await inTempDir(async (dir) => {
    const result = await simulateCrashes(VHD_FIXED, {
      seed: 1,
      dir,
      sizeBytes: size_bytes,
      ios: 300,
      flushShare: 0,
      reopenEvery: 0,
      qemuEvery: 0,
    });
    assert.ok(result.guestFlushes >= 5, JSON.stringify(result));
  });
});
