/**
 * `blktap map` against `qemu-img map --output=json` for raw, vmdk and qcow
 * images (with backing chains): the same start, length, depth, present,
 * zero and data on every range, and the same offset wherever we give one.
 */
import assert from "node:assert/strict";
import { createVmdk } from "../../src/formats/vmdk/create.ts";
import { openImage } from "../../src/formats/open_image.ts";
import { type MapEntry, mapImage } from "../../src/tools/map.ts";
import { testSeed } from "../_helpers/random.ts";
import { blktap } from "../_helpers/tools.ts";
import { haveQemu, qemuCreate, qemuIo, qemuMap } from "../_helpers/qemu.ts";

/** Entries merged where only the (unknown to one side) host offset differs. */
function flagRuns(entries: MapEntry[]) {
  const runs: Omit<MapEntry, "offset">[] = [];
  for (const { offset: _offset, ...e } of entries) {
    const last = runs[runs.length - 1];
    const same = last && last.depth === e.depth && last.present === e.present &&
      last.zero === e.zero && last.data === e.data && last.start + last.length === e.start;
    if (same) last.length += e.length;
    else runs.push({ ...e });
  }
  return runs;
}

/**
 * Same depth/present/zero/data on every byte, and wherever we give an
 * offset, QEMU gives the same one. (QEMU splits entries where host offsets
 * jump; formats that do not tell us their offsets cannot, hence the merge.)
 */
function assertSameMap(ours: MapEntry[], qemu: MapEntry[], what: string) {
  assert.deepEqual(flagRuns(ours), flagRuns(qemu), `${what}: ranges`);
  for (const e of ours) {
    if (e.offset === undefined) continue;
    for (const q of qemu) {
      if (q.start + q.length <= e.start || e.start + e.length <= q.start) continue;
      const at = Math.max(q.start, e.start);
      assert.equal(
        e.offset + (at - e.start),
        q.offset === undefined ? undefined : q.offset + (at - q.start),
        `${what}: offset at ${at}`,
      );
    }
  }
}

Deno.test({
  name: "map: raw, vmdk and qcow chains agree with qemu-img map",
  ignore: !haveQemu,
  async fn() {
    const rng = testSeed("map vs qemu");
    const dir = await Deno.makeTempDir({ prefix: "blktap-map-" });
    try {
      // raw: data at 4 KiB-aligned places (file system block granularity).
      const raw = `${dir}/base.raw`;
      await qemuCreate(raw, "raw", "16M");
      const rawWrites = Array.from({ length: 6 }, () => {
        const offset = rng.int(0, 4000) * 4096;
        return `write -P ${rng.int(1, 255)} ${offset} ${rng.int(1, 40) * 4096}`;
      });
      await qemuIo(raw, "raw", rawWrites);
      assertSameMap(await mapImage(raw), await qemuMap(raw, "raw"), "raw");

      // vmdk written by us, at random unaligned places.
      const vmdk = `${dir}/ours.vmdk`;
      createVmdk(vmdk, 16 << 20);
      const driver = await openImage(vmdk);
      for (let i = 0; i < 20; i += 1) {
        const length = rng.int(1, 150_000);
        await driver.write(rng.int(0, (16 << 20) - length), new Uint8Array(length).fill(9));
      }
      await driver.close();
      assertSameMap(await mapImage(vmdk), await qemuMap(vmdk), "vmdk");

      // qcow over raw, and qcow over qcow over raw.
      const qcowWrites = (n: number) =>
        Array.from({ length: n }, () => {
          const length = rng.int(1, 30) * 4096;
          return `write -P ${rng.int(1, 255)} ${rng.int(0, 3000) * 4096} ${length}`;
        });
      const mid = `${dir}/mid.qcow`;
      const top = `${dir}/top.qcow`;
      await qemuCreate(mid, "qcow", undefined, { name: "base.raw", format: "raw" });
      await qemuIo(mid, "qcow", qcowWrites(8));
      await qemuCreate(top, "qcow", undefined, { name: "mid.qcow", format: "qcow" });
      await qemuIo(top, "qcow", qcowWrites(8));
      assertSameMap(await mapImage(mid), await qemuMap(mid), "qcow over raw");
      assertSameMap(await mapImage(top), await qemuMap(top), "qcow over qcow over raw");
      const alone = `${dir}/alone.qcow`;
      await qemuCreate(alone, "qcow", "16M");
      await qemuIo(alone, "qcow", qcowWrites(5));
      assertSameMap(await mapImage(alone), await qemuMap(alone), "qcow");

      // The CLI prints the same JSON.
      const cli = await blktap(["map", "--json", top]);
      assert.equal(cli.code, 0, cli.stderr);
      assertSameMap(JSON.parse(cli.stdout), await qemuMap(top), "blktap map --json");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "map: an overlay longer than its backing file is depth 0 past the backing's end, as QEMU says",
  ignore: !haveQemu,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "blktap-map-" });
    try {
      const base = `${dir}/base.raw`;
      await qemuCreate(base, "raw", "4M");
      await qemuIo(base, "raw", ["write -P 1 0 1M"]);
      // One level: an 8 MiB qcow over a 4 MiB raw file.
      const over = `${dir}/over.qcow`;
      await qemuCreate(over, "qcow", "8M", { name: "base.raw", format: "raw" });
      await qemuIo(over, "qcow", ["write -P 2 6M 64k"]);
      const overMap = await mapImage(over);
      assertSameMap(overMap, await qemuMap(over), "8 MiB qcow over 4 MiB raw");
      const past = overMap.find((e) => e.start <= 5 << 20 && 5 << 20 < e.start + e.length)!;
      assert.deepEqual([past.depth, past.present, past.zero, past.data], [0, false, true, false]);
      // Two levels, each longer than the one below: 12 MiB -> 6 MiB -> 4 MiB.
      const mid = `${dir}/mid.qcow`;
      await qemuCreate(mid, "qcow", "6M", { name: "base.raw", format: "raw" });
      await qemuIo(mid, "qcow", ["write -P 3 4M 64k"]);
      const top = `${dir}/top.qcow`;
      await qemuCreate(top, "qcow", "12M", { name: "mid.qcow", format: "qcow" });
      await qemuIo(top, "qcow", ["write -P 4 8M 64k"]);
      assertSameMap(await mapImage(top), await qemuMap(top), "12 MiB -> 6 MiB -> 4 MiB");
      const cli = await blktap(["map", "--json", top]);
      assert.equal(cli.code, 0, cli.stderr);
      assertSameMap(JSON.parse(cli.stdout), await qemuMap(top), "blktap map --json");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
