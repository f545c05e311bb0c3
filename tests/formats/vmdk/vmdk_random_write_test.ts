/**
 * Seeded random writes through our vmdk driver (grain-straddling,
 * sub-sector, concurrent) against an in-memory model; QEMU must read the
 * result identically, `qemu-img check` must pass, and both maps must agree.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { createVmdk } from "../../../src/formats/vmdk/create.ts";
import { openVmdk } from "../../../src/formats/vmdk/vmdk.ts";
import { vmdkCheck } from "../../../src/formats/vmdk/check.ts";
import { mapImage } from "../../../src/tools/map.ts";
import { testSeed } from "../../_helpers/random.ts";
import {
  assertQemuSameAsRaw,
  HAVE_QEMU,
  mergedRuns,
  qemuImg,
  qemuMap,
  writeRaw,
} from "./_vmdk_helpers.ts";

const size_bytes = 48 << 20;
const writes_total = 2400;
const batch_writes_max = 8;

function randomWrite(rng: ReturnType<typeof testSeed>, grainBytes: number) {
  const shape = rng.int(0, 3);
  let length: number;
  let offset: number;
  if (shape === 0) {
    // Straddles a grain boundary at an odd byte.
    length = rng.int(2, 3 * grainBytes);
    const boundary = rng.int(1, size_bytes / grainBytes - 4) * grainBytes;
    offset = boundary - rng.int(1, Math.min(length - 1, grainBytes));
  } else if (shape === 1) {
    length = rng.int(1, 511); // sub-sector
    offset = rng.int(0, size_bytes - length);
  } else {
    length = rng.int(1, 200_000);
    offset = rng.int(0, size_bytes - length);
  }
  return { offset, data: rng.bytes(length) };
}

for (const preallocateTables of [true, false]) {
  for (const withQemu of [false, true]) {
    const layout = preallocateTables ? "preallocated tables" : "tables allocated on demand";
    Deno.test({
      name: `vmdk: seeded random writes match a model${
        withQemu ? "; qemu-img check passes, QEMU reads and maps the same" : ""
      } (${layout})`,
      ignore: withQemu && !HAVE_QEMU,
      fn: () => randomWrites(preallocateTables, withQemu),
    });
  }
}

async function randomWrites(preallocateTables: boolean, withQemu: boolean) {
  const rng = testSeed(`vmdk random writes (preallocateTables=${preallocateTables})`);
  const dir = await Deno.makeTempDir({ prefix: "vmdk-rw-" });
  try {
    const path = `${dir}/disk.vmdk`;
    createVmdk(path, size_bytes, { preallocateTables });
    const model = new Uint8Array(size_bytes);
    const driver = await openVmdk(path);
    const grainBytes = driver.sparseExtents[0].layout.grainBytes;
    let done = 0;
    while (done < writes_total) {
      // A batch of concurrent writes that do not overlap each other.
      const batch: { offset: number; data: Uint8Array }[] = [];
      const count = rng.int(1, batch_writes_max);
      for (let i = 0; i < count && done < writes_total; i += 1, done += 1) {
        const w = randomWrite(rng, grainBytes);
        const end = w.offset + w.data.byteLength;
        if (batch.some((b) => b.offset < end && w.offset < b.offset + b.data.byteLength)) continue;
        batch.push(w);
      }
      await Promise.all(batch.map((w) => driver.write(w.offset, w.data)));
      for (const w of batch) model.set(w.data, w.offset);
      if (rng.int(0, 9) === 0) await driver.flush();
    }
    await driver.flush();
    const back = new Uint8Array(size_bytes);
    await driver.read(0, back);
    await driver.close();
    assert.ok(Buffer.compare(back, model) === 0, "driver reads back the model");

    const report = await vmdkCheck(path, { repair: false });
    assert.deepEqual(report.corruptions, []);
    assert.equal(report.unusable, undefined);
    assert.equal(report.leakedClusters, 0);
    if (!withQemu) return;
    const check = await qemuImg("check", path);
    assert.equal(check.code, 0, check.stdout + check.stderr);
    await writeRaw(`${dir}/model.raw`, model);
    await assertQemuSameAsRaw(path, `${dir}/model.raw`);
    const key = (e: { data: boolean; zero: boolean; depth: number }) =>
      `${e.data}/${e.zero}/${e.depth}`;
    assert.deepEqual(mergedRuns(await mapImage(path), key), mergedRuns(await qemuMap(path), key));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("vmdk: concurrent writes into one unallocated grain table allocate it once", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vmdk-table-" });
  try {
    const path = `${dir}/disk.vmdk`;
    createVmdk(path, 64 << 20, { preallocateTables: false });
    const driver = await openVmdk(path);
    const extent = driver.sparseExtents[0];
    const grainBytes = extent.layout.grainBytes;
    const lengthBefore = (await Deno.stat(path)).size;
    // 40 grains of table 1 (grains 512..1023), all written at once.
    await Promise.all(
      Array.from(
        { length: 40 },
        (_, i) => driver.write((512 + i * 7) * grainBytes + 100, new Uint8Array(1000).fill(i + 1)),
      ),
    );
    assert.notEqual(extent.directory[1], 0);
    assert.equal(extent.directory[0], 0);
    const byte = new Uint8Array(1);
    await driver.read((512 + 39 * 7) * grainBytes + 1099, byte);
    assert.equal(byte[0], 40);
    await driver.close();
    // One table slot (one grain holds both tables) plus 40 grains; the reserve is trimmed.
    assert.equal((await Deno.stat(path)).size, lengthBefore + 41 * grainBytes);
    const report = await vmdkCheck(path, { repair: false });
    assert.deepEqual(report.corruptions, []);
    assert.equal(report.leakedClusters, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("vmdk: concurrent writes to one new grain allocate it once", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vmdk-conc-" });
  try {
    const path = `${dir}/disk.vmdk`;
    createVmdk(path, 4 << 20);
    const driver = await openVmdk(path);
    const grainBytes = driver.sparseExtents[0].layout.grainBytes;
    const lengthBefore = (await Deno.stat(path)).size;
    const model = new Uint8Array(grainBytes * 2);
    const writes: Promise<void>[] = [];
    // 64 writes of 2 KiB pieces of grains 3 and 4, all in flight at once.
    for (let i = 0; i < 64; i += 1) {
      const data = new Uint8Array(2048).fill(i + 1);
      model.set(data, i * 2048);
      writes.push(driver.write(3 * grainBytes + i * 2048, data));
    }
    await Promise.all(writes);
    const back = new Uint8Array(grainBytes * 2);
    await driver.read(3 * grainBytes, back);
    assert.ok(Buffer.compare(back, model) === 0);
    await driver.close();
    assert.equal((await Deno.stat(path)).size, lengthBefore + 2 * grainBytes);
    const report = await vmdkCheck(path, { repair: false });
    assert.deepEqual(report.corruptions, []);
    assert.equal(report.leakedClusters, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
