/**
 * The crash simulator (tests/_helpers/crash_sim.ts) on vmdk: every write
 * I/O of a seeded workload is a crash point, with what no completed flush
 * covers dropped, reordered or torn. Each crash image passes our check,
 * reads as the guest model allows, recovers on a read-write open without
 * leaks, and a share of them pass `qemu-img check` and read in QEMU as we
 * read them.
 */
import assert from "node:assert/strict";
import { simulateCrashes } from "../../_helpers/crash_sim.ts";
import { VMDK_ON_DEMAND, VMDK_PREALLOCATED } from "./_crash_format.ts";
import { testSeed } from "../../_helpers/random.ts";
import { HAVE_QEMU } from "./_vmdk_helpers.ts";

const size_bytes = 4 << 20;
const points_per_layout = 5000;
const qemu_every = 50;

for (
  const [layout, format] of [
    ["preallocated grain tables, 64 KiB grains", VMDK_PREALLOCATED],
    ["grain tables allocated on demand, 4 KiB grains", VMDK_ON_DEMAND],
  ] as const
) {
  Deno.test(`vmdk crash simulation: every crash point (${layout})`, async () => {
    const rng = testSeed(`vmdk crash sim (${layout})`);
    const dir = await Deno.makeTempDir({ prefix: "vmdk-crash-sim-" });
    try {
      const result = await simulateCrashes(format, {
        seed: rng.seed,
        dir,
        sizeBytes: size_bytes,
        ios: points_per_layout,
        reopenEvery: 10,
        qemuEvery: HAVE_QEMU ? qemu_every : 0,
      });
      console.log(`vmdk crash sim (${layout}): ${JSON.stringify(result)}`);
      assert.ok(result.points >= points_per_layout, `${result.points} crash points`);
      assert.ok(result.guestFlushes >= 5 && result.volatileMax > 10, JSON.stringify(result));
      if (HAVE_QEMU) assert.ok(result.qemuChecked >= result.points / qemu_every - 1);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}
