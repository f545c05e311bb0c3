/**
 * Power loss: the vhd driver over a fault-injecting file layer (unflushed
 * writes dropped, applied or torn at 512-byte sectors, in any order). At
 * random I/O points of a seeded workload (concurrent writes, some
 * unaligned, zeros, flushes) we take the image a crash could leave; on
 * every one our check finds no corruption (leaks allowed), the image opens,
 * every write completed before the last completed flush reads back, and no
 * byte shows anything that was never written there.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import type { OpenContext } from "../../../src/formats/format_entry.ts";
import { createVhd } from "../../../src/formats/vhd/create.ts";
import { checkVhdFile } from "../../../src/formats/vhd/check.ts";
import { readVhdImage } from "../../../src/formats/vhd/image.ts";
import { DynamicVhdDriver } from "../../../src/formats/vhd/vhd.ts";
import { testSeed } from "../../_helpers/random.ts";
import { FaultFile } from "../../_helpers/fault_file.ts";
import { inTempDir } from "../qcow/_util.ts";
import {
  assertCrashConsistent,
  createChild,
  readAll,
  type Unflushed,
  vhdData,
  vhdWrite,
} from "./_vhd_util.ts";

const size_bytes = 2 << 20;
const block_bytes = 32 << 10;
const batches = 400;
const crash_points_per_run = 1000;
/** Every n-th crash image is also opened read-write, as the next writer would. */
const reopen_every = 10;

interface CrashPoint {
  image: Uint8Array;
  state: Unflushed;
}

async function makeImage(dir: string, differencing: boolean, parent: Uint8Array): Promise<string> {
  const path = `${dir}/disk.vhd`;
  if (!differencing) {
    await createVhd(path, {
      sizeBytes: size_bytes,
      subformat: "dynamic",
      blockBytes: block_bytes,
      forceSize: true,
    });
    return path;
  }
  await Deno.writeFile(`${dir}/parent.raw`, parent);
  await createChild(path, "parent.raw", "raw", block_bytes);
  return path;
}

for (const differencing of [false, true]) {
  const kind = differencing ? "differencing over raw" : "dynamic";
  Deno.test(`vhd power loss: every crash image is consistent (${kind})`, async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed(`vhd-power-loss-${differencing}`);
      const parent = differencing ? rng.bytes(size_bytes) : new Uint8Array(size_bytes);
      const path = await makeImage(dir, differencing, parent);
      const file = new FaultFile(path, await Deno.readFile(path));
      const context: OpenContext = {
        openFile: () => Promise.resolve(file),
        openBacking: (name) =>
          openImage(`raw:${dir}/${name}`, { readOnly: true, cache: "writeback" }),
      };
      const driver = await DynamicVhdDriver.openImage(file, await readVhdImage(file), {}, context);
      const model = parent.slice();
      let state: Unflushed = { stable: model.slice(), writes: [] };
      let points: CrashPoint[] = [];
      let taken = 0;
      file.onIo = () => {
        if (taken < crash_points_per_run && rng.next() < 0.6) {
          points.push({ image: file.crashImage(rng), state });
          taken += 1;
        }
      };
      // Verified batch by batch, so only a few images are held at once.
      const drain = async () => {
        const due = points;
        points = [];
        for (const point of due) {
          const n = verified++;
          await verify(context, point, `${kind} crash ${n}`, n % reopen_every === 0);
        }
      };
      let verified = 0;
      for (let b = 0; b < batches; b += 1) {
        const writes: [number, Uint8Array][] = [];
        for (let i = rng.int(1, 6); i > 0; i -= 1) {
          const [offset, length] = vhdWrite(rng, size_bytes, block_bytes);
          if (writes.some(([o, d]) => offset < o + d.byteLength && o < offset + length)) continue;
          writes.push([offset, vhdData(rng, length)]);
        }
        state = { stable: state.stable, writes: [...state.writes, ...writes] };
        await Promise.all(writes.map(([offset, data]) => driver.write(offset, data)));
        for (const [offset, data] of writes) model.set(data, offset);
        if (rng.next() < 0.25) {
          await driver.flush();
          state = { stable: model.slice(), writes: [] };
        }
        await drain();
      }
      file.onIo = undefined;
      await driver.close();
      console.log(`${kind}: ${verified} crash images, ${driver.barriers} fdatasyncs`);
      assert.ok(verified >= 1000, `only ${verified} crash images`);
    });
  });
}

async function verify(
  context: OpenContext,
  point: CrashPoint,
  what: string,
  reopen: boolean,
): Promise<void> {
  // In memory: the crash image is checked and read without touching the disk.
  const file = new FaultFile("crash.vhd", point.image);
  const report = await checkVhdFile(file, { repair: false });
  assert.equal(report.unusable, undefined, `${what}: ${report.unusable}`);
  assert.deepEqual(report.corruptions, [], what);
  const image = await readVhdImage(file);
  const driver = await DynamicVhdDriver.openImage(file, image, { readOnly: true }, context);
  let got: Uint8Array;
  try {
    got = await readAll(driver);
    assertCrashConsistent(got, point.state, what);
  } finally {
    await driver.close();
  }
  if (!reopen) return;
  // The next writer's open takes back what the crash left: no leak, same content.
  const writer = await DynamicVhdDriver.openImage(file, await readVhdImage(file), {}, context);
  await writer.close();
  assert.deepEqual(await checkVhdFile(file, { repair: false }), {
    corruptions: [],
    leakedClusters: 0,
  }, `${what} reopened`);
  const again = await DynamicVhdDriver.openImage(
    file,
    await readVhdImage(file),
    { readOnly: true },
    context,
  );
  try {
    assert.deepEqual(await readAll(again), got, `${what}: the reopen changed what reads back`);
  } finally {
    await again.close();
  }
}
