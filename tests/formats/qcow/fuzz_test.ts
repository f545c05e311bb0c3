/**
 * Bad images: seeded mutations of valid qcow files (header fields, L1 and
 * L2 entries, truncations, wild offsets, huge sizes, cluster_bits out of
 * range, backing loops). Open, read, block status and check must end in a
 * result or an error naming the problem — never another exception, never a
 * hang (each case has a watchdog) — and never write to the input (checked
 * after every case). Most iterations run in process; a few hundred go
 * through the CLI for exit codes.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { openImage } from "../../../src/formats/open_image.ts";
import { createQcow } from "../../../src/formats/qcow/create.ts";
import { checkQcow } from "../../../src/formats/qcow/check.ts";
import { type Random, testSeed } from "../../_helpers/random.ts";
import { blktap, run, runOk } from "../../_helpers/tools.ts";
import { withWatchdog } from "../../_helpers/watchdog.ts";
import { hasQemu, inTempDir } from "./_util.ts";

const in_process_iterations = 10_000;
const cli_iterations = 240;
const cli_parallel = 4;
/** A case taking longer hangs (most take a few milliseconds). */
const case_ms_max = 20_000;
const cli_case_ms_max = 60_000;

interface Base {
  name: string;
  bytes: Uint8Array;
  /** File offsets of L2 tables (from the L1 table). */
  tables: number[];
  l1Offset: number;
  l1Entries: number;
  l2Bytes: number;
}

function u64(view: DataView, at: number): number {
  return view.getUint32(at) * 2 ** 32 + view.getUint32(at + 4);
}

function describe(name: string, bytes: Uint8Array): Base {
  const view = new DataView(bytes.buffer);
  const size = u64(view, 24);
  const clusterBits = view.getUint8(32);
  const l2Bits = view.getUint8(33);
  const l1Offset = u64(view, 40);
  const l1Entries = Math.ceil(size / 2 ** (clusterBits + l2Bits));
  const tables: number[] = [];
  for (let i = 0; i < l1Entries; i += 1) {
    const t = u64(view, l1Offset + i * 8);
    if (t !== 0) tables.push(t);
  }
  return { name, bytes, tables, l1Offset, l1Entries, l2Bytes: 2 ** l2Bits * 8 };
}

async function makeBases(dir: string): Promise<Base[]> {
  const bases: Base[] = [];
  const solo = `${dir}/solo.qcow`;
  await createQcow(solo, { sizeBytes: 3 << 20 });
  let d = await openImage(solo);
  await d.write(5000, new Uint8Array(9000).fill(1));
  await d.write(2 << 20, new Uint8Array(4096).fill(2));
  await d.close();
  bases.push(describe("solo", await Deno.readFile(solo)));
  await Deno.writeFile(`${dir}/base.raw`, new Uint8Array(1 << 20).fill(9));
  const backed = `${dir}/backed.qcow`;
  await createQcow(backed, { sizeBytes: 1 << 20, backingName: "base.raw" });
  d = await openImage(backed);
  await d.write(700, new Uint8Array(3000).fill(3));
  await d.close();
  bases.push(describe("backed", await Deno.readFile(backed)));
  if (hasQemu) {
    const q = `${dir}/q.qcow`;
    await runOk("qemu-img", ["create", "-q", "-f", "qcow", q, "2M"]);
    await runOk("qemu-io", ["-c", "write -P 7 0 64k", "-c", "write -P 8 1M 8k", q]);
    bases.push(describe("qemu", await Deno.readFile(q)));
    await Deno.writeFile(`${dir}/text.raw`, new TextEncoder().encode("qcow ".repeat(200_000)));
    const c = `${dir}/c.qcow`;
    // QEMU 7.2 exits 1 at the end of convert -c to qcow; the image is complete.
    await run("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow", `${dir}/text.raw`, c]);
    bases.push(describe("compressed", await Deno.readFile(c)));
  }
  return bases;
}

const WILD = [0, 1, 7, 48, 511, 512, 4096, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 53 - 1];

function wildValue(rng: Random, base: Base): number {
  const r = rng.next();
  if (r < 0.3) return rng.pick(WILD);
  if (r < 0.5) return rng.int(0, base.bytes.byteLength + 10_000);
  if (r < 0.7) return base.tables.length ? rng.pick(base.tables) : base.l1Offset;
  if (r < 0.8) return base.l1Offset;
  return rng.int(0, 2 ** 31) * 512;
}

function setU64(bytes: Uint8Array, at: number, value: number, compressed = false): void {
  if (at + 8 > bytes.byteLength) return;
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  view.setUint32(at, (Math.floor(value / 2 ** 32) | (compressed ? 0x80000000 : 0)) >>> 0);
  view.setUint32(at + 4, value >>> 0);
}

