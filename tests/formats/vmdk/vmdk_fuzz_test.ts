/**
 * Bad images: 10,000 seeded mutations of vmdk headers, descriptors and
 * grain tables (truncations, wild offsets, huge directories, bad grain
 * sizes, broken descriptor lines) opened, read, mapped and checked
 * in-process; then a few hundred through the CLI. Every failure must be an
 * error naming the file (a BlockError or SysError, never a TypeError or
 * RangeError from our own code), nothing may hang, and the input file is
 * never modified.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { BlockError } from "../../../src/formats/driver.ts";
import { SysError } from "../../../ffi/errno.ts";
import { createVmdk } from "../../../src/formats/vmdk/create.ts";
import { openVmdk } from "../../../src/formats/vmdk/vmdk.ts";
import { vmdkCheck } from "../../../src/formats/vmdk/check.ts";
import { Random, testSeed } from "../../_helpers/random.ts";
import { blktap } from "../../_helpers/tools.ts";
import { HAVE_QEMU, qemuImg } from "./_vmdk_helpers.ts";

const in_process_cases = 10_000;
const cli_cases = 240;
const cli_parallel = 4;
const read_bytes_max = 256 << 10;
const status_bytes_max = 32 << 20;
/** tmpfs when there is one: 10,000 image rewrites are much cheaper there. */
const FAST_DIR = (() => {
  try {
    return Deno.statSync("/dev/shm").isDirectory ? "/dev/shm" : undefined;
  } catch {
    return undefined;
  }
})();

interface Base {
  name: string;
  bytes: Uint8Array;
  /** Whether the bytes are a text descriptor (flat extents beside it). */
  text: boolean;
}

const FIELDS: [offset: number, width: 4 | 8 | 2][] = [
  [4, 4],
  [8, 4],
  [12, 8],
  [20, 8],
  [28, 8],
  [36, 8],
  [44, 4],
  [48, 8],
  [56, 8],
  [64, 8],
  [77, 2],
];
const WILD_U64 = [
  0n,
  1n,
  2n,
  3n,
  7n,
  8n,
  127n,
  129n,
  0x7fffffffn,
  0xffffffffn,
  0x100000000n,
  1n << 40n,
  (1n << 53n) + 1n,
  0xffffffffffffffffn,
];

