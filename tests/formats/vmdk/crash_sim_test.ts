/**
 * The crash simulator (tests/_helpers/crash_sim.ts) on vmdk: every write
 * I/O of a seeded workload is a crash point, with what no completed flush
 * covers dropped, reordered or torn. Each crash image passes our check,
 * reads as the guest model allows, recovers on a read-write open without
 * leaks, and a share of them pass `qemu-img check` and read in QEMU as we
 * read them.
 */
import assert from "node:assert/strict";
import { createVmdk, type CreateVmdkOptions } from "../../../src/formats/vmdk/create.ts";
import { openVmdk } from "../../../src/formats/vmdk/vmdk.ts";
import { vmdkCheck } from "../../../src/formats/vmdk/check.ts";
import type { ImageFile } from "../../../src/formats/image_file.ts";
import { type CrashFormat, simulateCrashes } from "../../_helpers/crash_sim.ts";
import { testSeed } from "../../_helpers/random.ts";
import { HAVE_QEMU } from "./_vmdk_helpers.ts";

const size_bytes = 4 << 20;
const points_per_layout = 5000;
const qemu_every = 50;

/** monolithicSparse images made by createVmdk with `options`. */
export function vmdkCrashFormat(name: string, options: CreateVmdkOptions): CrashFormat {
  return {
    name,
    qemuFormat: "vmdk",
    qemuCheck: true,
    create(path, sizeBytes) {
      createVmdk(path, sizeBytes, options);
      return Promise.resolve(new Uint8Array(sizeBytes));
    },
    open: (path: string, file: ImageFile, readOnly: boolean) =>
      openVmdk(path, { readOnly }, () => Promise.resolve(file)),
    check: (path: string, file: ImageFile) =>
      vmdkCheck(path, { repair: false }, () => Promise.resolve(file)),
  };
}

for (
  const [layout, options] of [
    ["preallocated grain tables, 64 KiB grains", { grainBytes: 65536 }],
    ["grain tables allocated on demand, 4 KiB grains", {
      grainBytes: 4096,
      preallocateTables: false,
    }],
  ] as const
) {
  Deno.test(`vmdk crash simulation: every crash point (${layout})`, async () => {
    const rng = testSeed(`vmdk crash sim (${layout})`);
    const dir = await Deno.makeTempDir({ prefix: "vmdk-crash-sim-" });
    try {
      const result = await simulateCrashes(vmdkCrashFormat(`vmdk-${options.grainBytes}`, options), {
        seed: rng.seed,
        dir,
        sizeBytes: size_bytes,
        ios: points_per_layout,
        reopenEvery: 10,
        qemuEvery: HAVE_QEMU ? qemu_every : 0,
      });
      console.log(`vmdk crash sim (${layout}): ${JSON.stringify(result)}`);
      assert.ok(result.points >= points_per_layout, `${result.points} crash points`);
      assert.ok(result.guestFlushes > 20 && result.volatileMax > 10, JSON.stringify(result));
      if (HAVE_QEMU) assert.ok(result.qemuChecked >= result.points / qemu_every - 1);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}
