/**
 * `blktap convert` between every pair of formats blktap creates: QEMU finds
 * the output identical to the source (`qemu-img compare`) and sound
 * (`qemu-img check` where it has one, our check otherwise), holes and
 * zero blocks stay unallocated (`qemu-img map`, `du`), `-c` gives a smaller
 * image with the same contents (and sound, per `qemu-img check`) where the
 * format compresses and a usage
 * error where it cannot, `-p` draws progress, and a failed or interrupted
 * conversion leaves no output behind.
 */
import assert from "node:assert/strict";
import { formatEntry, formatNames, openImage } from "../../src/formats/open_image.ts";
import { checkImage } from "../../src/tools/check.ts";
import { convertImage } from "../../src/tools/convert.ts";
import { Qcow2Driver } from "../../src/formats/qcow2/qcow2.ts";
import { testSeed } from "../_helpers/random.ts";
import { blktap, hasTool, inTempDir, MAIN_TS, run, runOk } from "../_helpers/tools.ts";

const hasQemu = hasTool("qemu-img");
const CREATABLE = formatNames().filter((name) => formatEntry(name)?.create && name !== "sync");
const QEMU_NAME: Record<string, string> = { aio: "raw", vhd: "vpc" };
const QEMU_CHECKS = new Set(["vmdk", "qcow2"]);
/** Allocation unit of each output as blktap creates it (what a stray zero may allocate). */
const UNIT_BYTES: Record<string, number> = {
  aio: 4096,
  qcow: 4096,
  vmdk: 65536,
  vhd: 2 << 20,
  qcow2: 65536,
};
const size_bytes = 13 * (1 << 20) + 7 * 512;

