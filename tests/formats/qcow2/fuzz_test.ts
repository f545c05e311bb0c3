/**
 * Bad qcow2 images: seeded mutations of valid ones (header fields,
 * extensions, L1/L2 entries, refcount table and blocks, snapshot tables,
 * truncation, random bytes). Open, read, block status and check end in a
 * result or an error naming the problem — never another exception, never
 * a hang (each case has a watchdog) — and never write to the input (checked
 * after every case). A second pass writes to mutated copies: errors, not
 * crashes. A few hundred cases go through the CLI for exit codes 0/1/2,
 * and a few hundred through `qemu-img check`, whose counts ours must match.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { createQcow2 } from "../../../src/formats/qcow2/create.ts";
import { checkQcow2 } from "../../../src/formats/qcow2/check.ts";
import { type Random, testSeed } from "../../_helpers/random.ts";
import { blktap, runOk } from "../../_helpers/tools.ts";
import { hasQemu, inTempDir, qemuCheck } from "./_util.ts";
import { corruptionCount } from "../../../src/tools/check.ts";

const read_only_cases = 10_000;
const write_cases = 600;
const cli_cases = 240;
const cli_parallel = 4;
const parity_cases = 400;
const case_timeout_ms = 20_000;

interface Base {
  name: string;
  bytes: Uint8Array;
  cluster: number;
  /** File offsets worth hitting: tables, blocks, the snapshot table. */
  hot: number[];
  l1: number;
  reftable: number;
}

function u64(view: DataView, at: number): number {
  return view.getUint32(at) * 2 ** 32 + view.getUint32(at + 4);
}

function describe(name: string, bytes: Uint8Array): Base {
  const view = new DataView(bytes.buffer);
  const cluster = 2 ** view.getUint32(20);
  const l1 = u64(view, 40);
  const reftable = u64(view, 48);
  const hot = [l1, reftable, u64(view, 64)];
  for (let i = 0; i < view.getUint32(36) && l1 + i * 8 + 8 <= bytes.byteLength; i += 1) {
    const t = u64(view, l1 + i * 8) % 2 ** 56;
    if (t) hot.push(t - (t % 512));
  }
  for (let i = 0; i < 64 && reftable + i * 8 + 8 <= bytes.byteLength; i += 1) {
    const r = u64(view, reftable + i * 8);
    if (r) hot.push(r);
  }
  return {
    name,
    bytes,
    cluster,
    hot: hot.filter((h) => h > 0 && h < bytes.byteLength),
    l1,
    reftable,
  };
}

async function makeBases(dir: string): Promise<Base[]> {
  const bases: Base[] = [];
  const ours = async (
    name: string,
    size: number,
    options: Record<string, string>,
    fill: [number, number][],
  ) => {
    const path = `${dir}/${name}.qcow2`;
    await createQcow2(path, { sizeBytes: size, options });
    const d = await openImage(path);
    for (const [at, n] of fill) await d.write(at, new Uint8Array(n).fill(at % 251));
    await d.writeZeroes(fill[0][0], 4096);
    await d.close();
    bases.push(describe(name, await Deno.readFile(path)));
  };
  await ours("v3-4k", 4 << 20, { cluster_size: "4K" }, [[0, 20_000], [3 << 20, 9000]]);
  await ours("v2-1k", 2 << 20, { compat: "0.10", cluster_size: "1K" }, [[5000, 7000]]);
  await ours("rc64-512", 1 << 20, { cluster_size: "512", refcount_bits: "64" }, [[0, 30_000]]);
  if (hasQemu) {
    const q = `${dir}/snap.qcow2`;
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4K", q, "2M"]);
    await runOk("qemu-io", ["-c", "write -P 7 0 64k", "-c", "write -z 1M 8k", q]);
    await runOk("qemu-img", ["snapshot", "-c", "s1", q]);
    await runOk("qemu-io", ["-c", "write -P 8 32k 64k", q]);
    bases.push(describe("snapshots", await Deno.readFile(q)));
    await Deno.writeFile(`${dir}/text.raw`, new TextEncoder().encode("qcow2 ".repeat(120_000)));
    const c = `${dir}/c.qcow2`;
    await runOk("qemu-img", [
      "convert",
      "-c",
      "-O",
      "qcow2",
      "-o",
      "cluster_size=4K",
      `${dir}/text.raw`,
      c,
    ]);
    bases.push(describe("compressed", await Deno.readFile(c)));
  }
  return bases;
}

const WILD = [0, 1, 7, 511, 512, 4096, 65536, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 53 - 1];

