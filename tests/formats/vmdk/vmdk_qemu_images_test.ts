/**
 * Images QEMU writes in every subformat read identically through us, and
 * `blktap map` agrees with `qemu-img map` on which ranges hold data.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { openVmdk } from "../../../src/formats/vmdk/vmdk.ts";
import { vmdkCheck } from "../../../src/formats/vmdk/check.ts";
import { openImage } from "../../../src/formats/open_image.ts";
import { mapImage } from "../../../src/tools/map.ts";
import { testSeed } from "../../_helpers/random.ts";
import {
  assertQemuSameAsRaw,
  HAVE_QEMU,
  mergedRuns,
  qemuImg,
  qemuMap,
  qemuToVmdk,
} from "./_vmdk_helpers.ts";
import { run } from "../../_helpers/tools.ts";

// Past 2 GiB so twoGbMaxExtentFlat has two extents; the file stays sparse.
const size_bytes = 2 ** 31 + (8 << 20);
const SUBFORMATS = [
  "monolithicSparse",
  "monolithicFlat",
  "twoGbMaxExtentFlat",
  "twoGbMaxExtentSparse",
  "streamOptimized",
];

/** Data regions of the source image: some grain-aligned, some not, one across 2 GiB. */
function regions(rng: ReturnType<typeof testSeed>): { offset: number; length: number }[] {
  const list = [
    { offset: 0, length: 70_000 },
    { offset: 2 ** 31 - 5000, length: 300_000 },
    { offset: size_bytes - 4096, length: 4096 },
  ];
  for (let i = 0; i < 12; i += 1) {
    const length = rng.int(1, 400_000);
    list.push({ offset: rng.int(0, size_bytes - length), length });
  }
  return list;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.compare(a, b) === 0;
}

/** Writes across the 2 GiB extent boundary through us; QEMU must read it back. */
async function writeAcrossExtents(path: string, subformat: string) {
  const driver = await openVmdk(path);
  const offset = 2 ** 31 - 70_001;
  await driver.write(offset, new Uint8Array(150_003).fill(0x5a));
  await driver.close();
  const io = await run("qemu-io", ["-f", "vmdk", "-c", `read -P 0x5a ${offset} 150003`, path]);
  assert.equal(io.code, 0, `${subformat}: ${io.stdout}${io.stderr}`);
  assert.doesNotMatch(io.stdout, /Pattern verification failed/, subformat);
}

