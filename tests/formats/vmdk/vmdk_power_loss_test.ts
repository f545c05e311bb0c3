/**
 * Power loss, not just a killed process: our vmdk driver over a
 * fault-injecting file layer (unflushed writes dropped, applied or torn at
 * 512-byte sectors, in any order). At random I/O points we take the image
 * a crash could leave; every one must pass our check (leaks allowed) and
 * `qemu-img check`, read the same through QEMU, and hold every write that
 * completed before the last completed flush.
 */
import assert from "node:assert/strict";
import { createVmdk } from "../../../src/formats/vmdk/create.ts";
import { openVmdk } from "../../../src/formats/vmdk/vmdk.ts";
import { vmdkCheck } from "../../../src/formats/vmdk/check.ts";
import { testSeed } from "../../_helpers/random.ts";
import { FaultFile } from "../../_helpers/fault_file.ts";
import { assertQemuSameAsRaw, HAVE_QEMU, qemuImg } from "./_vmdk_helpers.ts";

const size_bytes = 2 << 20;
const batches = 300;
const crash_images_max = 300;
const qemu_every = 6;

interface CrashPoint {
  image: Uint8Array;
  model: Uint8Array;
  maybe: Uint8Array;
}

for (const preallocateTables of [true, false]) {
  Deno.test(`vmdk: crash images under power loss stay consistent (preallocateTables=${preallocateTables})`, async () => {
    const rng = testSeed(`vmdk power loss (${preallocateTables})`);
    const dir = await Deno.makeTempDir({ prefix: "vmdk-power-" });
    try {
      const path = `${dir}/disk.vmdk`;
      createVmdk(path, size_bytes, { grainBytes: 4096, preallocateTables });
      const file = new FaultFile(path, await Deno.readFile(path));
      const driver = await openVmdk(path, {}, () => Promise.resolve(file));
      let model = new Uint8Array(size_bytes);
      let flushed = model.slice();
      let maybe = new Uint8Array(size_bytes);
      const points: CrashPoint[] = [];
      file.onIo = () => {
        if (points.length < crash_images_max && rng.next() < 0.15) {
          points.push({ image: file.crashImage(rng), model: flushed, maybe: maybe.slice() });
        }
      };
      for (let b = 0; b < batches; b += 1) {
        const writes = Array.from({ length: rng.int(1, 4) }, () => {
          const length = rng.pick([rng.int(1, 700), rng.int(1, 20_000)]);
          return { offset: rng.int(0, size_bytes - length), data: rng.bytes(length) };
        });
        for (const w of writes) maybe.fill(1, w.offset, w.offset + w.data.byteLength);
        await Promise.all(writes.map((w) => driver.write(w.offset, w.data)));
        for (const w of writes) model.set(w.data, w.offset);
        if (rng.int(0, 2) === 0) {
          const snapshot = model.slice();
          await driver.flush();
          flushed = snapshot;
          maybe = new Uint8Array(size_bytes);
        }
      }
      file.onIo = undefined;
      await driver.close();
      model = new Uint8Array(0);
      console.log(`${points.length} crash images`);
      assert.ok(points.length >= 150, `only ${points.length} crash images`);
      for (let i = 0; i < points.length; i += 1) {
        await verifyCrashImage(dir, points[i], i % qemu_every === 0);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

async function verifyCrashImage(dir: string, point: CrashPoint, withQemu: boolean) {
  const path = `${dir}/crash.vmdk`;
  await Deno.writeFile(path, point.image);
  const report = await vmdkCheck(path, { repair: false });
  assert.equal(report.unusable, undefined);
  assert.deepEqual(report.corruptions, []);
  const driver = await openVmdk(path, { readOnly: true, cache: "writeback" });
  const image = new Uint8Array(size_bytes);
  await driver.read(0, image);
  await driver.close();
  for (let i = 0; i < size_bytes; i += 1) {
    if (!point.maybe[i] && image[i] !== point.model[i]) {
      assert.fail(`byte ${i} is ${image[i]}, flushed value ${point.model[i]}`);
    }
  }
  if (!withQemu || !HAVE_QEMU) return;
  const check = await qemuImg("check", path);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  await Deno.writeFile(`${dir}/ours.raw`, image);
  await assertQemuSameAsRaw(path, `${dir}/ours.raw`);
}
