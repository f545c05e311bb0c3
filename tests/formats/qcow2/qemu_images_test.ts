/**
 * Images QEMU writes read identically through blktap (QEMU's own raw
 * conversion is the reference), our check counts what `qemu-img check`
 * counts, `blktap map` prints what `qemu-img map` prints, and features we
 * do not support are refused with a message naming them.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { checkQcow2 } from "../../../src/formats/qcow2/check.ts";
import { qcow2Info } from "../../../src/formats/qcow2/format.ts";
import { corruptionCount } from "../../../src/tools/check.ts";
import { testSeed } from "../../_helpers/random.ts";
import { blktap, run, runOk } from "../../_helpers/tools.ts";
import {
  assertQemuClean,
  assertQemuReads,
  assertReads,
  firstDifference,
  hasQemu,
  inTempDir,
  qemuCheck,
  qemuCreate,
  readAll,
} from "./_util.ts";

const size = 6 << 20;

/** qemu-io commands that leave data, zero clusters, discards and partial clusters. */
function qemuIoScript(rng: { int(a: number, b: number): number }): string[] {
  const cmds: string[] = [];
  for (let i = 0; i < 24; i += 1) {
    const offset = rng.int(0, size / 512 - 400) * 512;
    const length = rng.int(1, 380) * 512;
    const kind = rng.int(0, 9);
    if (kind < 6) cmds.push(`write -P ${rng.int(1, 255)} ${offset} ${length}`);
    else if (kind < 8) cmds.push(`write -z ${offset} ${length}`);
    else cmds.push(`discard ${offset} ${length}`);
  }
  return cmds;
}

async function qemuIo(image: string, cmds: string[], format = "qcow2"): Promise<void> {
  const args = ["-f", format];
  for (const c of cmds) args.push("-c", c);
  await runOk("qemu-io", [...args, image]);
}

/** QEMU's view of `image` as raw bytes. */
async function qemuRaw(dir: string, image: string): Promise<Uint8Array> {
  const out = `${dir}/ref-${crypto.randomUUID()}.raw`;
  await runOk("qemu-img", ["convert", "-O", "raw", image, out]);
  const bytes = await Deno.readFile(out);
  await Deno.remove(out);
  return bytes;
}

/** Our read, check and map agree with QEMU on `image`. */
async function assertAgrees(dir: string, image: string, what: string, compareMap = true) {
  const expected = await qemuRaw(dir, image);
  const driver = await openImage(image, { readOnly: true });
  try {
    assert.equal(driver.format, "qcow2", what);
    const got = await readAll(driver);
    assert.equal(firstDifference(got, expected), -1, `${what}: reads differ from qemu-img convert`);
  } finally {
    await driver.close();
  }
  const ours = await checkQcow2(image, { repair: false });
  const theirs = await qemuCheck(image);
  assert.equal(corruptionCount(ours), theirs.corruptions, `${what}: corruptions`);
  assert.equal(ours.leakedClusters, theirs.leaks, `${what}: leaks`);
  assert.equal(ours.clusterStats?.allocatedClusters, theirs.allocated, `${what}: allocated`);
  assert.equal(ours.clusterStats?.fragmentedClusters, theirs.fragmented, `${what}: fragmented`);
  assert.equal(ours.clusterStats?.compressedClusters, theirs.compressed, `${what}: compressed`);
  assert.equal(ours.clusterStats?.imageEndOffsetBytes, theirs.imageEnd, `${what}: image end`);
  if (compareMap) {
    const ourMap = await blktap(["map", "--json", image]);
    const qemuMap = await runOk("qemu-img", ["map", "--output=json", image]);
    assert.deepEqual(JSON.parse(ourMap.stdout), JSON.parse(qemuMap), `${what}: map`);
  }
}

const LAYOUTS: [string, Record<string, string>][] = [
  ["v2", { compat: "0.10" }],
  ["v3", { compat: "1.1" }],
  ["v3 extended_l2=off", { extended_l2: "off" }],
  ["512-byte clusters", { cluster_size: "512" }],
  ["1K clusters v2", { cluster_size: "1K", compat: "0.10" }],
  ["4K clusters", { cluster_size: "4K" }],
  ["2M clusters", { cluster_size: "2M" }],
  ...[1, 2, 4, 8, 32, 64].map((bits): [string, Record<string, string>] => [
    `refcount_bits=${bits}`,
    { refcount_bits: String(bits), cluster_size: "4K" },
  ]),
  ["lazy_refcounts", { lazy_refcounts: "on" }],
];

for (const [name, options] of LAYOUTS) {
  Deno.test({
    name: `qcow2 QEMU images: ${name} reads identically`,
    ignore: !hasQemu,
    fn: async () => {
      await inTempDir(async (dir) => {
        const rng = testSeed(`qcow2 qemu ${name}`);
        const image = `${dir}/q.qcow2`;
        await qemuCreate(image, size, options);
        await qemuIo(image, qemuIoScript(rng));
        // QEMU's map recurses into the file for images it thinks preallocated; skip those layouts.
        await assertAgrees(dir, image, name, options.cluster_size !== "2M");
      });
    },
  });
}

