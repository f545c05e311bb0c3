/**
 * Crash safety of vmdk writes (DESIGN.md §4 rule 3): a child writes seeded
 * batches and is killed with SIGKILL at a random moment, over and over on
 * the same image. After every kill our check and `qemu-img check` accept
 * the image, QEMU reads it exactly as we do, and every write flushed
 * before the kill reads back.
 */
import assert from "node:assert/strict";
import { createVmdk } from "../../../src/formats/vmdk/create.ts";
import { openVmdk } from "../../../src/formats/vmdk/vmdk.ts";
import { vmdkCheck } from "../../../src/formats/vmdk/check.ts";
import { Random, testSeed } from "../../_helpers/random.ts";
import { crash_batches_per_flush, crashBatch } from "./_crash_plan.ts";
import { assertQemuSameAsRaw, HAVE_QEMU, qemuImg } from "./_vmdk_helpers.ts";

const size_bytes = 4 << 20;
const iterations = 200;
const lanes = 4;
/** Kill after 0..this many flushes seen, then a random extra delay (load-independent). */
const kill_after_flushes_max = 3;
const kill_delay_ms_max = 30;
const fresh_image_every = 4;
const WRITER = new URL("./_crash_writer.ts", import.meta.url).pathname;

async function waitFor(text: () => string, what: string, timeoutMs: number) {
  const deadline = Date.now() + timeoutMs;
  while (!text().includes(what)) {
    if (Date.now() > deadline) throw new Error(`child did not print ${what}: ${text()}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

function flushCount(output: string): number {
  return [...output.matchAll(/^F (\d+)$/gm)].length;
}

/** Runs one child, kills it, returns how many batches were flushed. */
async function crashOnce(
  path: string,
  seed: number,
  flushes: number,
  delayMs: number,
): Promise<number> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", "--no-check", "-A", WRITER, path, String(seed)],
    stdout: "piped",
    stderr: "null",
  }).spawn();
  let output = "";
  const reading = (async () => {
    for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) output += chunk;
  })();
  try {
    await waitFor(() => output, "READY", 20_000);
    const deadline = Date.now() + 20_000;
    while (flushCount(output) < flushes && !output.includes("DONE") && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 1));
    }
    await new Promise((r) => setTimeout(r, delayMs));
  } finally {
    try {
      child.kill("SIGKILL");
    } catch {
      // already exited
    }
    await child.status;
    await reading;
  }
  const flushed = [...output.matchAll(/^F (\d+)$/gm)].map((m) => Number(m[1]));
  return flushed.length ? flushed[flushed.length - 1] : 0;
}

/** The model after `flushed` batches, and the bytes later batches may have touched. */
function expected(base: Uint8Array, seed: number, flushed: number) {
  const rng = new Random(seed);
  const model = base.slice();
  const maybe = new Uint8Array(size_bytes);
  for (let b = 0; b < flushed + crash_batches_per_flush; b += 1) {
    for (const w of crashBatch(rng, size_bytes)) {
      if (b < flushed) model.set(w.data, w.offset);
      else maybe.fill(1, w.offset, w.offset + w.data.byteLength);
    }
  }
  return { model, maybe };
}

const stats = { flushedBatches: 0, killsAfterAFlush: 0, leakedGrainsSeen: 0 };

async function verify(dir: string, path: string, model: Uint8Array, maybe: Uint8Array) {
  const report = await vmdkCheck(path, { repair: false });
  stats.leakedGrainsSeen = Math.max(stats.leakedGrainsSeen, report.leakedClusters);
  assert.deepEqual(report.corruptions, [], "our check");
  assert.equal(report.unusable, undefined);
  const driver = await openVmdk(path, { readOnly: true, cache: "writeback" });
  const image = new Uint8Array(size_bytes);
  await driver.read(0, image);
  await driver.close();
  for (let i = 0; i < size_bytes; i += 1) {
    if (!maybe[i] && image[i] !== model[i]) {
      assert.fail(`byte ${i} is ${image[i]}, flushed value ${model[i]}`);
    }
  }
  if (HAVE_QEMU) {
    const check = await qemuImg("check", path);
    assert.equal(check.code, 0, `qemu-img check: ${check.stdout}${check.stderr}`);
    await Deno.writeFile(`${dir}/ours.raw`, image);
    await assertQemuSameAsRaw(path, `${dir}/ours.raw`);
  }
  return image;
}

async function lane(rng: Random, laneIndex: number, count: number, seedBase: number) {
  const dir = await Deno.makeTempDir({ prefix: `vmdk-crash-${laneIndex}-` });
  try {
    const path = `${dir}/disk.vmdk`;
    // Odd lanes: 4 KiB grains (4 grain tables) and no preallocated tables,
    // on a fresh image every few kills, so kills also land in table allocations.
    const onDemand = laneIndex % 2 === 1;
    let base = new Uint8Array(size_bytes);
    for (let i = 0; i < count; i += 1) {
      if (i === 0 || (onDemand && i % fresh_image_every === 0)) {
        await Deno.remove(path).catch(() => {});
        createVmdk(path, size_bytes, {
          preallocateTables: !onDemand,
          grainBytes: onDemand ? 4096 : 65536,
        });
        base = new Uint8Array(size_bytes);
      }
      const seed = seedBase + laneIndex * 100_000 + i;
      const flushes = rng.int(0, kill_after_flushes_max);
      const delay = rng.int(0, kill_delay_ms_max);
      const flushed = await crashOnce(path, seed, flushes, delay);
      const { model, maybe } = expected(base, seed, flushed);
      stats.flushedBatches += flushed;
      if (flushed > 0) stats.killsAfterAFlush += 1;
      try {
        base = await verify(dir, path, model, maybe);
      } catch (error) {
        throw new Error(
          `lane ${laneIndex} iteration ${i} (seed ${seed}, ${flushes} flushes + ${delay} ms): ${error}`,
        );
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("vmdk: SIGKILL at random points never corrupts the image or loses flushed writes", async () => {
  const rng = testSeed("vmdk crash");
  const started = Date.now();
  await Promise.all(
    Array.from({ length: lanes }, (_, l) => lane(rng, l, iterations / lanes, rng.seed)),
  );
  console.log(`${iterations} kills in ${Date.now() - started} ms`, JSON.stringify(stats));
  // The kills must land while the child writes, not only before its first flush.
  assert.ok(stats.killsAfterAFlush > iterations / 4, JSON.stringify(stats));
});
