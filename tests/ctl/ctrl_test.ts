import assert from "node:assert/strict";
import { blktap } from "../_helpers/tools.ts";
import { testSeed } from "../_helpers/random.ts";
import { DiskModel } from "../_helpers/load_model.ts";
import { haveQemu, qemuReadAll } from "../_helpers/qemu.ts";
import type { ModelRun } from "../../src/frontends/exercise/test_frontend.ts";
import {
  assertClean,
  CtrlHarness,
  type Load,
  qcowImage,
  rawImage,
} from "../_helpers/ctrl_harness.ts";

const MiB = 1 << 20;

Deno.test({
  name:
    "ctrl: 100,000+ verified requests over raw and qcow disks, sizes 1 KiB..1 MiB, depths 1..64, then every sector as QEMU reads the image",
  ignore: !haveQemu,
  fn: verifiedLoad,
});

async function verifiedLoad() {
  const rng = testSeed("ctrl load");
  const h = await CtrlHarness.start();
  try {
    const raw = await rawImage(h.dir, "a.raw", 64 * MiB);
    const qcow = await qcowImage(h.dir, "b.qcow", 64);
    const { minor: rawMinor } = await h.request({ op: "create", image: `aio:${raw}` });
    const { minor: qcowMinor } = await h.request({
      op: "create",
      image: `qcow:${qcow}`,
      name: "q",
    });
    const plan: [unknown, number, number][] = [
      [rawMinor, 1, 4000],
      [rawMinor, rng.int(2, 63), 30_000],
      [rawMinor, 64, 30_000],
      [qcowMinor, 1, 2000],
      [qcowMinor, rng.int(2, 63), 15_000],
      [qcowMinor, 64, 20_000],
    ];
    let total = 0;
    const models = new Map([[rawMinor, new DiskModel(64 * MiB)], [
      qcowMinor,
      new DiskModel(64 * MiB),
    ]]);
    // Each disk runs its plan in order; the two disks run at the same time.
    const runDisk = async (minor: unknown) => {
      let first = true;
      for (const [m, depth, requests] of plan) {
        if (m !== minor) continue;
        const seed = rng.int(0, 2 ** 31);
        const result = await h.request({
          op: "exercise",
          minor,
          depth,
          requests,
          indirectFraction: 0.05,
          discardFraction: 0.01,
          initialZero: first, // both images start zeroed: unwritten sectors are checked too
          returnModel: true,
          seed,
        }) as Load & { model: ModelRun[] };
        assertClean(result, `minor ${minor} depth ${depth} seed ${seed}`);
        assert.ok(result.verifiedSectors > 0);
        models.get(minor)!.apply(result.model);
        total += result.requests;
        first = false;
      }
    };
    await Promise.all([runDisk(rawMinor), runDisk(qcowMinor)]);
    console.log(`verified requests: ${total}`);
    assert.ok(total >= 100_000);
    const stats = await h.request({ op: "stats", minor: rawMinor }) as {
      disk: { errors: number; ops: { read: number } };
    };
    assert.equal(stats.disk.errors, 0);
    assert.ok(stats.disk.ops.read > 10_000);
    // Detached (drained, flushed, closed): every sector of each image, read
    // by QEMU from the file, is what the models say, written or not.
    await h.request({ op: "destroy", minor: rawMinor });
    await h.request({ op: "destroy", minor: qcowMinor });
    models.get(rawMinor)!.assertMatches(await qemuReadAll(raw, h.dir, "raw"), "raw image");
    models.get(qcowMinor)!.assertMatches(await qemuReadAll(qcow, h.dir, "qcow"), "qcow image");
  } finally {
    await h.close();
  }
}

Deno.test("ctrl: 100,000 malformed ring entries through a disk process, each refused, valid load unharmed", async () => {
  const rng = testSeed("ctrl fuzz");
  const h = await CtrlHarness.start();
  try {
    const raw = await rawImage(h.dir, "a.raw", 16 * MiB);
    const { minor } = await h.request({ op: "create", image: `aio:${raw}` });
    const pid = await h.diskPid(minor as number);
    const [fuzz, load] = await Promise.all([
      h.request({ op: "fuzz", minor, entries: 100_000, depth: 32, seed: rng.int(0, 2 ** 31) }),
      h.request({
        op: "exercise",
        minor,
        requests: 20_000,
        depth: 16,
        indirectFraction: 0.05,
        seed: rng.int(0, 2 ** 31),
      }),
    ]);
    assert.equal(fuzz.entries, 100_000);
    assert.equal(fuzz.acceptedMalformed, 0, String(fuzz.firstWrong));
    assert.equal(fuzz.wrongStatus, 0, String(fuzz.firstWrong));
    assertClean(load as Load, "load beside fuzz");
    assert.equal(await h.diskPid(minor as number), pid, "the disk process kept running");
    const stats = await h.request({ op: "stats", minor }) as { disk: { invalid: number } };
    assert.equal(stats.disk.invalid, 100_000);
  } finally {
    await h.close();
  }
});

Deno.test("ctrl: a new ctrl re-attaches every disk of the registry", async () => {
  const h = await CtrlHarness.start();
  try {
    const a = await rawImage(h.dir, "a.raw", 8 * MiB);
    await h.request({ op: "create", image: `aio:${a}`, name: "alpha" });
    await h.request({ op: "create", image: `null:1G`, name: "beta", readOnly: true });
    const before = await h.list();
    await h.killCtrl();
    await h.startCtrl();
    const after = await h.list();
    assert.deepEqual(after.map((m) => [m.minor, m.name, m.state, m.image, m.readOnly]), [
      [0, "alpha", "running", `aio:${a}`, false],
      [1, "beta", "running", "null:1G", true],
    ]);
    for (const m of after) assert.notEqual(m.pid, before.find((b) => b.minor === m.minor)!.pid);
    const result = await h.request({
      op: "exercise",
      minor: "alpha",
      requests: 3000,
      depth: 8,
      seed: 7,
    }) as Load;
    assertClean(result, "after re-attach");
  } finally {
    await h.close();
  }
});

