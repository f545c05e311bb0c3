/**
 * The qcow tools through the CLI, with QEMU as the judge: qcow-create,
 * img2qcow, qcow2raw.
 */
import assert from "node:assert/strict";
import { openImage } from "../../src/formats/open_image.ts";
import { testSeed } from "../_helpers/random.ts";
import { blktap, run, runOk } from "../_helpers/tools.ts";
import {
  assertQemuSame,
  inTempDir,
  noQemu,
  qemuConvertToQcow,
  qemuCreateOver,
  qemuDataRanges,
} from "../formats/qcow/_util.ts";

async function ok(args: string[]): Promise<void> {
  const r = await blktap(args);
  assert.equal(r.code, 0, `blktap ${args.join(" ")}: ${r.stderr}`);
}

async function qemuInfo(path: string) {
  return JSON.parse(await runOk("qemu-img", ["info", "--output=json", path])) as {
    "virtual-size": number;
    format: string;
    "backing-filename"?: string;
    "cluster-size"?: number;
  };
}

function allocatedBytes(path: string): number {
  return (Deno.statSync(path).blocks ?? 0) * 512;
}

/** A sparse raw image: random data, written zeros and holes in 64 KiB..1 MiB runs. */
async function makeSparseRaw(path: string, sizeBytes: number, name: string): Promise<Uint8Array> {
  const rng = testSeed(name);
  const content = new Uint8Array(sizeBytes);
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    await file.truncate(sizeBytes);
    for (let pos = 0; pos < sizeBytes;) {
      const length = Math.min(rng.int(1, 16) * 65536, sizeBytes - pos);
      const kind = rng.next();
      if (kind < 0.4) {
        const data = rng.bytes(length);
        // Some zero 4 KiB blocks inside data runs, and an odd zero tail.
        data.fill(0, 8192, 12288);
        content.set(data, pos);
        await file.seek(pos, Deno.SeekMode.Start);
        await file.write(data);
      } else if (kind < 0.55) {
        await file.seek(pos, Deno.SeekMode.Start);
        await file.write(new Uint8Array(length));
      }
      pos += length;
    }
  } finally {
    file.close();
  }
  return content;
}

/** 4 KiB-cluster ranges of `content` that are not all zeros. */
function nonZeroClusters(content: Uint8Array): [number, number][] {
  const out: [number, number][] = [];
  for (let c = 0; c < content.byteLength; c += 4096) {
    if (!content.subarray(c, c + 4096).some((b) => b !== 0)) continue;
    const last = out[out.length - 1];
    if (last && last[1] === c) last[1] = c + 4096;
    else out.push([c, c + 4096]);
  }
  return out;
}

Deno.test({
  name: "qcow-create: sizes in MiB or with suffixes, -r, backing files, refusals",
  ignore: noQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      await ok(["qcow-create", "10", `${dir}/a.qcow`]);
      assert.equal((await qemuInfo(`${dir}/a.qcow`))["virtual-size"], 10 << 20);
      await ok(["qcow-create", "3G", `${dir}/b.qcow`]);
      const b = await qemuInfo(`${dir}/b.qcow`);
      assert.equal(b["virtual-size"], 3 * 2 ** 30);
      assert.equal(b["cluster-size"], 4096);
      await ok(["qcow-create", "-r", "5M", `${dir}/r.qcow`]);
      assert.ok(allocatedBytes(`${dir}/r.qcow`) >= 5 << 20, "reserved space allocated");
      assert.deepEqual(await qemuDataRanges(`${dir}/r.qcow`), [[0, 5 << 20]]);
      assert.equal((await run("qemu-img", ["compare", `${dir}/a.qcow`, `${dir}/b.qcow`])).code, 0);
      // Backing: relative to the new image's folder; size taken from the parent.
      await Deno.writeFile(`${dir}/base.raw`, new Uint8Array(3 << 20).fill(5));
      await ok(["qcow-create", "1", `${dir}/over.qcow`, "base.raw"]);
      const over = await qemuInfo(`${dir}/over.qcow`);
      assert.equal(over["virtual-size"], 3 << 20);
      assert.equal(over["backing-filename"], "base.raw");
      assert.equal(over["cluster-size"], 512);
      await assertQemuSame(`${dir}/base.raw`, `${dir}/over.qcow`);
      // qcow over qcow.
      await ok(["qcow-create", "1", `${dir}/top.qcow`, `${dir}/over.qcow`]);
      await assertQemuSame(`${dir}/base.raw`, `${dir}/top.qcow`);
      const exists = await blktap(["qcow-create", "10", `${dir}/a.qcow`]);
      assert.equal(exists.code, 1);
      assert.match(exists.stderr, /already exists/);
      assert.equal((await blktap(["qcow-create", "10"])).code, 2);
      assert.equal((await blktap(["qcow-create", "-r", "1", `${dir}/x.qcow`, "base.raw"])).code, 2);
      assert.equal((await blktap(["qcow-create", "ten", `${dir}/y.qcow`])).code, 2);
      const missing = await blktap(["qcow-create", "1", `${dir}/z.qcow`, "nowhere.raw"]);
      assert.equal(missing.code, 1);
      assert.match(missing.stderr, /nowhere\.raw/);
    });
  },
});