async function makeBases(dir: string): Promise<Base[]> {
  const bases: Base[] = [];
  const sparseBases = [
    ["sparse64k", 65536, true],
    ["sparse4k", 4096, true],
    ["sparse-ondemand", 4096, false],
  ] as const;
  for (const [name, grainBytes, preallocateTables] of sparseBases) {
    const path = `${dir}/${name}.vmdk`;
    createVmdk(path, 3 << 20, { grainBytes, preallocateTables });
    const d = await openVmdk(path);
    const rng = new Random(7);
    for (let i = 0; i < 6; i += 1) await d.write(rng.int(0, (3 << 20) - 9000), rng.bytes(9000));
    await d.close();
    bases.push({ name, bytes: await Deno.readFile(path), text: false });
  }
  if (HAVE_QEMU) {
    const raw = `${dir}/src.raw`;
    const data = new Uint8Array(1 << 20);
    data.set(new Random(9).bytes(200_000), 100_000);
    await Deno.writeFile(raw, data);
    const path = `${dir}/stream.vmdk`;
    const r = await qemuImg("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, path);
    assert.equal(r.code, 0, r.stderr);
    const stream = await Deno.readFile(path);
    bases.push({ name: "stream", bytes: stream, text: false });
    // The same with its grain directory in a footer, as VMware streams it.
    const footer = new Uint8Array(3 * 512);
    new DataView(footer.buffer).setUint32(12, 3, true);
    footer.set(stream.subarray(0, 512), 512);
    const withFooter = new Uint8Array(stream.byteLength + footer.byteLength);
    withFooter.set(stream);
    withFooter.set(footer, stream.byteLength);
    new DataView(withFooter.buffer).setBigUint64(56, 0xffffffffffffffffn, true);
    bases.push({ name: "stream-footer", bytes: withFooter, text: false });
  }
  // Flat extents named by the text descriptors below.
  await Deno.writeFile(`${dir}/flat-a.bin`, new Random(3).bytes(1 << 20));
  await Deno.writeFile(`${dir}/flat-b.bin`, new Random(4).bytes(512 << 10));
  const descriptor = (createType: string, extents: string[]) =>
    new TextEncoder().encode(
      `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n` +
        `createType="${createType}"\n\n# Extent description\n${extents.join("\n")}\n\n` +
        `#DDB\nddb.adapterType = "ide"\nddb.geometry.heads = "16"\n`,
    );
  bases.push({
    name: "flat",
    bytes: descriptor("monolithicFlat", ['RW 2048 FLAT "flat-a.bin" 0']),
    text: true,
  });
  bases.push({
    name: "split",
    bytes: descriptor("twoGbMaxExtentFlat", [
      'RW 1024 FLAT "flat-a.bin" 1024',
      'RW 1024 FLAT "flat-b.bin" 0',
      "RW 64 ZERO",
    ]),
    text: true,
  });
  return bases;
}

const LINE_MUTATIONS = [
  'RW 99999999999999999999 FLAT "flat-a.bin" 0',
  'RW -5 FLAT "flat-a.bin" 0',
  'RW 0 FLAT "flat-a.bin" 0',
  'RW 2048 FLAT "flat-a.bin"',
  'RW 2048 FLAT "missing.bin" 0',
  'RW 2048 FLAT "." 0',
  'RW 2048 FLAT "/" 0',
  'RW 2048 SPARSE "flat-a.bin"',
  'RW 2048 SPARSE "self.vmdk"',
  'RW 2048 VMFSSPARSE "flat-a.bin"',
  'RW 2048 FLAT "flat-a.bin" 99999999999999',
  'NOACCESS 2048 FLAT "flat-a.bin" 0',
  'RDONLY 2048 FLAT "flat-b.bin" 0',
  "parentCID=deadbeef",
  'parentFileNameHint="base.vmdk"',
  'createType="vmfsSparse"',
  'createType="seSparse"',
  "version=7",
  "version=",
  'createType="',
  "\0\0\0",
  "garbage line without equals",
  "RW 1 ZERO",
  "x".repeat(5000),
];

function setField(view: DataView, offset: number, width: number, value: bigint) {
  if (offset + width > view.byteLength) return;
  if (width === 8) view.setBigUint64(offset, value & 0xffffffffffffffffn, true);
  else if (width === 4) view.setUint32(offset, Number(value & 0xffffffffn), true);
  else view.setUint16(offset, Number(value & 0xffffn), true);
}

function mutateBinary(rng: Random, bytes: Uint8Array): Uint8Array {
  let out = bytes.slice();
  const view = () => new DataView(out.buffer);
  const count = rng.int(1, 3);
  for (let m = 0; m < count; m += 1) {
    switch (rng.int(0, 6)) {
      case 0: { // truncation, mostly inside the metadata
        const cut = rng.next() < 0.7
          ? rng.int(0, Math.min(out.length, 70_000))
          : rng.int(0, out.length);
        out = out.slice(0, cut);
        break;
      }
      case 1: { // header field set to a wild value
        const [offset, width] = rng.pick(FIELDS);
        setField(view(), offset, width, rng.pick(WILD_U64) + BigInt(rng.int(0, 2)));
        break;
      }
      case 2: // random header bytes
        for (let i = rng.int(1, 8); i > 0; i -= 1) {
          out[rng.int(0, Math.min(511, out.length - 1))] = rng.int(0, 255);
        }
        break;
      case 3: { // wild directory or table entries (they live in the first 64 KiB)
        const at = rng.int(512, Math.max(512, Math.min(out.length, 66_000) - 4)) & ~3;
        setField(
          view(),
          at,
          4,
          BigInt(rng.pick([0, 1, 2, 0x7fffffff, 0xffffffff, rng.int(0, 4000)])),
        );
        break;
      }
      case 4: { // grain size / table size combinations
        setField(view(), 20, 8, BigInt(rng.pick([0, 1, 3, 8, 100, 128, 1 << 16, 1 << 17])));
        setField(view(), 44, 4, BigInt(rng.pick([0, 1, 511, 512, 513, 1 << 20])));
        break;
      }
      case 5: { // embedded descriptor bytes
        const at = rng.int(512, Math.min(out.length - 1, 512 + 1200));
        for (let i = rng.int(1, 30); i > 0 && at + i < out.length; i -= 1) {
          out[at + i] = rng.pick([0, 10, 34, 61, 32, rng.int(0, 255)]);
        }
        break;
      }
      default: { // capacity huge with a small file
        setField(
          view(),
          12,
          8,
          BigInt(rng.pick([1 << 30, 2 ** 40, 2 ** 45])) * BigInt(rng.int(1, 3)),
        );
      }
    }
    if (out.length === 0) break;
  }
  return out;
}

function mutateText(rng: Random, bytes: Uint8Array): Uint8Array {
  const lines = new TextDecoder().decode(bytes).split("\n");
  const count = rng.int(1, 3);
  for (let m = 0; m < count; m += 1) {
    const at = rng.int(0, lines.length - 1);
    switch (rng.int(0, 3)) {
      case 0:
        lines[at] = rng.pick(LINE_MUTATIONS);
        break;
      case 1:
        lines.splice(at, 0, rng.pick(LINE_MUTATIONS));
        break;
      case 2:
        lines.splice(at, 1);
        break;
      default:
        lines[at] = lines[at].slice(0, rng.int(0, lines[at].length));
    }
  }
  const text = new TextEncoder().encode(lines.join("\n"));
  return rng.next() < 0.1 ? text.slice(0, rng.int(0, text.length)) : text;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.compare(a, b) === 0;
}

function assertNamedError(error: unknown, dir: string, what: string) {
  const known = error instanceof BlockError || error instanceof SysError;
  if (!known || !(error as Error).message.includes(dir)) {
    throw new Error(`${what}: unexpected ${String((error as Error)?.stack ?? error)}`);
  }
}

/**
 * Opens (mostly read-only) and reads. Returns true when a read-write open
 * recovered an extent whose header says its last writer died: the one
 * case where opening writes to the image.
 */
async function exercise(
  path: string,
  dir: string,
  rng: Random,
  stats: Record<string, number>,
): Promise<boolean> {
  let driver;
  try {
    driver = await openVmdk(path, { readOnly: rng.next() < 0.9, cache: "writeback" });
  } catch (error) {
    assertNamedError(error, dir, "open");
    stats.refused += 1;
    return false;
  }
  stats.opened += 1;
  const recovered = driver.recovered.length > 0;
  if (recovered) stats.recovered = (stats.recovered ?? 0) + 1;
  try {
    for (let i = 0; i < 3; i += 1) {
      const length = Math.min(rng.int(1, read_bytes_max), driver.sizeBytes);
      const offset = rng.int(0, driver.sizeBytes - length);
      await driver.read(offset, new Uint8Array(length));
    }
    await driver.blockStatus(0, Math.min(driver.sizeBytes, status_bytes_max));
  } catch (error) {
    assertNamedError(error, dir, "read");
    stats.readErrors += 1;
  } finally {
    await driver.close();
  }
  return recovered;
}

/** Writes into a copy of a mutated image: errors are fine, exceptions are not. */
async function exerciseWrites(
  bytes: Uint8Array,
  copy: string,
  dir: string,
  rng: Random,
  stats: Record<string, number>,
) {
  await Deno.writeFile(copy, bytes);
  let driver;
  try {
    driver = await openVmdk(copy, { cache: "writeback" });
  } catch (error) {
    assertNamedError(error, dir, "open for writing");
    return;
  }
  try {
    for (let i = 0; i < 3; i += 1) {
      const length = Math.min(rng.int(1, 100_000), driver.sizeBytes);
      await driver.write(rng.int(0, driver.sizeBytes - length), rng.bytes(length));
    }
    await driver.flush();
    stats.written = (stats.written ?? 0) + 1;
  } catch (error) {
    assertNamedError(error, dir, "write");
    stats.writeErrors = (stats.writeErrors ?? 0) + 1;
  } finally {
    await driver.close();
  }
}

Deno.test("vmdk fuzz: 10,000 mutated images give errors, never exceptions, hangs or writes", async () => {
  const rng = testSeed("vmdk fuzz");
  const dir = await Deno.makeTempDir({ prefix: "vmdk-fuzz-", dir: FAST_DIR });
  try {
    const bases = await makeBases(dir);
    const path = `${dir}/self.vmdk`;
    const stats: Record<string, number> = { opened: 0, refused: 0, readErrors: 0, corrupt: 0 };
    const started = Date.now();
    for (let i = 0; i < in_process_cases; i += 1) {
      const base = bases[i % bases.length];
      const bytes = base.text ? mutateText(rng, base.bytes) : mutateBinary(rng, base.bytes);
      await Deno.writeFile(path, bytes);
      let recovered = false;
      try {
        recovered = await exercise(path, dir, rng, stats);
        if (rng.next() < 0.05) await exerciseWrites(bytes, `${dir}/copy.vmdk`, dir, rng, stats);
        const report = await vmdkCheck(path, { repair: false });
        if (report.corruptions.length > 0) stats.corrupt += 1;
        assert.ok(report.unusable === undefined || report.unusable.includes(dir), report.unusable);
      } catch (error) {
        throw new Error(`case ${i} (base ${base.name}): ${(error as Error).message}`);
      }
      if (!recovered) {
        assert.ok(equalBytes(await Deno.readFile(path), bytes), `case ${i}: input was modified`);
      }
    }
    console.log(`${in_process_cases} cases in ${Date.now() - started} ms`, JSON.stringify(stats));
    assert.ok(stats.opened > 500 && stats.refused > 500, JSON.stringify(stats));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("vmdk fuzz: blktap check/info/map exit 0, 1 or 2 on mutated images", async () => {
  const rng = testSeed("vmdk cli fuzz");
  const dir = await Deno.makeTempDir({ prefix: "vmdk-clifuzz-" });
  try {
    const bases = await makeBases(dir);
    const codes: Record<string, number> = {};
    let next = 0;
    const worker = async (w: number) => {
      for (let i = next++; i < cli_cases; i = next++) {
        const base = bases[i % bases.length];
        const bytes = base.text ? mutateText(rng, base.bytes) : mutateBinary(rng, base.bytes);
        const path = `${dir}/w${w}.vmdk`;
        await Deno.writeFile(path, bytes);
        const verb = ["check", "info", "map"][i % 3];
        const result = await blktap([verb, `vmdk:${path}`]);
        const what = `case ${i} ${verb} (base ${base.name})`;
        const allowed = verb === "check" ? [0, 1, 2] : [0, 1];
        assert.ok(allowed.includes(result.code), `${what}: exit ${result.code}: ${result.stderr}`);
        assert.ok(
          !/Uncaught|TypeError|RangeError| {4}at /.test(result.stderr),
          `${what}: ${result.stderr}`,
        );
        if (result.code !== 0 && verb !== "check") assert.match(result.stderr, /blktap \w+: .+/);
        assert.ok(equalBytes(await Deno.readFile(path), bytes), `${what}: input was modified`);
        codes[`${verb}:${result.code}`] = (codes[`${verb}:${result.code}`] ?? 0) + 1;
      }
    };
    await Promise.all(Array.from({ length: cli_parallel }, (_, w) => worker(w)));
    console.log(JSON.stringify(codes));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