/** Formats whose driver writes compressed clusters (decided by opening a fresh image). */
const COMPRESSING = await (async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-convert-probe-" });
  const found: string[] = [];
  try {
    for (const name of CREATABLE) {
      await formatEntry(name)!.create!(`${dir}/p`, { sizeBytes: 1 << 20, options: {} });
      const driver = await openImage(`${name}:${dir}/p`);
      if (typeof driver.writeCompressed === "function") found.push(name);
      await driver.close();
      await Deno.remove(`${dir}/p`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  return found;
})();

function inDir(fn: (dir: string) => Promise<void>): Promise<void> {
  return inTempDir(fn, "blktap-convert-");
}

/** A raw source: random data, written zeros and holes, in runs of many sizes. */
async function makeSource(path: string, seedName: string): Promise<Uint8Array> {
  const rng = testSeed(seedName);
  const content = new Uint8Array(size_bytes);
  const file = await Deno.open(path, { write: true, create: true });
  await file.truncate(size_bytes);
  for (let i = 0; i < 40; i += 1) {
    const length = rng.pick([rng.int(1, 600), rng.int(4096, 70_000), rng.int(100_000, 900_000)]);
    const offset = rng.int(0, size_bytes - length);
    const data = rng.next() < 0.25 ? new Uint8Array(length) : rng.bytes(length);
    content.set(data, offset);
    await file.seek(offset, Deno.SeekMode.Start);
    await file.write(data);
  }
  file.close();
  return content;
}

/** Bytes in units of `unit` that hold a non-zero byte of `content`. */
function unitsWithData(content: Uint8Array, unit: number): number {
  let units = 0;
  for (let at = 0; at < content.byteLength; at += unit) {
    if (content.subarray(at, at + unit).some((b) => b !== 0)) units += 1;
  }
  return units * unit;
}

async function qemuDataBytes(path: string, format: string): Promise<number> {
  const map = JSON.parse(await runOk("qemu-img", ["map", "-f", format, "--output=json", path])) as {
    length: number;
    data: boolean;
  }[];
  return map.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
}

async function convert(args: string[]): Promise<void> {
  const result = await blktap(["convert", ...args]);
  assert.equal(result.code, 0, `convert ${args.join(" ")}: ${result.stderr}`);
}

/** QEMU finds `target` (blktap format `to`) identical to `source`, and sound where it has a check. */
async function assertQemuSame(
  source: string,
  sourceFormat: string,
  target: string,
  to: string,
  what: string,
): Promise<void> {
  const qemuTo = QEMU_NAME[to] ?? to;
  const compare = await run("qemu-img", [
    "compare",
    "-f",
    sourceFormat,
    "-F",
    qemuTo,
    source,
    target,
  ]);
  assert.equal(compare.code, 0, `${what}: ${compare.stdout}${compare.stderr}`);
  if (QEMU_CHECKS.has(qemuTo)) await runOk("qemu-img", ["check", "-f", qemuTo, target]);
}

Deno.test({
  name: `convert: every pair of ${CREATABLE.join(", ")}: identical, sound, sparse`,
  ignore: !hasQemu,
  fn: () =>
    inDir(async (dir) => {
      const reference = `${dir}/reference.raw`;
      const content = await makeSource(reference, "convert-pairs");
      for (const from of CREATABLE) {
        const source = `${dir}/source.${from}`;
        await convert(["-f", "raw", "-O", from, reference, source]);
        for (const to of CREATABLE) {
          const target = `${dir}/target-${from}.${to}`;
          const qemuTo = QEMU_NAME[to] ?? to;
          await convert(["-O", to, source, target]);
          await assertQemuSame(reference, "raw", target, to, `${from} -> ${to}`);
          if (formatEntry(to)!.check) {
            assert.equal((await checkImage(`${to}:${target}`)).status, 0, `${from} -> ${to}`);
          }
          // Holes stay holes: no more data, mapped or on disk, than the units the content
          // touches (plus metadata).
          const allowed = unitsWithData(content, UNIT_BYTES[to] ?? 2 << 20);
          const mapped = await qemuDataBytes(target, qemuTo);
          assert.ok(
            mapped <= allowed,
            `${from} -> ${to}: ${mapped} bytes mapped as data, at most ${allowed}`,
          );
          const du = (await Deno.stat(target)).blocks! * 512;
          assert.ok(
            du <= allowed + (1 << 20),
            `${from} -> ${to}: ${du} bytes on disk, data ${allowed}`,
          );
          await Deno.remove(target);
        }
        await Deno.remove(source);
      }
    }),
});

Deno.test({
  name: `convert -c: smaller output, same contents (${
    COMPRESSING.join(", ") || "no format compresses yet"
  })`,
  ignore: !hasQemu || COMPRESSING.length === 0,
  fn: () =>
    inDir(async (dir) => {
      const reference = `${dir}/reference.raw`;
      // Compressible data: text-like runs.
      const text = new TextEncoder().encode("blktap convert -c ".repeat(300_000)).subarray(
        0,
        5 << 20,
      );
      await Deno.writeFile(reference, text);
      for (const to of COMPRESSING) {
        const qemuTo = QEMU_NAME[to] ?? to;
        await convert(["-O", to, reference, `${dir}/plain.${to}`]);
        await convert(["-c", "-O", to, reference, `${dir}/small.${to}`]);
        await runOk("qemu-img", [
          "compare",
          "-f",
          "raw",
          "-F",
          qemuTo,
          reference,
          `${dir}/small.${to}`,
        ]);
        if (QEMU_CHECKS.has(qemuTo)) {
          await runOk("qemu-img", ["check", "-f", qemuTo, `${dir}/small.${to}`]);
        }
        const plain = (await Deno.stat(`${dir}/plain.${to}`)).blocks!;
        const small = (await Deno.stat(`${dir}/small.${to}`)).blocks!;
        assert.ok(small * 4 < plain, `${to}: -c gave ${small} blocks, plain ${plain}`);
      }
    }),
});

Deno.test("convert -c to a format that cannot compress is a usage error, and leaves nothing", async () => {
  await inDir(async (dir) => {
    await makeSource(`${dir}/r.raw`, "convert-c-refused");
    for (const to of CREATABLE.filter((name) => !COMPRESSING.includes(name))) {
      const result = await blktap(["convert", "-c", "-O", to, `${dir}/r.raw`, `${dir}/out`]);
      assert.equal(result.code, 2, `${to}: ${result.stderr}`);
      assert.match(result.stderr.split("\n")[0], /-c: blktap cannot write compressed/);
      assert.throws(() => Deno.statSync(`${dir}/out`), Deno.errors.NotFound, to);
    }
  });
});

Deno.test("convert: -p draws progress; an existing output needs --force", async () => {
  await inDir(async (dir) => {
    await makeSource(`${dir}/r.raw`, "convert-progress");
    const shown = await blktap(["convert", "-p", "-O", "vhd", `${dir}/r.raw`, `${dir}/o.vhd`]);
    assert.equal(shown.code, 0, shown.stderr);
    assert.match(shown.stderr, /convert \[#+\s*\] 100\.0%/);
    const again = await blktap(["convert", "-O", "vhd", `${dir}/r.raw`, `${dir}/o.vhd`]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /already exists; use --force/);
    await convert(["--force", "-O", "raw", `${dir}/o.vhd`, `${dir}/o.vhd.raw`]);
    await convert(["--force", "-O", "vmdk", `${dir}/r.raw`, `${dir}/o.vhd`]);
    assert.equal((await checkImage(`${dir}/o.vhd`)).format, "vmdk");
    const usage = await blktap(["convert", `${dir}/r.raw`, `${dir}/x`]);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /-O FMT is required/);
  });
});

Deno.test("convert: a source that fails mid-copy leaves no output behind", async () => {
  await inDir(async (dir) => {
    // A qcow source whose L2 entries of one table point into the header: reading them fails.
    await makeSource(`${dir}/r.raw`, "convert-fail");
    await convert(["-O", "qcow", `${dir}/r.raw`, `${dir}/bad.qcow`]);
    const bytes = await Deno.readFile(`${dir}/bad.qcow`);
    const view = new DataView(bytes.buffer);
    const l1 = Number(view.getBigUint64(40));
    const tables = Array.from({ length: 7 }, (_, i) => Number(view.getBigUint64(l1 + 8 * i)));
    const l2 = tables.filter((t) => t > 0)[1];
    assert.ok(l2 > 0, "the source has data in two regions");
    for (let i = 0; i < 512; i += 1) {
      if (view.getBigUint64(l2 + i * 8) !== 0n) view.setBigUint64(l2 + i * 8, 512n);
    }
    await Deno.writeFile(`${dir}/bad.qcow`, bytes);
    const result = await blktap(["convert", "-O", "vhd", `${dir}/bad.qcow`, `${dir}/out.vhd`]);
    assert.equal(result.code, 1, result.stderr);
    assert.match(result.stderr, /points into the metadata/);
    assert.throws(() => Deno.statSync(`${dir}/out.vhd`), Deno.errors.NotFound);
  });
});

Deno.test("convert: SIGTERM while copying removes the output", async () => {
  await inDir(async (dir) => {
    // Big enough that the copy is still running when the signal arrives.
    const source = `${dir}/big.raw`;
    const file = await Deno.open(source, { write: true, create: true });
    const chunk = new Uint8Array(8 << 20).fill(0x5a);
    for (let i = 0; i < 48; i += 1) await file.write(chunk);
    file.close();
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN_TS, "convert", "-O", "vhd", source, `${dir}/out.vhd`],
      stdout: "null",
      stderr: "piped",
    }).spawn();
    for (let i = 0; i < 2000; i += 1) {
      try {
        if (Deno.statSync(`${dir}/out.vhd`).size > 4 << 20) break;
      } catch {
        // not created yet
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    child.kill("SIGTERM");
    const status = await child.output();
    const stderr = new TextDecoder().decode(status.stderr);
    if (status.code === 0) {
      // The copy won the race: the output must then be complete.
      await runOk("qemu-img", ["compare", "-f", "raw", "-F", "vpc", source, `${dir}/out.vhd`]);
      return;
    }
    assert.equal(status.code, 143, stderr);
    assert.match(stderr, /SIGTERM: .*out\.vhd removed/);
    assert.throws(() => Deno.statSync(`${dir}/out.vhd`), Deno.errors.NotFound);
  });
});

Deno.test({
  name:
    "convert: a QEMU-made qcow2 chain (compressed base, zero clusters over it) to raw, vhd, qcow2",
  ignore: !hasQemu || !hasTool("qemu-io"),
  fn: () =>
    inDir(async (dir) => {
      const reference = `${dir}/reference.raw`;
      await makeSource(reference, "convert-qcow2-chain");
      await runOk("qemu-img", [
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        reference,
        `${dir}/base.qcow2`,
      ]);
      await runOk("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        `${dir}/top.qcow2`,
      ]);
      await runOk("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        "write -z 1M 192k",
        "-c",
        "write -P 0x33 3M 100k",
        "-c",
        "write -z -u 5M 128k",
        `${dir}/top.qcow2`,
      ]);
      for (const to of ["raw", "vhd", "qcow2"]) {
        const target = `${dir}/flat.${to}`;
        await convert(["-O", to, `${dir}/top.qcow2`, target]);
        // QEMU reads the chain: the output must hold what it sees, flattened.
        await assertQemuSame(`${dir}/top.qcow2`, "qcow2", target, to, `qcow2 chain -> ${to}`);
      }
    }),
});

