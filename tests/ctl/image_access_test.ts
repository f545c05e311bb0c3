/**
 * Who may open an image through ctrl: one writer (ctrl names the minor that
 * holds it; the QEMU-compatible locks held by disk processes stop QEMU and
 * everyone else), read-only users share, and backing files outside the
 * image's folder only with --allow-path (on create, or for all of ctrl).
 */
import assert from "node:assert/strict";
import { CtrlHarness, qcowImage, rawImage, waitRunning } from "../_helpers/ctrl_harness.ts";
import { blktap, missingTools, run } from "../_helpers/tools.ts";
import { qemuHolding } from "../_helpers/qemu_hold.ts";
import { REGISTRY_NAME } from "../../src/cli/run_dir.ts";

const MiB = 1 << 20;
const noQemu = missingTools("qemu-img", "qemu-io").length > 0;

async function refused(h: CtrlHarness, request: Record<string, unknown>): Promise<string> {
  try {
    await h.request({ op: "create", ...request });
  } catch (error) {
    return (error as Error).message;
  }
  throw new Error(`create ${JSON.stringify(request)} was not refused`);
}

Deno.test("ctrl: one writer per image, under any spelling, named when refused; readers share", async () => {
  const h = await CtrlHarness.start();
  try {
    await Deno.mkdir(`${h.dir}/img`);
    const path = await rawImage(`${h.dir}/img`, "disk.raw", 4 * MiB);
    await Deno.symlink(path, `${h.dir}/alias.raw`);
    const spellings = [`${h.dir}/alias.raw`, `aio:${h.dir}/img/../img/disk.raw`, `sync:${path}`];
    await h.request({ op: "create", image: `aio:${path}`, name: "vm" });
    for (const image of spellings) {
      assert.match(await refused(h, { image }), /in use: minor 0 \(vm\) has it read-write/);
      assert.match(
        await refused(h, { image, readOnly: true }),
        /in use: minor 0 \(vm\) has it read-write/,
      );
    }
    await h.request({ op: "destroy", minor: "vm" });
    await h.request({ op: "create", image: `aio:${path}`, readOnly: true });
    await h.request({ op: "create", image: spellings[0], readOnly: true });
    assert.match(
      await refused(h, { image: spellings[1] }),
      /in use: minor 0 \(tap0\) has it read-only/,
    );
    const minors = await h.list();
    assert.deepEqual(minors.map((m) => [m.minor, m.state, m.readOnly]), [
      [0, "running", true],
      [1, "running", true],
    ]);
    // Concurrent creates: one writer wins, other images get their own minors.
    const other = await rawImage(`${h.dir}/img`, "other.raw", 4 * MiB);
    const third = await rawImage(`${h.dir}/img`, "third.raw", 4 * MiB);
    const results = await Promise.allSettled([
      h.request({ op: "create", image: `aio:${other}` }),
      h.request({ op: "create", image: other }),
      h.request({ op: "create", image: `aio:${third}` }),
    ]);
    assert.deepEqual(results.map((r) => r.status).sort(), ["fulfilled", "fulfilled", "rejected"]);
    assert.deepEqual((await h.list()).map((m) => m.minor), [0, 1, 2, 3]);
  } finally {
    await h.close();
  }
});

Deno.test({
  name:
    "ctrl: an image QEMU writes is refused; QEMU cannot write what a minor serves, also after a restart",
  ignore: noQemu,
  fn: async () => {
    const h = await CtrlHarness.start();
    try {
      const raw = await rawImage(h.dir, "disk.raw", 4 * MiB);
      const holder = await qemuHolding(["qemu-io", "-f", "raw", raw], raw);
      try {
        const message = await refused(h, { image: `aio:${raw}` });
        assert.match(message, /disk\.raw: Failed to get shared "write" lock: the image is in use/);
      } finally {
        await holder.stop();
      }
      await h.request({ op: "create", image: `aio:${raw}` });
      const qcow = await qcowImage(h.dir, "disk.qcow", 4);
      await h.request({ op: "create", image: `qcow:${qcow}` });
      const check = async (when: string) => {
        const write = await run("qemu-io", ["-f", "raw", "-c", "write 0 512", raw]);
        assert.match(write.stderr, /Failed to get "write" lock/, when);
        const info = await run("qemu-img", ["info", qcow]);
        assert.match(info.stderr, /Failed to get shared "write" lock/, when);
        assert.equal((await run("qemu-img", ["info", "-U", qcow])).code, 0, when);
      };
      await check("served");
      const pids = [await h.diskPid(0), await h.diskPid(1)];
      for (const pid of pids) Deno.kill(pid, "SIGKILL");
      await waitRunning(h.runDir, { replacing: pids });
      await check("served by restarted disk processes");
    } finally {
      await h.close();
    }
  },
});

