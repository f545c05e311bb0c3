/**
 * SIGKILL under load: a writer process (`_kill_writer.ts`) with many
 * writes in flight and no flushes is killed at random moments, again and
 * again on the same image. An answered write must survive the death of the
 * process that answered it (DESIGN.md §4, the lead's rule: there is no
 * replay any more), so after every kill: our check finds no corruption,
 * every write the writer logged as answered reads back, and the writes it
 * had in flight read as either their old or their new bytes.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { createVhd } from "../../../src/formats/vhd/create.ts";
import { checkVhd } from "../../../src/formats/vhd/check.ts";
import { testSeed } from "../../_helpers/random.ts";
import { inTempDir } from "../qcow/_util.ts";
import { killWriterAfter } from "../../_helpers/kill_writer.ts";
import { killWriteData, parseKillLog } from "./_kill_plan.ts";
import { assertQemuReads, createChild, firstDifference, hasQemu, readAll } from "./_vhd_util.ts";

const disk_bytes = 6 << 20;
const kills = 25;
const depth = 12;
const writer = new URL("./_kill_writer.ts", import.meta.url).pathname;

/** Checks the image against the log of one writer's life; returns what it now holds. */
async function verifyAfterKill(
  image: string,
  before: Uint8Array,
  log: string,
  seed: number,
  what: string,
) {
  const report = await checkVhd(image, { repair: false });
  assert.equal(report.unusable, undefined, `${what}: ${report.unusable}`);
  assert.deepEqual(report.corruptions, [], what);
  const driver = await openImage(image, { readOnly: true, cache: "writeback" });
  const got = await readAll(driver);
  await driver.close();
  const writes = parseKillLog(await Deno.readTextFile(log));
  const expected = before.slice();
  const inFlight: { offset: number; data: Uint8Array }[] = [];
  // In-flight writes never overlap, so issue order is the order that counts.
  for (const w of writes) {
    const data = killWriteData(seed, w.index, w.length);
    if (w.answered) expected.set(data, w.offset);
    else inFlight.push({ offset: w.offset, data });
  }
  for (let i = 0; i < got.byteLength; i += 1) {
    if (got[i] === expected[i]) continue;
    const w = inFlight.find((f) => i >= f.offset && i < f.offset + f.data.byteLength);
    if (!w || w.data[i - w.offset] !== got[i]) {
      assert.fail(
        `${what}: byte ${i} is ${got[i]}, expected ${expected[i]}${
          w ? " or the in-flight write's" : " (answered)"
        }`,
      );
    }
  }
  return { got, answered: writes.filter((w) => w.answered).length };
}

async function killLoop(dir: string, name: string, differencing: boolean): Promise<number> {
  const rng = testSeed(`vhd-kill-${name}`);
  const image = `${dir}/${name}.vhd`;
  let model: Uint8Array = new Uint8Array(disk_bytes);
  if (differencing) {
    model = rng.bytes(disk_bytes);
    await Deno.writeFile(`${dir}/${name}-parent.raw`, model);
    await createChild(image, `${name}-parent.raw`, "raw", 512 << 10);
  } else await createVhd(image, { sizeBytes: disk_bytes, subformat: "dynamic", forceSize: true });
  let answered = 0;
  for (let k = 0; k < kills; k += 1) {
    const seed = rng.int(0, 2 ** 31);
    const log = `${dir}/${name}-${k}.log`;
    const args = [image, log, String(seed), String(depth)];
    await killWriterAfter(writer, args, log, rng.int(20, 400));
    const result = await verifyAfterKill(image, model, log, seed, `${name} kill ${k}`);
    model = result.got;
    if (k % 5 === 4) {
      // The next writer takes back what a dead one left: no leaks, same content.
      await (await openImage(image)).close();
      const report = await checkVhd(image, { repair: false });
      assert.deepEqual(
        report,
        { corruptions: [], leakedClusters: 0 },
        `${name} kill ${k} reopened`,
      );
      const reread = await openImage(image, { readOnly: true, cache: "writeback" });
      assert.equal(firstDifference(await readAll(reread), model), -1, "reopen changed nothing");
      await reread.close();
    }
    answered += result.answered;
    if (hasQemu && !differencing && k % 5 === 0) await assertQemuReads(dir, image, model);
  }
  return answered;
}

for (const differencing of [false, true]) {
  const name = differencing ? "differencing" : "dynamic";
  Deno.test(`vhd SIGKILL loop: every answered write survives (${name}, ${kills} kills)`, async () => {
    await inTempDir(async (dir) => {
      const answered = await killLoop(dir, name, differencing);
      console.log(`${name}: ${kills} kills, ${answered} answered writes verified`);
      assert.ok(answered > kills, "the writer got work done between kills");
    });
  });
}
