/**
 * One worker of bench/crash.sh: runs the crash simulator
 * (tests/_helpers/crash_sim.ts) on one format layout, seed after seed,
 * until it checked `--points` crash points; one JSON line per simulation.
 * Exits 1 at the first violation, naming the seed that replays it.
 *
 *   deno run -A bench/crash_run.ts --format qcow-blktap --points 100000 --seed 1
 * @module
 */
import { parseArgs } from "node:util";
import { type CrashFormat, simulateCrashes } from "../tests/_helpers/crash_sim.ts";
import { QCOW_BACKED, QCOW_BLKTAP, QCOW_QEMU } from "../tests/formats/qcow/_crash_format.ts";
import { VMDK_ON_DEMAND, VMDK_PREALLOCATED } from "../tests/formats/vmdk/_crash_format.ts";
import {
  QCOW2_BACKED,
  QCOW2_SMALL,
  QCOW2_V2,
  QCOW2_V3,
} from "../tests/formats/qcow2/_crash_format.ts";
import { VHD_LAYOUTS } from "../tests/formats/vhd/_crash_format.ts";

const LAYOUTS: Record<string, CrashFormat> = {
  "qcow-blktap": QCOW_BLKTAP,
  "qcow-backed": QCOW_BACKED,
  "qcow-qemu": QCOW_QEMU,
  "vmdk-preallocated": VMDK_PREALLOCATED,
  "vmdk-on-demand": VMDK_ON_DEMAND,
  "qcow2-v3": QCOW2_V3,
  "qcow2-small": QCOW2_SMALL,
  "qcow2-v2": QCOW2_V2,
  "qcow2-backed": QCOW2_BACKED,
  ...VHD_LAYOUTS,
};

const { values } = parseArgs({
  options: {
    format: { type: "string" },
    points: { type: "string", default: "100000" },
    seed: { type: "string", default: "1" },
    "points-per-run": { type: "string", default: "5000" },
    "qemu-every": { type: "string", default: "50" },
  },
});
const format = LAYOUTS[values.format ?? ""];
if (!format) {
  console.error(`--format must be one of: ${Object.keys(LAYOUTS).join(", ")}`);
  Deno.exit(2);
}
const target = Number(values.points);
const perRun = Number(values["points-per-run"]);
let done = 0;
for (let seed = Number(values.seed); done < target; seed += 1) {
  const dir = await Deno.makeTempDir({ prefix: "blktap-crash-" });
  try {
    const result = await simulateCrashes(format, {
      seed,
      dir,
      sizeBytes: 4 << 20,
      ios: Math.min(perRun, target - done),
      reopenEvery: 10,
      qemuEvery: Number(values["qemu-every"]),
    });
    done += result.points;
    console.log(JSON.stringify({ format: format.name, seed, ...result }));
  } catch (error) {
    console.error(`${format.name} seed ${seed}: ${(error as Error).message}`);
    Deno.exit(1);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