function wild(rng: Random, base: Base): bigint {
  const r = rng.next();
  if (r < 0.25) return BigInt(rng.pick(WILD));
  if (r < 0.45) return BigInt(rng.int(0, base.bytes.byteLength + 4 * base.cluster));
  if (r < 0.65) return BigInt(rng.pick(base.hot));
  if (r < 0.8) {
    return (1n << 63n) | BigInt(rng.int(0, base.bytes.byteLength / base.cluster) * base.cluster);
  }
  return BigInt(rng.int(0, 2 ** 31)) * BigInt(rng.int(0, 2 ** 31)) |
    (rng.next() < 0.3 ? 1n << 62n : 0n);
}

function setU64(bytes: Uint8Array, at: number, value: bigint): void {
  if (at >= 0 && at + 8 <= bytes.byteLength) {
    new DataView(bytes.buffer).setBigUint64(at, value & 0xffffffffffffffffn);
  }
}

/** One mutated copy of a base image. */
function mutate(rng: Random, base: Base): Uint8Array {
  let bytes = base.bytes.slice();
  const view = new DataView(bytes.buffer);
  for (let m = rng.int(1, 3); m > 0; m -= 1) {
    const kind = rng.int(0, 11);
    if (kind === 0) bytes[rng.int(0, 111)] = rng.int(0, 255);
    else if (kind === 1) setU64(bytes, rng.pick([8, 24, 40, 48, 64]), wild(rng, base));
    else if (kind === 2) {
      view.setUint32(
        rng.pick([4, 16, 20, 32, 36, 56, 60, 96, 100]),
        rng.pick([0, 1, 2, 3, 4, 6, 7, 9, 16, 21, 22, 64, 104, 2 ** 20, 2 ** 32 - 1]),
      );
    } else if (kind === 3) {
      setU64(bytes, rng.pick([72, 80, 88]), BigInt(rng.pick([1, 2, 4, 8, 16, 32, 1 << 20])));
    } else if (kind === 4) setU64(bytes, base.l1 + rng.int(0, 7) * 8, wild(rng, base));
    else if (kind === 5 || kind === 6) {
      const table = rng.pick(base.hot);
      setU64(bytes, table + rng.int(0, base.cluster / 8 - 1) * 8, wild(rng, base));
    } else if (kind === 7) setU64(bytes, base.reftable + rng.int(0, 3) * 8, wild(rng, base));
    else if (kind === 8) bytes = bytes.slice(0, rng.int(0, bytes.byteLength));
    else if (kind === 9) {
      for (let i = 0; i < 8; i += 1) {
        bytes[rng.int(104, Math.min(bytes.byteLength, base.cluster) - 1)] = rng.int(0, 255);
      }
    } else {
      for (let i = 0; i < 16; i += 1) bytes[rng.int(0, bytes.byteLength - 1)] = rng.int(0, 255);
    }
  }
  return bytes;
}

const EXPECTED = new Set(["BlockError", "SysError", "Qcow2FormatError", "RangeError"]);

function assertExpected(error: unknown, what: string): void {
  if (error instanceof Error && EXPECTED.has(error.name) && error.message.length > 0) {
    if (error.name === "RangeError") {
      assert.doesNotMatch(
        error.message,
        /Array buffer allocation|Invalid typed array length|Maximum call stack/,
        what,
      );
    }
    return;
  }
  throw new Error(`${what}: unexpected exception ${String(error)}`, { cause: error });
}

