/**
 * The crash simulator (tests/_helpers/crash_sim.ts) on qcow2: every write
 * I/O of a seeded workload is a crash point, with what no completed flush
 * covers dropped, reordered or torn at 512 bytes. Each crash image passes
 * our check (leaks allowed), reads as the guest model allows (flushed
 * bytes intact, nothing never written visible), recovers on a read-write
 * open without leaks (v3: the dirty bit), and a share of them pass
 * `qemu-img check` and `qemu-img compare` against what we read.
 */
import { runCrashSimulation } from "../../_helpers/crash_sim_run.ts";
import { hasQemu } from "./_util.ts";
import { QCOW2_BACKED, QCOW2_SMALL, QCOW2_V2, QCOW2_V3 } from "./_crash_format.ts";

const points_per_layout = 2500;
const qemu_every = 50;

for (
  const [format, what] of [
    [QCOW2_V3, "v3, 4 KiB clusters"],
    [QCOW2_SMALL, "512-byte clusters, 64-bit refcounts"],
    [QCOW2_V2, "v2, 16 KiB clusters"],
    [QCOW2_BACKED, "over a raw backing file"],
  ] as const
) {
  Deno.test({
    name: `qcow2 crash simulation: every crash point (${what})`,
    ignore: !hasQemu, // qemu-img check judges a share of the points
    fn: async () => {
      await runCrashSimulation(
        format,
        `qcow2 crash sim (${format.name})`,
        points_per_layout,
        qemu_every,
      );
    },
  });
}