Deno.test({
  name: "qcow2 QEMU images: compressed (convert -c), read and overwritten",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed("qcow2 compressed");
      const raw = rng.bytes(size);
      const text = new TextEncoder().encode("blktap qcow2 compressed cluster ".repeat(80_000));
      raw.set(text.subarray(0, 2 << 20), 1 << 20);
      raw.fill(0, 4 << 20, 5 << 20);
      await Deno.writeFile(`${dir}/src.raw`, raw);
      const image = `${dir}/c.qcow2`;
      await runOk("qemu-img", [
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        `${dir}/src.raw`,
        image,
      ]);
      assert.ok((await qemuCheck(image)).compressed > 0, "has compressed clusters");
      await assertAgrees(dir, image, "compressed");
      // Partial writes over compressed clusters copy them out; the old space is freed.
      const driver = await openImage(image);
      const want = raw.slice();
      for (const [at, n] of [[(1 << 20) + 100, 3], [(2 << 20) + 70_000, 9000], [5000, 1]]) {
        const data = rng.bytes(n);
        want.set(data, at);
        await driver.write(at, data);
      }
      await driver.close();
      await assertQemuReads(dir, image, want);
      await assertQemuClean(image);
    });
  },
});

for (const backingFormat of ["raw", "qcow", "qcow2", "vmdk"]) {
  Deno.test({
    name: `qcow2 QEMU images: overlay over ${backingFormat}, read and written`,
    ignore: !hasQemu,
    fn: async () => {
      await inTempDir(async (dir) => {
        const rng = testSeed(`qcow2 over ${backingFormat}`);
        const base = `${dir}/base.${backingFormat}`;
        await runOk("qemu-img", ["create", "-q", "-f", backingFormat, base, String(size)]);
        await qemuIo(base, [`write -P 0x11 0 2M`, `write -P 0x22 3M 1M`], backingFormat);
        const mid = `${dir}/mid.qcow2`;
        await qemuCreate(mid, size, { cluster_size: "16K" }, {
          name: `base.${backingFormat}`,
          format: backingFormat,
        });
        await qemuIo(mid, qemuIoScript(rng));
        const top = `${dir}/top.qcow2`;
        await qemuCreate(top, size, {}, { name: "mid.qcow2", format: "qcow2" });
        await qemuIo(top, [`write -P 0x33 1000k 300k`, `write -z 3200k 128k`]);
        await assertAgrees(dir, top, `top over ${backingFormat}`, false);
        // Writes through the chain: QEMU reads what the model says.
        const model = await qemuRaw(dir, top);
        const driver = await openImage(top);
        try {
          for (let i = 0; i < 60; i += 1) {
            const length = rng.int(1, 100_000);
            const at = rng.int(0, size - length);
            const data = rng.next() < 0.2 ? new Uint8Array(length) : rng.bytes(length);
            model.set(data, at);
            await driver.write(at, data);
          }
          await driver.writeZeroes(64 << 10, 192 << 10);
          model.fill(0, 64 << 10, 256 << 10);
          await assertReads(driver, model, "chain");
        } finally {
          await driver.close();
        }
        await assertQemuClean(top);
        await assertQemuReads(dir, top, model);
      });
    },
  });
}

Deno.test({
  name:
    "qcow2 QEMU images: internal snapshots are listed, counted, and stay intact under our writes",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed("qcow2 snapshots");
      const image = `${dir}/s.qcow2`;
      await qemuCreate(image, size, { cluster_size: "4K" });
      await qemuIo(image, qemuIoScript(rng));
      await runOk("qemu-img", ["snapshot", "-c", "first", image]);
      const atFirst = await qemuRaw(dir, image);
      await qemuIo(image, qemuIoScript(rng));
      await runOk("qemu-img", ["snapshot", "-c", "second", image]);
      await assertAgrees(dir, image, "snapshots");
      const info = await qcow2Info(image);
      assert.deepEqual(info.snapshots?.map((s) => s.name), ["first", "second"]);
      const text = await blktap(["info", image]);
      assert.match(text.stdout, /Snapshot list:[\s\S]*first[\s\S]*second/);
      // Our writes copy shared clusters and tables: the snapshots keep their data.
      const driver = await openImage(image);
      const model = await readAll(driver);
      for (let i = 0; i < 200; i += 1) {
        const length = rng.int(1, 30_000);
        const at = rng.int(0, size - length);
        const data = rng.bytes(length);
        model.set(data, at);
        await driver.write(at, data);
      }
      await driver.discard(1 << 20, 256 << 10);
      await driver.close();
      await assertQemuClean(image);
      const snap = `${dir}/first.raw`;
      await runOk("qemu-img", ["convert", "-l", "snapshot.name=first", "-O", "raw", image, snap]);
      assert.equal(
        firstDifference(await Deno.readFile(snap), atFirst),
        -1,
        "snapshot 'first' unchanged",
      );
      const now = await qemuRaw(dir, image);
      for (let i = 0; i < model.byteLength; i += 1) {
        const inDiscard = i >= 1 << 20 && i < (1 << 20) + (256 << 10);
        if (!inDiscard && now[i] !== model[i]) assert.fail(`active state differs at ${i}`);
      }
    });
  },
});

