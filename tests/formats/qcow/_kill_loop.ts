/**
 * The SIGKILL loop shared by `kill_test.ts` and `kill_backed_test.ts`: a
 * writer process (`_crash_writer.ts`) is killed at random points, again
 * and again on the same image. After each kill our check accepts the
 * image, every write the writer was answered reads back (flushed or not),
 * and QEMU reads what we read. Each writer opens the image read-write and
 * so reclaims what the killed one left; after the loop, one more
 * read-write open and a clean close leave no leak at all.
 * @module
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { createQcow } from "../../../src/formats/qcow/create.ts";
import { checkQcow } from "../../../src/formats/qcow/check.ts";
import { testSeed } from "../../_helpers/random.ts";
import { afterKill, assertAnsweredWrites } from "../../_helpers/acked_writes.ts";
import { killWriterAfter } from "../../_helpers/kill_writer.ts";
import { assertQemuSees, readAll } from "./_util.ts";

const disk_bytes = 4 << 20;
const writer = new URL("./_crash_writer.ts", import.meta.url).pathname;

/** What a kill loop verified. */
export interface KillLoopResult {
  /** Answered writes read back after the kills. */
  answered: number;
  /** Of those, not covered by a flush when the writer died. */
  answeredUnflushed: number;
  /** Most leaked clusters `check` saw right after a kill (before the next open reclaimed them). */
  leakedAfterKillMax: number;
}

async function readImage(image: string): Promise<Uint8Array> {
  const driver = await openImage(image, { readOnly: true, cache: "writeback" });
  try {
    return await readAll(driver);
  } finally {
    await driver.close();
  }
}

/** Runs `iterations` kills; `withQemu`: QEMU must read what we read after each. */
export async function killLoop(
  dir: string,
  name: string,
  backed: boolean,
  iterations: number,
  withQemu: boolean,
): Promise<KillLoopResult> {
  const rng = testSeed(name);
  const image = `${dir}/${name}.qcow`;
  let model: Uint8Array = new Uint8Array(disk_bytes);
  if (backed) {
    model = rng.bytes(disk_bytes);
    await Deno.writeFile(`${dir}/${name}-base.raw`, model);
  }
  await createQcow(image, {
    sizeBytes: disk_bytes,
    backingName: backed ? `${name}-base.raw` : undefined,
  });
  const result: KillLoopResult = { answered: 0, answeredUnflushed: 0, leakedAfterKillMax: 0 };
  for (let i = 0; i < iterations; i += 1) {
    const seed = rng.int(0, 2 ** 31);
    const log = `${dir}/${name}-${i}.log`;
    await killWriterAfter(writer, [image, log, String(seed)], log, rng.int(0, 120));
    const expected = afterKill(model, seed, await Deno.readTextFile(log));
    result.answered += expected.answered;
    result.answeredUnflushed += expected.answeredUnflushed;
    const report = await checkQcow(image, { repair: false });
    assert.equal(report.unusable, undefined, `iteration ${i}: ${report.unusable}`);
    assert.deepEqual(report.corruptions, [], `iteration ${i}: corruptions`);
    result.leakedAfterKillMax = Math.max(result.leakedAfterKillMax, report.leakedClusters);
    model = await readImage(image);
    assertAnsweredWrites(model, expected, `${name} iteration ${i} (seed ${seed})`);
    if (withQemu) await assertQemuSees(dir, image, model);
  }
  // A restarted disk process, then a clean stop: what the last kill left is reclaimed.
  const driver = await openImage(image);
  await driver.close();
  const report = await checkQcow(image, { repair: false });
  assert.deepEqual(report.corruptions, []);
  assert.equal(report.leakedClusters, 0, "a read-write open reclaims every leak");
  assert.deepEqual(await readImage(image), model, "reclaiming changed no guest byte");
  return result;
}
