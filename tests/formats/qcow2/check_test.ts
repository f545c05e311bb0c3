/**
 * `check` counts what `qemu-img check` counts on damaged images; `--repair`
 * fixes leaks and refcount mismatches so that `qemu-img check` is clean
 * afterwards; an image left dirty (QEMU with lazy refcounts, killed) is
 * repaired before we write to it.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { checkQcow2 } from "../../../src/formats/qcow2/check.ts";
import { corruptionCount } from "../../../src/tools/check.ts";
import { testSeed } from "../../_helpers/random.ts";
import { blktap, run, runOk } from "../../_helpers/tools.ts";
import {
  assertQemuClean,
  assertQemuReads,
  hasQemu,
  inTempDir,
  qemuCheck,
  qemuCreate,
  readAll,
} from "./_util.ts";

interface Layout {
  l1: number;
  reftable: number;
  tables: number[];
  refblocks: number[];
  cluster: number;
}

function u64(view: DataView, at: number): number {
  return view.getUint32(at) * 2 ** 32 + view.getUint32(at + 4);
}

function layoutOf(bytes: Uint8Array): Layout {
  const view = new DataView(bytes.buffer);
  const cluster = 2 ** view.getUint32(20);
  const l1 = u64(view, 40);
  const l1Size = view.getUint32(36);
  const reftable = u64(view, 48);
  const tables: number[] = [];
  for (let i = 0; i < l1Size; i += 1) {
    const t = u64(view, l1 + i * 8) % 2 ** 56;
    if (t) tables.push(t - (t % cluster));
  }
  const refblocks: number[] = [];
  for (let i = 0; i < (view.getUint32(56) * cluster) / 8; i += 1) {
    const r = u64(view, reftable + i * 8);
    if (r) refblocks.push(r);
  }
  return { l1, reftable, tables, refblocks, cluster };
}

function setU64(bytes: Uint8Array, at: number, value: bigint): void {
  new DataView(bytes.buffer).setBigUint64(at, value);
}

/** Damage that qemu-img check reports (corruptions, leaks or both). */
const DAMAGE: [string, (b: Uint8Array, l: Layout) => Uint8Array | void][] = [
  ["leak: refcount of a free cluster raised", (b, l) => {
    const grown = new Uint8Array(b.byteLength + 4 * l.cluster);
    grown.set(b);
    const free = Math.ceil(b.byteLength / l.cluster) + 1; // inside the file, used by nothing
    new DataView(grown.buffer).setUint16(l.refblocks[0] + 2 * free, 1);
    return grown;
  }],
  ["corruption: refcount of a data cluster dropped", (b, l) => {
    const view = new DataView(b.buffer);
    const entry = u64(view, l.tables[0]) % 2 ** 56;
    const cluster = Math.floor(entry / l.cluster);
    view.setUint16(l.refblocks[0] + cluster * 2, 0);
  }],
  ["corruption: refcount of a data cluster too high", (b, l) => {
    const view = new DataView(b.buffer);
    const entry = u64(view, l.tables[0]) % 2 ** 56;
    view.setUint16(l.refblocks[0] + Math.floor(entry / l.cluster) * 2, 3);
  }],
  ["corruption: L2 entry past the end of the file", (b, l) => {
    setU64(b, l.tables[0] + 8 * 5, (1n << 63n) | BigInt(b.byteLength + 10 * l.cluster));
  }],
  ["corruption: unaligned L2 entry", (b, l) => {
    setU64(b, l.tables[0] + 8 * 6, (1n << 63n) | BigInt(2 * l.cluster + 512));
  }],
  ["corruption: two entries share a cluster", (b, l) => {
    const view = new DataView(b.buffer);
    setU64(b, l.tables[0] + 8 * 7, view.getBigUint64(l.tables[0]));
  }],
  ["corruption: COPIED flag missing", (b, l) => {
    const view = new DataView(b.buffer);
    setU64(b, l.tables[0], view.getBigUint64(l.tables[0]) & ~(1n << 63n));
  }],
  ["corruption: reserved bits in an L1 entry", (b, l) => {
    const view = new DataView(b.buffer);
    setU64(b, l.l1, view.getBigUint64(l.l1) | 0x100n);
  }],
  ["corruption: refcount block entry unaligned", (b, l) => {
    setU64(b, l.reftable, BigInt(l.refblocks[0] + 512));
  }],
];

Deno.test({
  name: "qcow2 check: a snapshot whose L1 table is unaligned or too large counts as qemu-img check",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const base = `${dir}/base.qcow2`;
      await qemuCreate(base, "8M", { cluster_size: "4K" });
      await runOk("qemu-io", ["-c", "write -P 7 0 64k", base]);
      await runOk("qemu-img", ["snapshot", "-c", "s1", base]);
      const pristine = await Deno.readFile(base);
      const view = new DataView(pristine.buffer);
      const entry = u64(view, 64); // the snapshot table: entry 0 is l1_table_offset u64, l1_size u32
      const damages: [string, (b: Uint8Array) => void][] = [
        ["unaligned", (b) => setU64(b, entry, BigInt(u64(view, entry) + 512))],
        ["too large", (b) => new DataView(b.buffer).setUint32(entry + 8, (32 << 20) / 8 + 1)],
      ];
      for (const [name, damage] of damages) {
        const image = `${dir}/${name.replace(" ", "-")}.qcow2`;
        const bytes = pristine.slice();
        damage(bytes);
        await Deno.writeFile(image, bytes);
        const theirs = await qemuCheck(image);
        const ours = await checkQcow2(image, { repair: false });
        assert.equal(theirs.corruptions, 1, `${name}: ${theirs.stderr}`);
        assert.equal(corruptionCount(ours), theirs.corruptions, `${name}: ${ours.corruptions}`);
        assert.equal(ours.leakedClusters, theirs.leaks, `${name}: leaks`);
      }
    });
  },
});