Deno.test("ctrl: pause holds new requests, resume serves them on a new image", async () => {
  const h = await CtrlHarness.start();
  try {
    const a = await rawImage(h.dir, "a.raw", 8 * MiB);
    const b = await rawImage(h.dir, "b.raw", 8 * MiB);
    const { minor } = await h.request({ op: "create", image: `aio:${a}` });
    await h.request({ op: "pause", minor });
    assert.equal((await h.list())[0].state, "paused");
    let done = false;
    const load = h.request({ op: "exercise", minor, requests: 500, depth: 4, seed: 3 }).finally(
      () => done = true,
    );
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(done, false, "requests waited while paused");
    await h.request({ op: "resume", minor, image: `aio:${b}` });
    assertClean(await load as Load, "after resume");
    const [m] = await h.list();
    assert.equal(m.state, "running");
    assert.equal(m.image, `aio:${b}`);
    // The writes went to the new image.
    const data = await Deno.readFile(b);
    assert.ok(data.some((x) => x !== 0));
  } finally {
    await h.close();
  }
});

Deno.test("ctrl: a disk that keeps crashing is failed, its requests get errors, others are unaffected", async () => {
  const h = await CtrlHarness.start(["--restart-limit", "3", "--restart-window", "60"]);
  try {
    const a = await rawImage(h.dir, "a.raw", 8 * MiB);
    const b = await rawImage(h.dir, "b.raw", 8 * MiB);
    const { minor } = await h.request({ op: "create", image: `aio:${a}` });
    const { minor: other } = await h.request({ op: "create", image: `aio:${b}` });
    const otherPid = await h.diskPid(other as number);
    // Ends soon after the disk fails (100 errors); the duration is only a bound.
    const doomed = h.request({
      op: "exercise",
      minor,
      durationMs: 180_000,
      depth: 8,
      seed: 5,
      maxErrors: 100,
    }) as Promise<Load>;
    const healthy = h.request({
      op: "exercise",
      minor: other,
      durationMs: 3000,
      depth: 8,
      seed: 6,
    }) as Promise<Load>;
    let kills = 0;
    const killed = new Set<number>();
    // Until ctrl gives up; bounded by time, not kills: a restart can take
    // seconds on a loaded machine (the restart window is 60 s).
    const deadline = Date.now() + 150_000;
    while (Date.now() < deadline) {
      const m = (await h.list()).find((x) => x.minor === minor)!;
      if (m.state === "failed") break;
      if (typeof m.pid === "number" && m.state === "running" && !killed.has(m.pid)) {
        killed.add(m.pid);
        Deno.kill(m.pid, "SIGKILL");
        kills += 1;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(kills >= 4, `failed after ${kills} deaths (restart limit 3 in 60 s)`);
    const result = await doomed;
    assert.ok(result.errors > 0, "requests of a failed disk are answered with errors");
    assert.equal(result.mismatches, 0);
    const m = (await h.list()).find((x) => x.minor === minor)!;
    assert.equal(m.state, "failed");
    assertClean(await healthy, "other disk");
    assert.equal(await h.diskPid(other as number), otherPid);
  } finally {
    await h.close();
  }
});

Deno.test("ctrl: CLI verbs print what scripts parse", async () => {
  const h = await CtrlHarness.start();
  const run = (...args: string[]) => blktap([...args, "--run-dir", h.runDir]);
  try {
    const a = await rawImage(h.dir, "a.raw", 4 * MiB);
    const created = await run(
      "create",
      `aio:${a}`,
      "--name",
      "disk-a",
      "--cache",
      "writeback",
      "--max-iops",
      "100000",
    );
    assert.equal(created.code, 0, created.stderr);
    assert.equal(created.stdout, `0\nnbd+unix:///disk-a?socket=${h.runDir}/nbd.sock\n`);
    const missing = await run("create", `aio:${h.dir}/nope.raw`);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /nope\.raw/);
    const list = JSON.parse((await run("list", "--json")).stdout);
    assert.equal(list.length, 1, "the failed create left no minor");
    assert.equal(list[0].name, "disk-a");
    assert.equal(list[0].cache, "writeback");
    assert.match((await run("list")).stdout, /^MINOR\s+NAME\s+PID\s+STATE/);
    const exercise = await run("exercise", "disk-a", "--requests", "200", "--json");
    assert.equal(exercise.code, 0, exercise.stderr);
    assert.equal(JSON.parse(exercise.stdout).requests, 200);
    const stats = JSON.parse((await run("stats", "0", "--json")).stdout);
    assert.ok(stats.disk.ops.read + stats.disk.ops.write > 0);
    assert.equal((await run("pause", "0")).code, 0);
    assert.equal((await run("resume", "0")).code, 0);
    assert.equal((await run("destroy", "0")).code, 0);
    assert.deepEqual(JSON.parse((await run("list", "--json")).stdout), []);
    const mode = (await Deno.stat(`${h.runDir}/ctrl.sock`)).mode! & 0o777;
    assert.equal(mode, 0o600);
  } finally {
    await h.close();
  }
});
