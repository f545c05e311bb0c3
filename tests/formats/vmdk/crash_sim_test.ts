/**
 * The crash simulator (tests/_helpers/crash_sim.ts) on vmdk: every write
 * I/O of a seeded workload is a crash point, with what no completed flush
 * covers dropped, reordered or torn. Each crash image passes our check,
 * reads as the guest model allows, recovers on a read-write open without
 * leaks, and a share of them pass `qemu-img check` and read in QEMU as we
 * read them.
 */
import { runCrashSimulation } from "../../_helpers/crash_sim_run.ts";
import { VMDK_ON_DEMAND, VMDK_PREALLOCATED } from "./_crash_format.ts";

const points_per_layout = 5000;
const qemu_every = 50;

for (
  const [layout, format] of [
    ["preallocated grain tables, 64 KiB grains", VMDK_PREALLOCATED],
    ["grain tables allocated on demand, 4 KiB grains", VMDK_ON_DEMAND],
  ] as const
) {
  Deno.test(`vmdk crash simulation: every crash point (${layout})`, async () => {
    await runCrashSimulation(format, `vmdk crash sim (${layout})`, points_per_layout, qemu_every);
  });
}
