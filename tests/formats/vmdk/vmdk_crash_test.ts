/**
 * A killed process loses nothing it answered (src/formats/driver.ts,
 * `write`): a child writes seeded batches and is killed with SIGKILL at a
 * random moment, over and over on the same image. After every kill our
 * check accepts the image and every write the child was answered reads
 * back, flushed or not; the next read-write open reclaims what the kill
 * leaked, so a last open and clean close leave no leak. With QEMU
 * installed, a shorter loop has `qemu-img check` and QEMU's reading judge
 * every kill too.
 */
import assert from "node:assert/strict";
import { createVmdk } from "../../../src/formats/vmdk/create.ts";
import { openVmdk } from "../../../src/formats/vmdk/vmdk.ts";
import { vmdkCheck } from "../../../src/formats/vmdk/check.ts";
import { type Random, testSeed } from "../../_helpers/random.ts";
import { afterKill, assertAnsweredWrites } from "../../_helpers/acked_writes.ts";
import { assertQemuSameAsRaw, HAVE_QEMU, qemuImg } from "./_vmdk_helpers.ts";

const size_bytes = 4 << 20;
const lanes = 4;
/** Kill after 0..this many flushes seen, then a random extra delay (load-independent). */
const kill_after_flushes_max = 3;
const kill_delay_ms_max = 30;
const fresh_image_every = 4;
const WRITER = new URL("./_crash_writer.ts", import.meta.url).pathname;

function flushCount(log: string): number {
  return [...log.matchAll(/^f \d+$/gm)].length;
}

async function readLog(log: string): Promise<string> {
  try {
    return await Deno.readTextFile(log);
  } catch {
    return "";
  }
}

/** Runs one child, kills it after `flushes` flushes and `delayMs`; returns its log. */
async function crashOnce(
  path: string,
  log: string,
  seed: number,
  flushes: number,
  delayMs: number,
) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", "--no-check", "-A", WRITER, path, log, String(seed)],
    stdout: "null",
    stderr: "null",
  }).spawn();
  try {
    const deadline = Date.now() + 20_000;
    for (;;) {
      const text = await readLog(log);
      const started = text.startsWith("ready");
      if (started && (flushCount(text) >= flushes || text.includes("done"))) break;
      if (Date.now() > deadline) throw new Error(`writer stalled: ${text.slice(-200)}`);
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
  }
  return await readLog(log);
}

const stats = { answered: 0, answeredUnflushed: 0, leakedAfterKillMax: 0, kills: 0 };

async function readImage(path: string): Promise<Uint8Array> {
  const driver = await openVmdk(path, { readOnly: true, cache: "writeback" });
  const image = new Uint8Array(size_bytes);
  await driver.read(0, image);
  await driver.close();
  return image;
}

async function assertClean(path: string, what: string): Promise<number> {
  const report = await vmdkCheck(path, { repair: false });
  assert.equal(report.unusable, undefined, `${what}: ${report.unusable}`);
  assert.deepEqual(report.corruptions, [], `${what}: our check`);
  return report.leakedClusters;
}

async function assertQemuAgrees(dir: string, path: string, image: Uint8Array) {
  const check = await qemuImg("check", path);
  assert.equal(check.code, 0, `qemu-img check: ${check.stdout}${check.stderr}`);
  await Deno.writeFile(`${dir}/ours.raw`, image);
  await assertQemuSameAsRaw(path, `${dir}/ours.raw`);
}

async function lane(rng: Random, laneIndex: number, count: number, withQemu: boolean) {
  const dir = await Deno.makeTempDir({ prefix: `vmdk-crash-${laneIndex}-` });
  try {
    const path = `${dir}/disk.vmdk`;
    // Odd lanes: 4 KiB grains (4 grain tables) and no preallocated tables,
    // on a fresh image every few kills, so kills also land in table allocations.
    const onDemand = laneIndex % 2 === 1;
    let base: Uint8Array = new Uint8Array(size_bytes);
    for (let i = 0; i < count; i += 1) {
      if (i === 0 || (onDemand && i % fresh_image_every === 0)) {
        await Deno.remove(path).catch(() => {});
        createVmdk(path, size_bytes, {
          preallocateTables: !onDemand,
          grainBytes: onDemand ? 4096 : 65536,
        });
        base = new Uint8Array(size_bytes);
      }
      const seed = rng.int(0, 2 ** 31);
      const flushes = rng.int(0, kill_after_flushes_max);
      const delay = rng.int(0, kill_delay_ms_max);
      const what =
        `lane ${laneIndex} iteration ${i} (seed ${seed}, ${flushes} flushes + ${delay} ms)`;
      const expected = afterKill(
        base,
        seed,
        await crashOnce(path, `${dir}/${i}.log`, seed, flushes, delay),
      );
      stats.kills += 1;
      stats.answered += expected.answered;
      stats.answeredUnflushed += expected.answeredUnflushed;
      stats.leakedAfterKillMax = Math.max(stats.leakedAfterKillMax, await assertClean(path, what));
      base = await readImage(path);
      assertAnsweredWrites(base, expected, what);
      if (withQemu) await assertQemuAgrees(dir, path, base);
    }
    // A restarted writer, then a clean stop: what the last kill left is reclaimed.
    await (await openVmdk(path)).close();
    assert.equal(await assertClean(path, `lane ${laneIndex} after a clean reopen`), 0, "leaks");
    assert.deepEqual(await readImage(path), base, "recovery changed no guest byte");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("vmdk: SIGKILL at random points never corrupts the image or loses an answered write; leaks are reclaimed", async () => {
  const rng = testSeed("vmdk crash");
  const iterations = 200;
  const started = Date.now();
  await Promise.all(
    Array.from({ length: lanes }, (_, l) => lane(rng, l, iterations / lanes, false)),
  );
  console.log(`${iterations} kills in ${Date.now() - started} ms`, JSON.stringify(stats));
  assert.ok(stats.answered >= 2 * iterations, JSON.stringify(stats));
  assert.ok(stats.answeredUnflushed >= iterations / 2, JSON.stringify(stats));
  assert.ok(stats.leakedAfterKillMax > 0, "the kills left space to reclaim");
});

Deno.test({
  name: "vmdk: after SIGKILLs, qemu-img check passes and QEMU reads what we read",
  ignore: !HAVE_QEMU,
  fn: async () => {
    const rng = testSeed("vmdk crash qemu");
    await Promise.all(Array.from({ length: 2 }, (_, l) => lane(rng, l, 10, true)));
  },
});