/** Sets bits in the incompatible features field (v3). */
async function setIncompatible(path: string, bits: bigint, featureName?: [number, string]) {
  const bytes = await Deno.readFile(path);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(72, view.getBigUint64(72) | bits);
  if (featureName) {
    // Rename the feature table's first entry to the given bit and name.
    const at = bytes.indexOf(0x68, 104); // 0x6803f857 extension type
    assert.equal(view.getUint32(at), 0x6803f857);
    bytes[at + 8] = 0;
    bytes[at + 9] = featureName[0];
    bytes.fill(0, at + 10, at + 56);
    bytes.set(new TextEncoder().encode(featureName[1]), at + 10);
  }
  await Deno.writeFile(path, bytes);
}

/** A plain image whose header says it is encrypted (1: AES, 2: LUKS). */
async function withCryptMethod(path: string, method: number): Promise<void> {
  await qemuCreate(path, "1M");
  const bytes = await Deno.readFile(path);
  new DataView(bytes.buffer).setUint32(32, method);
  await Deno.writeFile(path, bytes);
}

Deno.test({
  name: "qcow2: unsupported features are refused with a message naming them",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const cases: [string, () => Promise<void>, RegExp][] = [
        ["ext", () => qemuCreate(`${dir}/ext.qcow2`, "1M", { extended_l2: "on" }), /extended L2/],
        [
          "luks",
          // qemu-img's LUKS key derivation times itself and fails on a loaded
          // machine: the header field is what we must refuse on.
          () => withCryptMethod(`${dir}/luks.qcow2`, 2),
          /encryption \(crypt_method LUKS\)/,
        ],
        [
          "datafile",
          () => qemuCreate(`${dir}/datafile.qcow2`, "1M", { data_file: `${dir}/data.raw` }),
          /external data file/,
        ],
        [
          "unknown",
          async () => {
            await qemuCreate(`${dir}/unknown.qcow2`, "1M");
            await setIncompatible(`${dir}/unknown.qcow2`, 1n << 9n, [9, "time travel"]);
          },
          /'time travel' \(incompatible bit 9\)/,
        ],
        [
          "aes",
          () => withCryptMethod(`${dir}/aes.qcow2`, 1),
          /encryption \(crypt_method AES\)/,
        ],
      ];
      for (const [name, make, pattern] of cases) {
        await make();
        const path = `${dir}/${name}.qcow2`;
        await assert.rejects(() => openImage(path), pattern, name);
        await assert.rejects(() => openImage(path, { readOnly: true }), pattern, name);
        const cli = await blktap(["check", path]);
        assert.equal(cli.code, 2, `${name}: check exit code`);
        assert.match(cli.stdout + cli.stderr, pattern, name);
      }
      // zstd compression, where this QEMU has it.
      const zstd = await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        `${dir}/zstd.qcow2`,
        "1M",
      ]);
      if (zstd.code === 0) await assert.rejects(() => openImage(`${dir}/zstd.qcow2`), /zstd/);
      // The corrupt bit: read-only use only.
      await qemuCreate(`${dir}/corrupt.qcow2`, "1M");
      await setIncompatible(`${dir}/corrupt.qcow2`, 2n);
      await assert.rejects(() => openImage(`${dir}/corrupt.qcow2`), /marked corrupt/);
      const ro = await openImage(`${dir}/corrupt.qcow2`, { readOnly: true });
      await ro.close();
    });
  },
});

Deno.test({
  name:
    "qcow2 QEMU images: persistent bitmaps are counted, and after our write dropped without a leak",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const image = `${dir}/bm.qcow2`;
      await qemuCreate(image, size, {});
      await qemuIo(image, ["write -P 1 0 1M"]);
      await runOk("qemu-img", ["bitmap", "--add", image, "bm0"]);
      await qemuIo(image, ["write -P 2 2M 1M"]); // the bitmap takes clusters
      await assertAgrees(dir, image, "with a bitmap", false);
      const driver = await openImage(image);
      await driver.write(4 << 20, new Uint8Array(100_000).fill(3));
      await driver.close();
      // We keep no bitmap: QEMU now calls it inconsistent; its clusters were given back.
      await assertQemuClean(image);
      const want = new Uint8Array(size);
      want.fill(1, 0, 1 << 20);
      want.fill(2, 2 << 20, 3 << 20);
      want.fill(3, 4 << 20, (4 << 20) + 100_000);
      await assertQemuReads(dir, image, want);
    });
  },
});