Deno.test({
  name: "convert: a differencing vhd (over a dynamic one) to qcow2 and raw holds both layers",
  ignore: !hasQemu,
  fn: () =>
    inDir(async (dir) => {
      const model = await makeSource(`${dir}/reference.raw`, "convert-vhd-child");
      await convert(["-f", "raw", "-O", "vhd", `${dir}/reference.raw`, `${dir}/base.vhd`]);
      const made = await blktap([
        "create",
        "-q",
        "-f",
        "vhd",
        "-b",
        "base.vhd",
        `${dir}/child.vhd`,
      ]);
      assert.equal(made.code, 0, made.stderr);
      const rng = testSeed("convert-vhd-child-writes");
      const child = await openImage(`vhd:${dir}/child.vhd`);
      try {
        for (let i = 0; i < 30; i += 1) {
          const length = rng.int(1, 300_000);
          const offset = rng.int(0, size_bytes - length);
          const data = rng.next() < 0.2 ? new Uint8Array(length) : rng.bytes(length);
          await child.write(offset, data);
          model.set(data, offset);
        }
      } finally {
        await child.close();
      }
      await Deno.writeFile(`${dir}/model.raw`, model);
      for (const to of ["qcow2", "raw"]) {
        const target = `${dir}/flat.${to}`;
        await convert(["-O", to, `${dir}/child.vhd`, target]);
        await assertQemuSame(`${dir}/model.raw`, "raw", target, to, `vhd child -> ${to}`);
      }
    }),
});

