/**
 * The SIGKILL crash loop shared by `kill_test.ts` and `kill_backed_test.ts`:
 * a writer process (`_crash_writer.ts`) is killed at random points, again
 * and again on the same image. After each kill our check must accept the
 * image, every batch the writer logged as flushed must read back, and QEMU
 * must read what we read.
 * @module
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { createQcow } from "../../../src/formats/qcow/create.ts";
import { checkQcow } from "../../../src/formats/qcow/check.ts";
import { Random } from "../../_helpers/random.ts";
import { testSeed } from "../../_helpers/random.ts";
import { assertDurable, assertQemuSees, crashBatch, hasQemu, readAll } from "./_util.ts";

const disk_bytes = 4 << 20;
const writer = new URL("./_crash_writer.ts", import.meta.url).pathname;

/** Waits until a crash writer logged `ready` (it has opened its image). */
export async function waitForReady(log: string, child: Deno.ChildProcess): Promise<void> {
  const deadline = Date.now() + 20_000;
  let exited = false;
  child.status.then(() => (exited = true));
  while (Date.now() < deadline && !exited) {
    try {
      if ((await Deno.readTextFile(log)).startsWith("ready")) return;
    } catch {
      // not created yet
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`crash writer did not start (exited: ${exited})`);
}

/** Runs `iterations` kills; returns the number of flushed batches verified. */
export async function killLoop(dir: string, name: string, backed: boolean, iterations: number) {
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
  let flushedBatches = 0;
  for (let i = 0; i < iterations; i += 1) {
    const seed = rng.int(0, 2 ** 31);
    const log = `${dir}/${name}-${i}.log`;
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "--quiet", "-A", writer, image, log, String(seed), String(disk_bytes)],
      stdout: "null",
      stderr: "piped",
    }).spawn();
    try {
      await waitForReady(log, child);
      await new Promise((r) => setTimeout(r, rng.int(0, 120)));
    } finally {
      try {
        child.kill("SIGKILL");
      } catch {
        // already gone
      }
      await child.output();
    }
    const lines = (await Deno.readTextFile(log)).trim().split("\n").slice(1);
    const logged = lines.length;
    flushedBatches += logged;
    // Replay: batches 0..logged-1 are durable; batch `logged` may be partly there.
    const replay = new Random(seed);
    const stable = model.slice();
    for (let b = 0; b < logged; b += 1) {
      for (const [offset, data] of crashBatch(replay, disk_bytes)) stable.set(data, offset);
    }
    const ambiguous = new Uint8Array(disk_bytes);
    for (const [offset, data] of crashBatch(replay, disk_bytes)) {
      ambiguous.fill(1, offset, offset + data.byteLength);
    }
    const report = await checkQcow(image, { repair: false });
    assert.equal(report.unusable, undefined, `iteration ${i}: ${report.unusable}`);
    assert.deepEqual(report.corruptions, [], `iteration ${i}: corruptions`);
    const driver = await openImage(image, { readOnly: true, cache: "writeback" });
    try {
      model = await readAll(driver);
    } finally {
      await driver.close();
    }
    assertDurable(model, stable, ambiguous, `${name} iteration ${i}`);
    if (hasQemu && i % 3 === 0) await assertQemuSees(dir, image, model);
  }
  return flushedBatches;
}