async function watchdog<T>(work: Promise<T>, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${what}: no result within ${case_timeout_ms} ms`)),
      case_timeout_ms,
    );
  });
  try {
    return await Promise.race([work, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function readOnlyCase(path: string, rng: Random, what: string): Promise<void> {
  const report = await checkQcow2(path, { repair: false });
  assert.ok(Array.isArray(report.corruptions), what);
  let driver;
  try {
    driver = await openImage(`qcow2:${path}`, { readOnly: true, cache: "writeback" });
  } catch (error) {
    return assertExpected(error, `${what} open`);
  }
  try {
    const size = driver.sizeBytes;
    const top = Math.min(size, 2 ** 52);
    for (let i = 0; i < 4; i += 1) {
      const length = Math.min(top, rng.int(1, 70_000));
      try {
        await driver.read(rng.int(0, top - length), new Uint8Array(length));
      } catch (error) {
        assertExpected(error, `${what} read`);
      }
    }
    try {
      await driver.blockStatus(0, Math.min(top, 64 << 20));
    } catch (error) {
      assertExpected(error, `${what} block status`);
    }
  } finally {
    await driver.close();
  }
}

async function writeCase(path: string, rng: Random, what: string): Promise<void> {
  let driver;
  try {
    driver = await openImage(`qcow2:${path}`, { cache: "writeback" });
  } catch (error) {
    return assertExpected(error, `${what} open`);
  }
  try {
    const top = Math.min(driver.sizeBytes, 2 ** 40);
    for (let i = 0; i < 4; i += 1) {
      const length = Math.min(top, rng.int(1, 40_000));
      const at = rng.int(0, top - length);
      try {
        if (i === 3) await driver.discard(at, length);
        else await driver.write(at, new Uint8Array(length).fill(i + 1));
      } catch (error) {
        assertExpected(error, `${what} write`);
      }
    }
  } finally {
    try {
      await driver.close();
    } catch (error) {
      assertExpected(error, `${what} close`);
    }
  }
}

Deno.test("qcow2 fuzz: 10000 mutated images in process (read-only: never written), 600 written", async () => {
  await inTempDir(async (dir) => {
    const rng = testSeed("qcow2 fuzz");
    const bases = await makeBases(dir);
    const path = `${dir}/fuzz.qcow2`;
    for (let i = 0; i < read_only_cases; i += 1) {
      const base = bases[i % bases.length];
      const bytes = mutate(rng, base);
      await Deno.writeFile(path, bytes);
      const what = `case ${i} (${base.name})`;
      await watchdog(readOnlyCase(path, rng, what), what);
      assert.deepEqual(await Deno.readFile(path), bytes, `${what}: input changed`);
    }
    for (let i = 0; i < write_cases; i += 1) {
      const base = bases[i % bases.length];
      await Deno.writeFile(path, mutate(rng, base));
      const what = `write case ${i} (${base.name})`;
      await watchdog(writeCase(path, rng, what), what);
    }
    console.log(
      `${read_only_cases} read-only and ${write_cases} write cases from ${bases.length} bases`,
    );
  });
});

Deno.test("qcow2 fuzz: mutated images through the CLI exit 0, 1 or 2 with a message", async () => {
  await inTempDir(async (dir) => {
    const rng = testSeed("qcow2 fuzz cli");
    const bases = await makeBases(dir);
    let next = 0;
    const codes = new Map<string, number>();
    const worker = async (w: number) => {
      const path = `${dir}/cli${w}.qcow2`;
      while (next < cli_cases) {
        const i = next++;
        const bytes = mutate(rng, bases[i % bases.length]);
        await Deno.writeFile(path, bytes);
        const verb = ["check", "info", "map"][i % 3];
        const result = await watchdog(blktap([verb, `qcow2:${path}`]), `${verb} case ${i}`);
        const key = `${verb}=${result.code}`;
        codes.set(key, (codes.get(key) ?? 0) + 1);
        assert.ok([0, 1, 2].includes(result.code), `${verb} case ${i}: exit ${result.code}`);
        assert.doesNotMatch(result.stderr, /Uncaught|panicked|at file:\/\//, result.stderr);
        if (result.code !== 0) assert.ok((result.stderr + result.stdout).trim().length > 0);
        assert.deepEqual(await Deno.readFile(path), bytes, `case ${i}: input changed`);
      }
    };
    await Promise.all(Array.from({ length: cli_parallel }, (_, w) => worker(w)));
    console.log(`${cli_cases} CLI runs:`, Object.fromEntries(codes));
  });
});

Deno.test({
  name: "qcow2 fuzz: on mutated images our check counts what qemu-img check counts",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed("qcow2 fuzz counts");
      const bases = await makeBases(dir);
      const path = `${dir}/counts.qcow2`;
      let compared = 0;
      let damaged = 0;
      for (let i = 0; i < parity_cases; i += 1) {
        const base = bases[i % bases.length];
        await Deno.writeFile(path, mutate(rng, base));
        const what = `case ${i} (${base.name})`;
        const theirs = await watchdog(qemuCheck(path), what);
        // Only where QEMU opened the image and counted (exit 0: clean, 2: corrupt, 3: leaks).
        if (![0, 2, 3].includes(theirs.exitCode) || theirs.checkErrors > 0) continue;
        const ours = await watchdog(checkQcow2(path, { repair: false }), what);
        if (ours.unusable !== undefined) continue; // refused: a feature we do not open
        compared += 1;
        if (theirs.corruptions + theirs.leaks > 0) damaged += 1;
        const detail = `${what}: qemu-img ${theirs.stderr.slice(0, 800)} / ours ${
          JSON.stringify(ours.corruptions.slice(0, 10))
        }`;
        assert.equal(corruptionCount(ours), theirs.corruptions, `${detail}: corruptions`);
        assert.equal(ours.leakedClusters, theirs.leaks, `${detail}: leaks`);
      }
      console.log(
        `${compared} of ${parity_cases} mutated images compared with qemu-img check, ${damaged} damaged`,
      );
      assert.ok(
        compared > parity_cases / 4 && damaged > compared / 4,
        `${compared} compared, ${damaged} damaged`,
      );
    });
  },
});
