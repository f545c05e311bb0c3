/**
 * The crash simulator (tests/_helpers/crash_sim.ts) on qcow: every write
 * I/O of a seeded workload is a crash point, with what no completed flush
 * covers dropped, reordered or torn. Each crash image passes our check
 * (QEMU has none for qcow v1), reads as the guest model allows, recovers
 * on a read-write open without leaks, and a share of them QEMU reads as we
 * do (`qemu-img compare`).
 */
import { runCrashSimulation } from "../../_helpers/crash_sim_run.ts";
import { hasQemu } from "./_util.ts";
import { QCOW_BACKED, QCOW_BLKTAP, QCOW_QEMU } from "./_crash_format.ts";

const points_per_layout = 5000;
const qemu_every = 50;

Deno.test("qcow crash simulation: every crash point of a blktap-layout image (2 MiB extents)", async () => {
  await runCrashSimulation(
    QCOW_BLKTAP,
    "qcow crash sim (blktap layout)",
    points_per_layout,
    qemu_every,
  );
});

Deno.test("qcow crash simulation: every crash point over a backing file (512-byte clusters, COW)", async () => {
  await runCrashSimulation(QCOW_BACKED, "qcow crash sim (backed)", points_per_layout, qemu_every);
});

Deno.test({
  name: "qcow crash simulation: every crash point of an image QEMU created (no Xen header)",
  ignore: !hasQemu,
  fn: async () => {
    await runCrashSimulation(QCOW_QEMU, "qcow crash sim (QEMU-made)", 2500, qemu_every);
  },
});