Deno.test({
  name: "img2qcow: QEMU sees the source; zero blocks and holes are not allocated",
  ignore: noQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const size = (24 << 20) + 12288; // not a multiple of 2 MiB
      const content = await makeSparseRaw(`${dir}/src.raw`, size, "img2qcow-src");
      await ok(["img2qcow", `${dir}/out.qcow`, `${dir}/src.raw`]);
      await assertQemuSame(`${dir}/src.raw`, `${dir}/out.qcow`);
      assert.deepEqual(await qemuDataRanges(`${dir}/out.qcow`), nonZeroClusters(content));
      const driver = await openImage(`${dir}/out.qcow`, { readOnly: true });
      const ours = (await driver.blockStatus(0, driver.sizeBytes)).filter((e) => !e.hole)
        .map((e) => [e.offsetBytes, e.offsetBytes + e.lengthBytes]);
      await driver.close();
      assert.deepEqual(ours, nonZeroClusters(content));
      const check = await blktap(["check", `${dir}/out.qcow`]);
      assert.equal(check.code, 0, check.stdout + check.stderr);
      // No larger than QEMU's own qcow conversion.
      await qemuConvertToQcow(`${dir}/src.raw`, `${dir}/q.qcow`);
      // blktap's layout gives the L1 table its own page at 4096, where QEMU
      // packs a small L1 behind the 48-byte header: allow those pages.
      assert.ok(
        allocatedBytes(`${dir}/out.qcow`) <= allocatedBytes(`${dir}/q.qcow`) + 8192,
        `ours ${allocatedBytes(`${dir}/out.qcow`)} vs qemu ${allocatedBytes(`${dir}/q.qcow`)}`,
      );
      // Reserved output, and refusal to overwrite.
      const again = await blktap(["img2qcow", `${dir}/out.qcow`, `${dir}/src.raw`]);
      assert.equal(again.code, 1);
      assert.match(again.stderr, /already exists/);
      await ok(["img2qcow", "--force", "-r", `${dir}/out.qcow`, `${dir}/src.raw`]);
      await assertQemuSame(`${dir}/src.raw`, `${dir}/out.qcow`);
      assert.deepEqual(await qemuDataRanges(`${dir}/out.qcow`), [[0, size]]);
      // Our driver keeps writing into converted images: packed tables take
      // new clusters at the end of the file, new tables reserve extents.
      await ok(["img2qcow", "-t", "none", `${dir}/packed.qcow`, `${dir}/src.raw`]);
      for (const name of ["out.qcow", "packed.qcow"]) {
        const want = content.slice();
        const rng = testSeed(`img2qcow-then-write-${name}`);
        const d = await openImage(`${dir}/${name}`);
        for (let i = 0; i < 300; i += 1) {
          const length = rng.int(1, 20_000);
          const offset = rng.int(0, size - length);
          const data = rng.bytes(length);
          want.set(data, offset);
          await d.write(offset, data);
        }
        await d.close();
        await Deno.writeFile(`${dir}/want.raw`, want);
        await assertQemuSame(`${dir}/want.raw`, `${dir}/${name}`, "qcow", name);
        const after = await blktap(["check", `${dir}/${name}`]);
        assert.equal(after.code, 0, after.stdout + after.stderr);
      }
    });
  },
});

Deno.test({
  name:
    "img2qcow: a buffer reused across regions leaks nothing: a zero tail past a partial cluster stays unallocated",
  ignore: noQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      // 12 regions of random data (more than the workers: buffers are reused),
      // then a last, partial cluster of written zeros (data to SEEK_DATA).
      const size = (24 << 20) + 1536;
      const content = testSeed("img2qcow-tail").bytes(size);
      content.fill(0, size - 1536);
      content.fill(0, 5 << 20, (5 << 20) + 4096); // and one zero cluster inside the data
      await Deno.writeFile(`${dir}/src.raw`, content);
      await ok(["img2qcow", `${dir}/out.qcow`, `${dir}/src.raw`]);
      await assertQemuSame(`${dir}/src.raw`, `${dir}/out.qcow`);
      assert.deepEqual(await qemuDataRanges(`${dir}/out.qcow`), nonZeroClusters(content));
    });
  },
});

Deno.test({
  name: "qcow2raw: images QEMU wrote (plain, backed, compressed) become identical sparse raws",
  ignore: noQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const content = await makeSparseRaw(`${dir}/src.raw`, 12 << 20, "qcow2raw-src");
      const text = new TextEncoder().encode("qcow2raw ".repeat(120_000));
      content.set(text.subarray(0, 1 << 20), 5 << 20);
      await Deno.writeFile(`${dir}/src.raw`, content);
      await qemuConvertToQcow(`${dir}/src.raw`, `${dir}/plain.qcow`);
      await qemuConvertToQcow(`${dir}/src.raw`, `${dir}/c.qcow`, true);
      await qemuCreateOver("plain.qcow", `${dir}/top.qcow`);
      await runOk("qemu-io", ["-c", "write -P 0x61 3M 65537", `${dir}/top.qcow`]);
      const top = content.slice();
      top.fill(0x61, 3 << 20, (3 << 20) + 65537);
      for (const [name, want] of [["plain", content], ["c", content], ["top", top]] as const) {
        const out = `${dir}/${name}.raw`;
        await ok(["qcow2raw", out, `${dir}/${name}.qcow`]);
        assert.deepEqual(await Deno.readFile(out), want, name);
        await assertQemuSame(out, `${dir}/${name}.qcow`);
        const nonZero = nonZeroClusters(want).reduce((n, [s, e]) => n + e - s, 0);
        assert.ok(allocatedBytes(out) <= nonZero + (1 << 20), `${name}: holes stay holes`);
      }
      const again = await blktap(["qcow2raw", `${dir}/top.raw`, `${dir}/top.qcow`]);
      assert.equal(again.code, 1);
      assert.match(again.stderr, /already exists/);
      await ok(["qcow2raw", "--force", `${dir}/top.raw`, `${dir}/plain.qcow`]);
      assert.deepEqual(await Deno.readFile(`${dir}/top.raw`), content);
      assert.equal((await blktap(["qcow2raw", `${dir}/only-one.raw`])).code, 2);
    });
  },
});
