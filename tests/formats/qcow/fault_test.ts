/**
 * Crash simulation in process: the qcow driver runs seeded write/flush
 * sequences over a fault-injecting file; at random I/O points we take the
 * file a crash would leave (unflushed writes dropped, reordered, torn) and
 * require: our check finds no corruption, every write acknowledged before
 * the last completed flush reads back, and QEMU reads what we read.
 */
import assert from "node:assert/strict";
import type { OpenContext } from "../../../src/formats/open_image.ts";
import { openImage } from "../../../src/formats/open_image.ts";
import { createQcow } from "../../../src/formats/qcow/create.ts";
import { QcowDriver } from "../../../src/formats/qcow/qcow.ts";
import { checkQcow } from "../../../src/formats/qcow/check.ts";
import { testSeed } from "../../_helpers/random.ts";
import { FaultFile } from "../../_helpers/fault_file.ts";
import { assertDurable, assertQemuSees, crashBatch, hasQemu, inTempDir, readAll } from "./_util.ts";

const disk_bytes = 4 << 20;
const batches_per_run = 120;
const snapshots_per_epoch_max = 2;

interface Epoch {
  stable: Uint8Array;
  ambiguous: Uint8Array;
  crashes: Uint8Array[];
}

async function crashRun(dir: string, name: string, backed: boolean): Promise<number> {
  const rng = testSeed(name);
  const image = `${dir}/${name}.qcow`;
  let base: Uint8Array = new Uint8Array(disk_bytes);
  if (backed) {
    base = rng.bytes(disk_bytes);
    await Deno.writeFile(`${dir}/base.raw`, base);
  }
  await createQcow(image, { sizeBytes: disk_bytes, backingName: backed ? "base.raw" : undefined });
  const file = new FaultFile(image, await Deno.readFile(image));
  const context: OpenContext = {
    openFile: () => Promise.resolve(file),
    openBacking: (backing) =>
      openImage(`${dir}/${backing}`, { readOnly: true, cache: "writeback" }),
  };
  const driver = await QcowDriver.open(image, {}, context);
  const model = base.slice();
  let epoch: Epoch = { stable: model.slice(), ambiguous: new Uint8Array(disk_bytes), crashes: [] };
  let checked = 0;
  file.onIo = () => {
    if (epoch.crashes.length < snapshots_per_epoch_max && rng.next() < 0.05) {
      epoch.crashes.push(file.crashImage(rng));
    }
  };
  for (let b = 0; b < batches_per_run; b += 1) {
    const writes = crashBatch(rng, disk_bytes);
    for (const [offset, data] of writes) {
      model.set(data, offset);
      epoch.ambiguous.fill(1, offset, offset + data.byteLength);
    }
    await Promise.all(writes.map(([offset, data]) => driver.write(offset, data)));
    if (rng.next() < 0.3) {
      await driver.flush();
      checked += await verifyEpoch(dir, name, epoch);
      epoch = { stable: model.slice(), ambiguous: new Uint8Array(disk_bytes), crashes: [] };
    }
  }
  await driver.close();
  checked += await verifyEpoch(dir, name, epoch);
  return checked;
}

async function verifyEpoch(dir: string, name: string, epoch: Epoch): Promise<number> {
  for (const [n, bytes] of epoch.crashes.entries()) {
    const path = `${dir}/${name}-crash.qcow`;
    await Deno.writeFile(path, bytes);
    const report = await checkQcow(path, { repair: false });
    assert.equal(report.unusable, undefined, `crash image unusable: ${report.unusable}`);
    assert.deepEqual(report.corruptions, [], "crash image has no corruption");
    const driver = await openImage(path, { readOnly: true, cache: "writeback" });
    let got: Uint8Array;
    try {
      got = await readAll(driver);
    } finally {
      await driver.close();
    }
    assertDurable(got, epoch.stable, epoch.ambiguous, `${name} crash image`);
    // QEMU is slower to ask: once every few epochs.
    if (hasQemu && n === 0 && epoch.stable[0] % 4 === 0) await assertQemuSees(dir, path, got);
    assert.deepEqual(await Deno.readFile(path), bytes, "reading never writes");
  }
  return epoch.crashes.length;
}

Deno.test("qcow crash simulation: standalone image (extent layout)", async () => {
  await inTempDir(async (dir) => {
    let crashes = 0;
    for (let run = 0; run < 3; run += 1) crashes += await crashRun(dir, `solo${run}`, false);
    console.log(`standalone: ${crashes} crash images verified`);
    assert.ok(crashes >= 50);
  });
});

Deno.test("qcow crash simulation: image over a backing file (512-byte clusters)", async () => {
  await inTempDir(async (dir) => {
    let crashes = 0;
    for (let run = 0; run < 2; run += 1) crashes += await crashRun(dir, `backed${run}`, true);
    console.log(`backed: ${crashes} crash images verified`);
    assert.ok(crashes >= 50);
  });
});