Deno.test({
  name:
    "convert to qcow2 with tiny metadata caches (512-byte clusters): deferred tables evicted mid-copy, output sound and identical",
  ignore: !hasQemu,
  fn: () =>
    inDir(async (dir) => {
      const source = `${dir}/source.raw`;
      const content = await makeSource(source, "convert-qcow2-tiny-cache");
      const limits = [Qcow2Driver.l2CacheBytesMax, Qcow2Driver.refcountCacheBytesMax];
      // 4 slices each: the ~54 L2 slices and the refcount blocks of this copy
      // cannot all stay cached, so dirty ones are written back mid-copy.
      [Qcow2Driver.l2CacheBytesMax, Qcow2Driver.refcountCacheBytesMax] = [2048, 2048];
      try {
        for (const cache of ["none", "writeback"] as const) {
          const target = `${dir}/out-${cache}.qcow2`;
          await convertImage({
            source,
            sourceFormat: "raw",
            target,
            targetFormat: "qcow2",
            compress: false,
            progress: false,
            options: { cluster_size: "512" },
            cache,
            force: false,
          });
          await assertQemuSame(source, "raw", target, "qcow2", `tiny caches, -t ${cache}`);
          assert.equal(await qemuDataBytes(target, "qcow2"), unitsWithData(content, 512));
        }
      } finally {
        [Qcow2Driver.l2CacheBytesMax, Qcow2Driver.refcountCacheBytesMax] = limits;
      }
    }),
});