/** One mutated copy of a base image. */
function mutate(rng: Random, base: Base, ownName: string): Uint8Array {
  let bytes = base.bytes.slice();
  const view = new DataView(bytes.buffer);
  const mutations = rng.int(1, 3);
  for (let m = 0; m < mutations; m += 1) {
    const kind = rng.int(0, 9);
    if (kind === 0) bytes[rng.int(0, 63)] = rng.int(0, 255);
    else if (kind === 1) {
      setU64(bytes, 24, rng.pick([0, 1, 2, 2 ** 40, 2 ** 53 - 1, rng.int(0, 2 ** 40)]));
    } else if (kind === 2) view.setUint8(rng.pick([32, 33]), rng.int(0, 70));
    else if (kind === 3) setU64(bytes, rng.pick([8, 40]), wildValue(rng, base));
    else if (kind === 4) {
      view.setUint32(rng.pick([16, 36]), rng.pick([0, 1, 2, 1023, 1024, 2 ** 32 - 1]));
    } else if (kind === 5 && base.l1Entries > 0) {
      setU64(bytes, base.l1Offset + rng.int(0, base.l1Entries - 1) * 8, wildValue(rng, base));
    } else if (kind === 6 && base.tables.length > 0) {
      const table = rng.pick(base.tables);
      const at = table + rng.int(0, base.l2Bytes / 8 - 1) * 8;
      setU64(bytes, at, wildValue(rng, base), rng.next() < 0.3);
    } else if (kind === 7) bytes = bytes.slice(0, rng.int(0, bytes.byteLength));
    else if (kind === 8) {
      // A backing loop: the image names itself (or a missing file) as its parent.
      const name = new TextEncoder().encode(rng.next() < 0.7 ? ownName : "missing.raw");
      setU64(bytes, 8, 64);
      view.setUint32(16, name.byteLength);
      if (bytes.byteLength >= 64 + name.byteLength) bytes.set(name, 64);
    } else {
      for (let i = 0; i < 8; i += 1) bytes[rng.int(0, bytes.byteLength - 1)] = rng.int(0, 255);
    }
  }
  return bytes;
}

const EXPECTED_ERRORS = new Set(["BlockError", "SysError", "QcowFormatError"]);

function assertExpectedError(error: unknown, what: string): void {
  if (error instanceof Error && EXPECTED_ERRORS.has(error.name) && error.message.length > 0) return;
  throw new Error(`${what}: unexpected exception ${String(error)}`, { cause: error });
}

async function exercise(path: string, rng: Random, what: string): Promise<void> {
  const report = await checkQcow(path, { repair: false });
  assert.ok(Array.isArray(report.corruptions), what);
  let driver;
  try {
    driver = await openImage(path, { readOnly: true, cache: "writeback" });
  } catch (error) {
    assertExpectedError(error, `${what} open`);
    return;
  }
  try {
    const size = driver.sizeBytes;
    const ranges: [number, number][] = [[0, Math.min(size, 1 << 20)]];
    for (let i = 0; i < 3; i += 1) {
      const length = Math.min(size, rng.int(1, 70_000));
      ranges.push([rng.int(0, size - length), length]);
    }
    for (const [offset, length] of ranges) {
      try {
        await driver.read(offset, new Uint8Array(length));
      } catch (error) {
        assertExpectedError(error, `${what} read ${offset}+${length}`);
      }
    }
    try {
      await driver.blockStatus(0, Math.min(size, 64 << 20));
    } catch (error) {
      assertExpectedError(error, `${what} block status`);
    }
  } finally {
    await driver.close();
  }
}

Deno.test("qcow fuzz: 10000 mutated images in process", async () => {
  await inTempDir(async (dir) => {
    const rng = testSeed("qcow-fuzz");
    const bases = await makeBases(dir);
    const path = `${dir}/fuzz.qcow`;
    for (let i = 0; i < in_process_iterations; i += 1) {
      const base = bases[i % bases.length];
      const bytes = mutate(rng, base, "fuzz.qcow");
      await Deno.writeFile(path, bytes);
      const what = `iteration ${i} (${base.name})`;
      await withWatchdog(exercise(path, rng, what), case_ms_max, what);
      assert.equal(Buffer.compare(await Deno.readFile(path), bytes), 0, `${what}: input changed`);
    }
    console.log(`${in_process_iterations} mutated images from ${bases.length} bases`);
  });
});

Deno.test("qcow fuzz: mutated images through the CLI give exit codes and messages", async () => {
  await inTempDir(async (dir) => {
    const rng = testSeed("qcow-fuzz-cli");
    const bases = await makeBases(dir);
    let next = 0;
    const codes = new Map<string, number>();
    const worker = async (w: number) => {
      const path = `${dir}/cli${w}.qcow`;
      while (next < cli_iterations) {
        const i = next++;
        const bytes = mutate(rng, bases[i % bases.length], `cli${w}.qcow`);
        await Deno.writeFile(path, bytes);
        const command = i % 2 === 0
          ? ["check", path]
          : ["qcow2raw", "--force", `${dir}/out${w}.raw`, path];
        const result = await withWatchdog(blktap(command), cli_case_ms_max, command.join(" "));
        const key = `${command[0]}=${result.code}`;
        codes.set(key, (codes.get(key) ?? 0) + 1);
        const allowed = command[0] === "check" ? [0, 1, 2] : [0, 1];
        assert.ok(allowed.includes(result.code), `${command.join(" ")}: exit ${result.code}`);
        assert.doesNotMatch(result.stderr, /Uncaught|panicked|at file:\/\//, result.stderr);
        if (result.code !== 0) {
          assert.ok(result.stderr.trim().length > 0 || result.stdout.length > 0);
        }
        assert.deepEqual(await Deno.readFile(path), bytes, "input unchanged");
      }
    };
    await Promise.all(Array.from({ length: cli_parallel }, (_, w) => worker(w)));
    console.log(`${cli_iterations} CLI runs:`, Object.fromEntries(codes));
  });
});