Deno.test({
  name: "qcow2 check: counts as qemu-img check on damaged images; --repair fixes refcounts",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const base = `${dir}/base.qcow2`;
      await qemuCreate(base, "8M", { cluster_size: "4K" });
      await runOk("qemu-io", ["-c", "write -P 7 0 64k", "-c", "write -P 8 1M 32k", base]);
      const pristine = await Deno.readFile(base);
      const layout = layoutOf(pristine);
      for (const [name, damage] of DAMAGE) {
        const image = `${dir}/d.qcow2`;
        const copy = pristine.slice();
        const bytes = damage(copy, layout) ?? copy;
        await Deno.writeFile(image, bytes);
        const theirs = await qemuCheck(image);
        const ours = await checkQcow2(image, { repair: false });
        assert.equal(
          corruptionCount(ours),
          theirs.corruptions,
          `${name}: corruptions ${JSON.stringify(ours.corruptions)} / ${theirs.stderr}`,
        );
        assert.equal(ours.leakedClusters, theirs.leaks, `${name}: leaks`);
        assert.ok(theirs.corruptions + theirs.leaks > 0, `${name}: the damage shows`);
        assert.deepEqual(await Deno.readFile(image), bytes, `${name}: check wrote`);
        const cli = await blktap(["check", image]);
        assert.equal(cli.code, theirs.corruptions > 0 ? 1 : 0, `${name}: exit code`);
        if (name.startsWith("leak") || name.includes("refcount of") || name.includes("COPIED")) {
          const repaired = await checkQcow2(image, { repair: true });
          assert.ok((repaired.repaired ?? []).length > 0, `${name}: repair says what it did`);
          await assertQemuClean(image);
        }
      }
    });
  },
});

Deno.test({
  name: "qcow2 check --repair: a lost refcount block is rebuilt",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const image = `${dir}/r.qcow2`;
      await qemuCreate(image, "8M", { cluster_size: "4K" });
      await runOk("qemu-io", ["-c", "write -P 3 0 200k", image]);
      const expected = await readRaw(dir, image);
      const bytes = await Deno.readFile(image);
      const l = layoutOf(bytes);
      setU64(bytes, l.reftable, 0n); // the refcount table forgets its block
      await Deno.writeFile(image, bytes);
      assert.ok((await qemuCheck(image)).corruptions > 0);
      const result = await blktap(["check", "--repair", image]);
      assert.equal(result.code, 0, result.stdout + result.stderr);
      assert.match(result.stdout, /rebuilt the refcount structure/);
      await assertQemuClean(image);
      await assertQemuReads(dir, image, expected);
    });
  },
});

async function readRaw(dir: string, image: string): Promise<Uint8Array> {
  await runOk("qemu-img", ["convert", "-O", "raw", image, `${dir}/x.raw`]);
  return await Deno.readFile(`${dir}/x.raw`);
}

Deno.test({
  name: "qcow2: a dirty image (QEMU with lazy refcounts, crashed) is repaired before we write",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed("qcow2 dirty");
      const image = `${dir}/lazy.qcow2`;
      await qemuCreate(image, "16M", { lazy_refcounts: "on", cluster_size: "4K" });
      // qemu-io's abort ends the process without flushing metadata: dirty, refcounts behind.
      await run("qemu-io", [
        "-c",
        "write -P 5 0 1M",
        "-c",
        "write -P 6 4M 512k",
        "-c",
        "flush",
        "-c",
        "abort",
        image,
      ]);
      const dirty = await qemuCheck(image);
      const bytes = await Deno.readFile(image);
      assert.equal(new DataView(bytes.buffer).getBigUint64(72) & 1n, 1n, "dirty bit set");
      assert.ok(dirty.corruptions > 0 || dirty.leaks > 0, "refcounts are behind");
      // Read-only use leaves it alone.
      const ro = await openImage(image, { readOnly: true });
      await ro.close();
      assert.deepEqual(await Deno.readFile(image), bytes);
      const driver = await openImage(image);
      const model = await readAll(driver);
      const data = rng.bytes(300_000);
      model.set(data, 2 << 20);
      await driver.write(2 << 20, data);
      await driver.close();
      await assertQemuClean(image);
      await assertQemuReads(dir, image, model);
      const after = await Deno.readFile(image);
      assert.equal(new DataView(after.buffer).getBigUint64(72) & 1n, 0n, "dirty bit cleared");
    });
  },
});
