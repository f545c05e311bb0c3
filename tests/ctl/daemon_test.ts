/**
 * What ctrl exposes on the host: its run dir must be private, its sockets
 * are 0600 from the moment they exist, a ring device path it finds
 * replaced by a symbolic link on re-attach is never followed, and a
 * restarted ctrl serves a ring only once the last ctrl's disk process on it
 * is gone.
 */
import assert from "node:assert/strict";
import { selfCommand, selfCommandFor } from "../../src/cli/self_command.ts";
import { ctlRequest } from "../../src/ctl/client.ts";
import { sha256File } from "../_helpers/tools.ts";
import { assertExportIs, CtrlHarness, rawImage, waitRunning } from "../_helpers/ctrl_harness.ts";
import { existsSync } from "node:fs";

const MiB = 1 << 20;

/** Runs `blktap ctrl` on `runDir` to its end (it must refuse to start); stops it otherwise. */
async function ctrlRefusal(runDir: string): Promise<{ code: number; stderr: string }> {
  const child = selfCommandFor(["ctrl", "--run-dir", runDir, "--no-nbd"], {
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
  try {
    const out = await child.output();
    return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
  } finally {
    clearTimeout(timer);
  }
}

Deno.test("ctrl: an existing run dir with another owner or with group/other access is refused, naming it", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-rundir-" });
  try {
    const open = `${dir}/open`;
    await Deno.mkdir(open, { mode: 0o755 });
    await Deno.chmod(open, 0o755);
    const refused = await ctrlRefusal(open);
    assert.equal(refused.code, 1);
    assert.match(
      refused.stderr,
      new RegExp(`run dir ${open} has mode 0755: group or others have access \\(expected 0700\\)`),
    );
    const foreign = `${dir}/foreign`;
    await Deno.mkdir(foreign, { mode: 0o700 });
    await Deno.chown(foreign, 65534, 65534);
    const refusedForeign = await ctrlRefusal(foreign);
    assert.equal(refusedForeign.code, 1);
    assert.match(refusedForeign.stderr, new RegExp(`run dir ${foreign} is owned by uid 65534`));
    for (const d of [open, foreign]) {
      assert.deepEqual([...Deno.readDirSync(d)], [], `nothing created in ${d}`);
    }
    const link = `${dir}/link`;
    await Deno.symlink(open, link);
    assert.match((await ctrlRefusal(link)).stderr, /run dir .*link is a symbolic link/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("ctrl: ctrl.sock, disks.sock and nbd.sock are 0600 from the start, even under umask 000", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-sockets-" });
  const runDir = `${dir}/run`;
  // The socket modes must not depend on the umask ctrl inherits.
  const child = new Deno.Command("sh", {
    args: [
      "-c",
      'umask 000; exec "$@"',
      "sh",
      ...selfCommand(),
      "ctrl",
      "--run-dir",
      runDir,
      "--shm-dir",
      dir,
      "--log-level",
      "warn",
    ],
    stdin: "null",
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  try {
    for (let i = 0; i < 200; i += 1) {
      const up = await ctlRequest(runDir, { op: "list" }).then(() => true, () => false);
      if (up && await Deno.stat(`${runDir}/nbd.sock`).then(() => true, () => false)) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal((await Deno.stat(runDir)).mode! & 0o777, 0o700, "run dir");
    for (const name of ["ctrl.sock", "disks.sock", "nbd.sock"]) {
      const info = await Deno.lstat(`${runDir}/${name}`);
      assert.ok(info.isSocket, name);
      assert.equal((info.mode! & 0o777).toString(8), "600", name);
    }
  } finally {
    child.kill("SIGKILL");
    await child.status;
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("ctrl: a symbolic link found at a disk's ring device on restart is not followed", async () => {
  const h = await CtrlHarness.start();
  try {
    const image = await rawImage(h.dir, "a.raw", 4 * MiB);
    const { minor } = await h.request({ op: "create", image: `aio:${image}`, name: "a" });
    const load = await h.request({ op: "exercise", minor, requests: 200, seed: 1 });
    assert.equal(load.errors, 0);
    await h.killCtrl();
    const registryPath = `${h.runDir}/registry.json`;
    const ringPath = JSON.parse(await Deno.readTextFile(registryPath)).minors[0].shmPath as string;
    assert.ok(ringPath.startsWith(`${h.shmDir}/`), ringPath);
    // The ring folder is this ctrl's own: 0700, ours.
    const ringDir = ringPath.slice(0, ringPath.lastIndexOf("/"));
    assert.equal((await Deno.stat(ringDir)).mode! & 0o777, 0o700);
    // Someone swaps the ring device for a link to a file of exactly its size.
    const victim = `${h.dir}/victim`;
    const size = (await Deno.stat(ringPath)).size;
    const file = await Deno.open(victim, { write: true, create: true });
    await file.write(new Uint8Array(64 << 10).fill(0xa5));
    await file.truncate(size);
    file.close();
    const before = await sha256File(victim);
    await Deno.remove(ringPath);
    await Deno.symlink(victim, ringPath);
    await h.startCtrl();
    const [m] = await h.list();
    assert.equal(m.state, "running");
    const again = await h.request({ op: "exercise", minor, requests: 200, seed: 2 });
    assert.equal(again.errors, 0);
    assert.equal(again.mismatches, 0);
    await assertExportIs(h, "a", image);
    assert.equal(await sha256File(victim), before, "the link's target was written");
    const newRing = JSON.parse(await Deno.readTextFile(registryPath)).minors[0].shmPath;
    assert.notEqual(newRing, ringPath, "served on a new ring device");
    assert.ok((await Deno.lstat(ringPath)).isSymlink, "the link itself is left alone");
  } finally {
    await h.close();
  }
});

Deno.test({
  name:
    "ctrl: a minor whose front end is gone on restart stays registered, listed as failed, keeping its number",
  // With the module loaded the kernel minor would simply be found again.
  ignore: existsSync("/dev/blktap-control"),
  fn: async () => {
    const h = await CtrlHarness.start();
    try {
      const kept = await rawImage(h.dir, "kept.raw", 4 * MiB);
      const lost = await rawImage(h.dir, "lost.raw", 4 * MiB);
      await h.request({ op: "create", image: `aio:${kept}`, name: "kept" });
      const { minor } = await h.request({ op: "create", image: `aio:${lost}`, name: "lost" });
      await h.killCtrl();
      const registryPath = `${h.runDir}/registry.json`;
      const rewrite = async (edit: (record: Record<string, unknown>) => void) => {
        const registry = JSON.parse(await Deno.readTextFile(registryPath));
        edit(registry.minors.find((r: { minor: number }) => r.minor === minor));
        await Deno.writeTextFile(registryPath, JSON.stringify(registry));
      };
      // As if it were a kernel minor and the module is not loaded now.
      await rewrite((record) => record.kernelMinor = 3);
      await h.startCtrl();
      const lostNow = (await h.list()).find((m) => m.minor === minor)!;
      assert.equal(lostNow?.state, "failed");
      assert.match(String(lostNow.unavailable), /re-attach failed: .*blktap-control/);
      const created = await h.request({ op: "create", image: "null:4M", name: "new" });
      assert.notEqual(created.minor, minor, "a new disk took the number of a registered one");
      const saved = JSON.parse(await Deno.readTextFile(registryPath)).minors;
      assert.deepEqual(saved.map((r: { name: string }) => r.name).sort(), ["kept", "lost", "new"]);
      await h.killCtrl();
      await rewrite((record) => delete record.kernelMinor);
      await h.startCtrl();
      await waitRunning(h.runDir);
      const load = await h.request({ op: "exercise", minor, requests: 200, seed: 3 });
      assert.equal(load.errors, 0);
      assert.equal(load.mismatches, 0);
    } finally {
      await h.close();
    }
  },
});

/** Pids of live disk processes of `minor` under `runDir`, by their command lines. */
function diskProcesses(runDir: string, minor: number): number[] {
  const pids: number[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const argv = Deno.readTextFileSync(`/proc/${entry.name}/cmdline`).split("\0");
      const at = argv.indexOf("disk");
      const state = Deno.readTextFileSync(`/proc/${entry.name}/stat`).split(") ")[1];
      if (state.startsWith("Z")) continue;
      if (at >= 0 && argv[at + 2] === String(minor) && argv[at + 4]?.startsWith(runDir)) {
        pids.push(Number(entry.name));
      }
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

Deno.test("ctrl: a restart, with the run dir spelled otherwise, lets the old disk process drain before it serves the ring", async () => {
  const h = await CtrlHarness.start();
  let old: number | undefined;
  try {
    const image = await rawImage(h.dir, "a.raw", 16 * MiB);
    const { minor } = await h.request({ op: "create", image: `aio:${image}`, name: "a" });
    old = await h.diskPid(minor as number);
    const load = h.request({ op: "exercise", minor, durationMs: 20_000, depth: 32, seed: 3 })
      .catch(() => {});
    await new Promise((r) => setTimeout(r, 1000));
    // A disk process slow to drain (stopped, with requests in flight) when ctrl dies.
    Deno.kill(old, "SIGSTOP");
    await h.killCtrl();
    await load;
    const restarted = h.startCtrl(["--run-dir", `${h.runDir}/`]);
    await new Promise((r) => setTimeout(r, 4000));
    const serving = diskProcesses(h.runDir, minor as number);
    Deno.kill(old, "SIGCONT");
    assert.deepEqual(serving, [old], "a second disk process served the ring beside the old one");
    await restarted;
    await waitRunning(h.runDir, { replacing: [old] });
    const again = await h.request({ op: "exercise", minor, requests: 2000, depth: 32, seed: 4 });
    assert.equal(again.errors, 0, String(again.firstError));
    assert.equal(again.mismatches, 0, String(again.firstError));
    const [m] = await h.list();
    assert.deepEqual([m.state, m.restarts], ["running", 0]);
  } finally {
    if (old !== undefined) {
      try {
        Deno.kill(old, "SIGCONT");
      } catch {
        // gone
      }
    }
    await h.close();
  }
});