Deno.test({
  name: "vmdk: QEMU-written subformats read identically through us",
  ignore: !HAVE_QEMU,
  async fn() {
    const rng = testSeed("vmdk qemu subformats");
    const dir = await Deno.makeTempDir({ prefix: "vmdk-qemu-" });
    try {
      const rawPath = `${dir}/source.raw`;
      const raw = await Deno.open(rawPath, { write: true, create: true });
      await raw.truncate(size_bytes);
      const written = regions(rng);
      for (const r of written) {
        const data = rng.bytes(r.length);
        // A run of zeros inside data: QEMU may leave it unallocated or zero.
        data.fill(0, Math.floor(r.length / 3), Math.floor(r.length / 2));
        await raw.seek(r.offset, Deno.SeekMode.Start);
        for (let done = 0; done < data.length;) done += await raw.write(data.subarray(done));
      }
      raw.close();
      const source = await openImage(`aio:${rawPath}`, { readOnly: true, cache: "writeback" });
      const probes = [...written];
      for (let i = 0; i < 40; i += 1) {
        const length = rng.int(1, 1 << 20);
        probes.push({ offset: rng.int(0, size_bytes - length), length });
      }
      for (const subformat of SUBFORMATS) {
        const path = `${dir}/${subformat}.vmdk`;
        await qemuToVmdk(rawPath, path, subformat);
        const driver = await openVmdk(path, { readOnly: true });
        assert.equal(driver.sizeBytes, size_bytes, subformat);
        assert.equal(driver.createType, subformat);
        for (const p of probes) {
          const want = new Uint8Array(p.length);
          const got = new Uint8Array(p.length);
          await source.read(p.offset, want);
          await driver.read(p.offset, got);
          assert.ok(equalBytes(got, want), `${subformat}: bytes at ${p.offset}+${p.length}`);
        }
        await driver.close();
        if (subformat !== "streamOptimized") await writeAcrossExtents(path, subformat);
        const report = await vmdkCheck(path, { repair: false });
        assert.deepEqual(report.corruptions, [], subformat);
        assert.equal(report.unusable, undefined, subformat);
        {
          // Flat extents: QEMU maps a hole of the flat file as data *and* zero.
          const key = (e: { data: boolean; zero: boolean; present: boolean }) =>
            `${e.data}/${e.zero}/${e.present}`;
          assert.deepEqual(
            mergedRuns(await mapImage(path), key),
            mergedRuns(await qemuMap(path), key),
            `${subformat}: map`,
          );
        }
      }
      await source.close();
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "vmdk: zeroed-grain entries (QEMU zeroed_grain=on) read as zeros and are rewritten",
  ignore: !HAVE_QEMU,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vmdk-zg-" });
    try {
      const path = `${dir}/z.vmdk`;
      assert.equal(
        (await qemuImg("create", "-f", "vmdk", "-o", "zeroed_grain=on", path, "4M")).code,
        0,
      );
      const io = await run("qemu-io", [
        "-f",
        "vmdk",
        "-c",
        "write -P 7 0 256k",
        "-c",
        "write -z 64k 64k",
        "-c",
        "write -z 1M 128k",
        path,
      ]);
      assert.equal(io.code, 0, io.stderr);
      const key = (e: { data: boolean; zero: boolean; present: boolean }) =>
        `${e.data}/${e.zero}/${e.present}`;
      const ourMap = mergedRuns(await mapImage(path), key);
      assert.deepEqual(ourMap, mergedRuns(await qemuMap(path), key));
      assert.ok(ourMap.some(([, , k]) => k === "false/true/true"), "zeroed grains mapped");
      const model = new Uint8Array(4 << 20);
      model.fill(7, 0, 256 << 10);
      model.fill(0, 64 << 10, 128 << 10);
      const driver = await openVmdk(path);
      const back = new Uint8Array(model.byteLength);
      await driver.read(0, back);
      assert.ok(equalBytes(back, model), "reads as QEMU wrote");
      // A partial write into a zeroed grain allocates it with zeros around the data.
      await driver.write((1 << 20) + 1000, new Uint8Array(3000).fill(9));
      model.fill(9, (1 << 20) + 1000, (1 << 20) + 4000);
      await driver.close();
      await Deno.writeFile(`${dir}/model.raw`, model);
      await assertQemuSameAsRaw(path, `${dir}/model.raw`);
      assert.equal((await qemuImg("check", path)).code, 0);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "vmdk: streamOptimized with the grain directory in the footer (as VMware streams it)",
  ignore: !HAVE_QEMU,
  async fn() {
    const rng = testSeed("vmdk footer");
    const dir = await Deno.makeTempDir({ prefix: "vmdk-footer-" });
    try {
      const raw = new Uint8Array(3 << 20);
      raw.set(rng.bytes(300_000), 500_000);
      await Deno.writeFile(`${dir}/src.raw`, raw);
      const path = `${dir}/s.vmdk`;
      await qemuToVmdk(`${dir}/src.raw`, path, "streamOptimized");
      const bytes = await Deno.readFile(path);
      assert.equal(bytes.byteLength % 512, 0);
      const header = bytes.slice(0, 512);
      const footer = new Uint8Array(3 * 512);
      new DataView(footer.buffer).setUint32(12, 3, true); // footer marker
      footer.set(header, 512); // the footer's header has the real directory offset
      const moved = new Uint8Array(bytes.byteLength + footer.byteLength);
      moved.set(bytes);
      moved.set(footer, bytes.byteLength);
      new DataView(moved.buffer).setBigUint64(56, 0xffffffffffffffffn, true);
      await Deno.writeFile(path, moved);
      const driver = await openVmdk(path, { readOnly: true });
      const back = new Uint8Array(raw.byteLength);
      await driver.read(0, back);
      await driver.close();
      assert.ok(equalBytes(back, raw));
      await assertQemuSameAsRaw(path, `${dir}/src.raw`);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "vmdk: small QEMU-written images of every subformat read identically, byte for byte",
  ignore: !HAVE_QEMU,
  async fn() {
    const rng = testSeed("vmdk qemu small");
    const dir = await Deno.makeTempDir({ prefix: "vmdk-qemu-small-" });
    try {
      const raw = new Uint8Array((6 << 20) + 512 * 3); // not a whole number of grains
      for (let i = 0; i < 30; i += 1) {
        const length = rng.int(1, 300_000);
        raw.set(rng.bytes(length), rng.int(0, raw.byteLength - length));
      }
      await Deno.writeFile(`${dir}/src.raw`, raw);
      for (const subformat of SUBFORMATS) {
        const path = `${dir}/${subformat}.vmdk`;
        await qemuToVmdk(`${dir}/src.raw`, path, subformat);
        const driver = await openVmdk(path, { readOnly: true });
        const back = new Uint8Array(driver.sizeBytes);
        await driver.read(0, back);
        await driver.close();
        assert.ok(equalBytes(back, raw), subformat);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
