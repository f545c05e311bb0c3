/**
 * Block status through `blktap ctrl`: NBD clients see the holes the disk
 * process's driver reports over the ring (BLKTAP_OP_BLOCK_STATUS), the same
 * ones `qemu-img map` reads from the image file — also after the disk
 * process was killed and restarted.
 */
import assert from "node:assert/strict";
import { assertExportIs, CtrlHarness } from "../_helpers/ctrl_harness.ts";
import { blktap, missingTools, runOk } from "../_helpers/tools.ts";

const MiB = 1 << 20;
const peers = ["qemu-img", "qemu-io", "nbdinfo"];
const ignore = missingTools(...peers).length > 0;

interface Run {
  start: number;
  end: number;
  hole: boolean;
  zero: boolean;
}

// Neighbours with the same state merged: both tools may split runs differently.
function merged(runs: Run[]): Run[] {
  const out: Run[] = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    if (last && last.end === r.start && last.hole === r.hole && last.zero === r.zero) {
      last.end = r.end;
    } else out.push({ ...r });
  }
  return out;
}

async function nbdMap(h: CtrlHarness, name: string): Promise<Run[]> {
  const map = JSON.parse(await runOk("nbdinfo", ["--map", "--json", h.nbdUri(name)])) as {
    offset: number;
    length: number;
    type: number;
  }[];
  return merged(map.map((e) => ({
    start: e.offset,
    end: e.offset + e.length,
    hole: (e.type & 1) !== 0,
    zero: (e.type & 2) !== 0,
  })));
}

async function qemuMap(format: string, path: string): Promise<Run[]> {
  const map = JSON.parse(
    await runOk("qemu-img", ["map", "-U", "-f", format, "--output=json", path]),
  ) as { start: number; length: number; data: boolean; zero: boolean }[];
  return merged(map.map((m) => ({
    start: m.start,
    end: m.start + m.length,
    hole: !m.data,
    zero: m.zero,
  })));
}

// Kills minor 0's disk process and waits for ctrl to have started another.
async function killDisk(h: CtrlHarness): Promise<void> {
  const pid = await h.diskPid(0);
  Deno.kill(pid, "SIGKILL");
  for (let i = 0; i < 200; i += 1) {
    const [minor] = await h.list();
    if (typeof minor.pid === "number" && minor.pid !== pid && minor.state === "running") return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error("the disk process was not restarted");
}

Deno.test({
  name: "ctrl block status: a qcow disk maps as qemu-img maps its file, across a restart",
  ignore,
  fn: async () => {
    const h = await CtrlHarness.start();
    try {
      const image = `${h.dir}/disk.qcow`;
      const created = await blktap(["qcow-create", "32M", image]);
      assert.equal(created.code, 0, created.stderr);
      await h.request({ op: "create", image: `qcow:${image}` });
      const writes = ["write -P 0x11 0 64k", "write -P 0x22 20M 1M", "write -P 0x33 31M 4k"];
      await runOk("qemu-io", ["-f", "raw", ...writes.flatMap((w) => ["-c", w]), h.nbdUri("tap0")]);
      // Before any flush: only the disk process knows the new L2 entries.
      const before = await nbdMap(h, "tap0");
      assert.ok(before.some((r) => r.hole), JSON.stringify(before));
      for (const at of [0, 20 * MiB, 31 * MiB]) {
        assert.ok(before.some((r) => !r.hole && r.start <= at && at < r.end), `data at ${at}`);
      }
      await h.request({ op: "pause", minor: 0 }); // flushes: the file is now complete
      assert.deepEqual(before, await qemuMap("qcow", image), "qemu-img map is the oracle");
      await h.request({ op: "resume", minor: 0 });
      await killDisk(h);
      assert.deepEqual(await nbdMap(h, "tap0"), before, "the same after a restart");
      // Sparse structured reads: what QEMU reads through the export is the file.
      await assertExportIs(h, "tap0", image);
    } finally {
      await h.close();
    }
  },
});

Deno.test({
  name: "ctrl block status: a sparse raw disk's holes; a null disk maps as all data",
  ignore,
  fn: async () => {
    const h = await CtrlHarness.start();
    try {
      const image = `${h.dir}/disk.raw`;
      const file = await Deno.open(image, { create: true, write: true });
      await file.truncate(16 * MiB);
      for (const at of [0, 5 * MiB, 15 * MiB]) {
        await file.seek(at, Deno.SeekMode.Start);
        await file.write(new Uint8Array(256 << 10).fill(0x5a));
      }
      file.close();
      await h.request({ op: "create", image: `aio:${image}`, name: "raw" });
      await h.request({ op: "create", image: "null:8M", name: "null" });
      const raw = await nbdMap(h, "raw");
      assert.deepEqual(raw, await qemuMap("raw", image));
      assert.equal(raw.filter((r) => !r.hole).length, 3, JSON.stringify(raw));
      // The null driver has no extents: the disk process says EOPNOTSUPP.
      assert.deepEqual(await nbdMap(h, "null"), [
        { start: 0, end: 8 * MiB, hole: false, zero: false },
      ]);
      await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", h.nbdUri("raw"), image]);
    } finally {
      await h.close();
    }
  },
});