Deno.test("ctrl: a backing file outside the image's folder needs --allow-path, on create or for ctrl", async () => {
  const h = await CtrlHarness.start();
  try {
    await Deno.mkdir(`${h.dir}/images`);
    await Deno.mkdir(`${h.dir}/shared`);
    const base = await rawImage(`${h.dir}/shared`, "base.raw", 4 * MiB);
    const overlay = `${h.dir}/images/vm.qcow`;
    for (const name of ["vm.qcow", "vm2.qcow"]) {
      const created = await blktap(["qcow-create", "4", `${h.dir}/images/${name}`, base]);
      assert.equal(created.code, 0, created.stderr);
    }
    const message = await refused(h, { image: `qcow:${overlay}` });
    assert.match(message, /vm\.qcow: refusing backing file .*shared\/base\.raw named by the image/);
    assert.match(message, /lies outside .*images; to allow it, pass --allow-path DIR/);
    const cli = await blktap([
      "create",
      `qcow:${overlay}`,
      "--allow-path",
      `${h.dir}/shared`,
      "--run-dir",
      h.runDir,
    ]);
    assert.equal(cli.code, 0, cli.stderr);
    const usage = await blktap(["create", overlay, "--allow-path", `${h.dir}/nowhere`]);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /--allow-path .*nowhere: not a folder/);
    const registry = JSON.parse(await Deno.readTextFile(`${h.runDir}/${REGISTRY_NAME}`));
    assert.deepEqual(registry.minors[0].allowPaths, [`${h.dir}/shared`]);
    // Restarted with ctrl's own --allow-path: every minor may use the folder.
    await h.killCtrl();
    await h.startCtrl(["--allow-path", `${h.dir}/shared`]);
    await h.request({ op: "create", image: `qcow:${h.dir}/images/vm2.qcow` });
    assert.equal((await waitRunning(h.runDir)).length, 2);
  } finally {
    await h.close();
  }
});

Deno.test("ctrl: resume on a snapshot overlay of the served image; a failed resume keeps the old one", async () => {
  const h = await CtrlHarness.start();
  try {
    const base = await rawImage(h.dir, "base.raw", 4 * MiB);
    await h.request({ op: "create", image: `aio:${base}`, name: "vm" });
    await h.request({ op: "pause", minor: "vm" });
    const overlay = `${h.dir}/snap.qcow`;
    const created = await blktap(["qcow-create", "4", overlay, base]);
    assert.equal(created.code, 0, created.stderr);
    // The served image's write lock would refuse the overlay's backing read lock.
    const resumed = await h.request({ op: "resume", minor: "vm", image: overlay });
    assert.deepEqual([resumed.image, resumed.probed], [`qcow:${overlay}`, true]);
    await h.request({ op: "pause", minor: "vm" });
    await assert.rejects(
      h.request({ op: "resume", minor: "vm", image: `qcow:${h.dir}/missing.qcow` }),
      /missing\.qcow/,
    );
    const [minor] = await h.list();
    assert.deepEqual([minor.state, minor.image], ["paused", `qcow:${overlay}`]);
    await h.request({ op: "resume", minor: "vm" });
    const exercised = await h.request({ op: "exercise", minor: "vm", requests: 200 });
    assert.equal(exercised.errors, 0, String(exercised.firstError));
  } finally {
    await h.close();
  }
});
