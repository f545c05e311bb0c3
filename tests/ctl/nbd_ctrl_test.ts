/**
 * NBD through `blktap ctrl`: real clients (qemu-io, qemu-img, nbdinfo,
 * nbdcopy) reach disks over the ring and disk processes, including while
 * a disk process is being killed.
 */
import assert from "node:assert/strict";
import { assertExportIs, CtrlHarness, rawImage } from "../_helpers/ctrl_harness.ts";
import { blktap, missingTools, run, runOk, sha256File } from "../_helpers/tools.ts";

const MiB = 1 << 20;
const peers = ["qemu-img", "qemu-io", "nbdinfo", "nbdcopy"];
const ignore = missingTools(...peers).length > 0;

async function randomFile(path: string, sizeBytes: number): Promise<void> {
  const data = new Uint8Array(sizeBytes);
  for (let i = 0; i < sizeBytes; i += 65536) crypto.getRandomValues(data.subarray(i, i + 65536));
  await Deno.writeFile(path, data);
}

Deno.test({
  name: "ctrl nbd: a qcow disk takes qemu-io patterns, maps its holes, and compares equal",
  ignore,
  fn: async () => {
    const h = await CtrlHarness.start();
    try {
      const image = `${h.dir}/disk.qcow`;
      const created = await blktap(["qcow-create", "32M", image]);
      assert.equal(created.code, 0, created.stderr);
      const { uri: exportUri } = await h.request({ op: "create", image: `qcow:${image}` });
      assert.equal(exportUri, h.nbdUri("tap0"));
      await runOk("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 64k",
        "-c",
        "write -P 0x22 20M 1M",
        "-c",
        "read -P 0x11 0 64k",
        "-c",
        "read -P 0 64k 1M",
        h.nbdUri("tap0"),
      ]);
      const map = await runOk("nbdinfo", ["--map", "--json", h.nbdUri("tap0")]);
      const extents = JSON.parse(map) as { offset: number; length: number; type: number }[];
      const data = extents.filter((e) => (e.type & 1) === 0);
      assert.deepEqual(
        data.map((e) => [e.offset, e.offset + e.length]).filter(([s]) => s < 32 * MiB),
        [[0, 2 * MiB], [20 * MiB, 22 * MiB]],
        "data where written (2 MiB extents, the blktap qcow layout); holes elsewhere",
      );
      // After a flush the image on disk is what QEMU reads through the export.
      await h.request({ op: "pause", minor: 0 });
      await h.request({ op: "resume", minor: 0 });
      await assertExportIs(h, "tap0", image);
    } finally {
      await h.close();
    }
  },
});

Deno.test({
  name: "ctrl nbd: nbdcopy finishes without error while its disk process is SIGKILLed",
  ignore,
  fn: async () => {
    // QoS slows the copy to ~2 s so the kills land in the middle of it.
    const h = await CtrlHarness.start(["--restart-limit", "100"]);
    try {
      const source = `${h.dir}/source.raw`;
      await randomFile(source, 96 * MiB);
      const target = await rawImage(h.dir, "target.raw", 96 * MiB);
      await h.request({ op: "create", image: `aio:${target}`, maxBps: 48 * MiB, burstMs: 100 });
      const copy = new Deno.Command("nbdcopy", {
        args: ["--flush", source, h.nbdUri("tap0")],
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      let kills = 0;
      const copied = copy.output();
      for (let i = 0; i < 4; i += 1) {
        await new Promise((r) => setTimeout(r, 350));
        const pid = await h.diskPid(0).catch(() => undefined);
        if (pid === undefined) continue;
        try {
          Deno.kill(pid, "SIGKILL");
          kills += 1;
        } catch {
          // already restarting
        }
      }
      const out = await copied;
      assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
      assert.ok(kills >= 3, `killed ${kills} times`);
      const [minor] = await h.list();
      assert.ok((minor.restarts as number) >= 3, `restarts: ${minor.restarts}`);
      await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, h.nbdUri("tap0")]);
      await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target]);
    } finally {
      await h.close();
    }
  },
});

Deno.test({
  name: "ctrl nbd: nbdcopy out of a read-only export, and writes to it are refused",
  ignore,
  fn: async () => {
    const h = await CtrlHarness.start();
    try {
      const source = `${h.dir}/source.raw`;
      await randomFile(source, 8 * MiB);
      // An independent copy of what the image held before it was served.
      const before = `${h.dir}/before.raw`;
      await Deno.copyFile(source, before);
      const digest = await sha256File(source);
      await h.request({ op: "create", image: `aio:${source}`, name: "golden", readOnly: true });
      const copy = `${h.dir}/copy.raw`;
      await runOk("nbdcopy", [h.nbdUri("golden"), copy]);
      await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", before, copy]);
      for (const command of ["write -P 0x5a 0 4k", "write -z 1M 64k", "discard 2M 64k"]) {
        const write = await run("qemu-io", ["-f", "raw", "-c", command, h.nbdUri("golden")]);
        assert.match(
          write.stdout + write.stderr,
          /read-only|Operation not permitted|denied/i,
          `qemu-io '${command}' on a read-only export: ${write.stdout}${write.stderr}`,
        );
      }
      // Nothing reached the image: through the export and in the file itself.
      await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", before, h.nbdUri("golden")]);
      const list = await runOk("nbdinfo", ["--list", `nbd+unix:///?socket=${h.runDir}/nbd.sock`]);
      assert.match(list, /export="golden"/);
      assert.match(list, /is_read_only: true/);
      await h.request({ op: "destroy", minor: "golden" });
      assert.equal(await sha256File(source), digest, "the read-only image is unchanged");
    } finally {
      await h.close();
    }
  },
});
