/**
 * The crash simulator (tests/_helpers/crash_sim.ts) on qcow: every write
 * I/O of a seeded workload is a crash point, with what no completed flush
 * covers dropped, reordered or torn. Each crash image passes our check
 * (QEMU has none for qcow v1), reads as the guest model allows, recovers
 * on a read-write open without leaks, and a share of them QEMU reads as we
 * do (`qemu-img compare`).
 */
import assert from "node:assert/strict";
import { createQcow } from "../../../src/formats/qcow/create.ts";
import { QcowDriver } from "../../../src/formats/qcow/qcow.ts";
import { checkQcowFile } from "../../../src/formats/qcow/check.ts";
import { RawDriver } from "../../../src/formats/raw/raw.ts";
import type { ImageFile } from "../../../src/formats/image_file.ts";
import {
  type CrashFormat,
  type CrashSimResult,
  simulateCrashes,
} from "../../_helpers/crash_sim.ts";
import { MemoryFile } from "../../_helpers/fault_file.ts";
import { testSeed } from "../../_helpers/random.ts";
import { hasQemu, inTempDir } from "./_util.ts";
import { runOk } from "../../_helpers/tools.ts";

const size_bytes = 4 << 20;
const points_per_layout = 5000;
const qemu_every = 50;

/** qcow images made by `create(path, size)`, over an in-memory raw backing file when `backed`. */
export function qcowCrashFormat(
  name: string,
  create: (path: string, sizeBytes: number) => Promise<void>,
  backed: boolean,
): CrashFormat {
  let base: Uint8Array = new Uint8Array(0);
  return {
    name,
    qemuFormat: "qcow",
    async create(path, sizeBytes, rng) {
      base = backed ? rng.bytes(sizeBytes) : new Uint8Array(sizeBytes);
      if (backed) await Deno.writeFile(`${path.slice(0, path.lastIndexOf("/"))}/base.raw`, base);
      await create(path, sizeBytes);
      return base.slice();
    },
    open: (path: string, file: ImageFile, readOnly: boolean) =>
      QcowDriver.open(path, { readOnly }, {
        openFile: () => Promise.resolve(file),
        openBacking: () =>
          Promise.resolve(new RawDriver("aio", new MemoryFile("base.raw", base, false))),
      }),
    check: (_path: string, file: ImageFile) => checkQcowFile(file, { repair: false }),
  };
}

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
  assert.ok(result.guestFlushes > 20 && result.volatileMax > 10, JSON.stringify(result));
  if (hasQemu) {
    assert.ok(result.qemuChecked >= result.points / qemu_every - 1, "QEMU compared its share");
  }
  return result;
}

const blktapLayout = (path: string, sizeBytes: number) => createQcow(path, { sizeBytes });
const backedLayout = (path: string, sizeBytes: number) =>
  createQcow(path, { sizeBytes, backingName: "base.raw" });

Deno.test("qcow crash simulation: every crash point of a blktap-layout image (2 MiB extents)", async () => {
  await simulate(
    qcowCrashFormat("qcow-blktap", blktapLayout, false),
    "qcow crash sim (blktap layout)",
  );
});

Deno.test("qcow crash simulation: every crash point over a backing file (512-byte clusters, COW)", async () => {
  await simulate(qcowCrashFormat("qcow-backed", backedLayout, true), "qcow crash sim (backed)");
});

Deno.test({
  name: "qcow crash simulation: every crash point of an image QEMU created (no Xen header)",
  ignore: !hasQemu,
  fn: async () => {
    const qemuMade = (path: string, sizeBytes: number) =>
      runOk("qemu-img", ["create", "-q", "-f", "qcow", path, String(sizeBytes)]).then(() => {});
    await simulate(
      qcowCrashFormat("qcow-qemu", qemuMade, false),
      "qcow crash sim (QEMU-made)",
      2500,
    );
  },
});
