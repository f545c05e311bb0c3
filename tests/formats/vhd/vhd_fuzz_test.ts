/**
 * Bad VHDs: seeded mutations of valid images (fixed, dynamic, differencing,
 * QEMU's) — footer and header fields with and without their checksums
 * fixed, BAT entries, bitmaps, parent locators (loops, missing parents),
 * truncation, garbage. Check, open, read, block status and, on a copy,
 * writes must end in a result or an error naming the problem: never
 * another exception, never a hang (a watchdog per case), and the input is
 * never written (compared after every case). 10,000 cases in process, a
 * few hundred through the CLI for exit codes.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { createVhd } from "../../../src/formats/vhd/create.ts";
import { checkVhd } from "../../../src/formats/vhd/check.ts";
import { vhdChecksum } from "../../../src/formats/vhd/footer.ts";
import { type Random, testSeed } from "../../_helpers/random.ts";
import { blktap, runOk } from "../../_helpers/tools.ts";
import { inTempDir } from "../qcow/_util.ts";
import { createChild, hasQemu } from "./_vhd_util.ts";

const in_process_cases = 10_000;
const cli_cases = 200;
const cli_parallel = 4;
const case_timeout_ms = 20_000;
const cli_timeout_ms = 60_000;

interface Base {
  name: string;
  bytes: Uint8Array;
  dynamic: boolean;
}

async function makeBases(dir: string): Promise<Base[]> {
  const bases: Base[] = [];
  const add = async (name: string, dynamic: boolean) => {
    bases.push({ name, bytes: await Deno.readFile(`${dir}/${name}`), dynamic });
  };
  await createVhd(`${dir}/dyn.vhd`, {
    sizeBytes: 3 << 20,
    subformat: "dynamic",
    blockBytes: 64 << 10,
    forceSize: true,
  });
  let d = await openImage(`${dir}/dyn.vhd`);
  await d.write(5000, new Uint8Array(150_000).fill(1));
  await d.write(2 << 20, new Uint8Array(4096).fill(2));
  await d.close();
  await add("dyn.vhd", true);
  await Deno.writeFile(`${dir}/parent.raw`, new Uint8Array(3 << 20).fill(9));
  await createChild(`${dir}/diff.vhd`, "parent.raw", "raw", 64 << 10);
  d = await openImage(`${dir}/diff.vhd`);
  await d.write(70_000, new Uint8Array(3000).fill(3));
  await d.close();
  await add("diff.vhd", true);
  await createVhd(`${dir}/fixed.vhd`, {
    sizeBytes: 256 << 10,
    subformat: "fixed",
    forceSize: true,
  });
  await add("fixed.vhd", false);
  if (hasQemu) {
    await runOk("qemu-img", ["create", "-q", "-f", "vpc", `${dir}/q.vhd`, "3M"]);
    await runOk("qemu-io", ["-f", "vpc", "-c", "write -P 7 0 64k", `${dir}/q.vhd`]);
    await add("q.vhd", true);
  }
  return bases;
}

const WILD = [
  0,
  1,
  511,
  512,
  1536,
  4096,
  0x7fffffff,
  0xfffffffe,
  0xffffffff,
  2 ** 32,
  2 ** 40,
  2 ** 53 - 1,
];

function setU64(view: DataView, at: number, value: number): void {
  if (at + 8 > view.byteLength) return;
  view.setUint32(at, Math.floor(value / 2 ** 32) >>> 0);
  view.setUint32(at + 4, value >>> 0);
}

function wild(rng: Random, size: number): number {
  return rng.next() < 0.5 ? rng.pick(WILD) : rng.int(0, size + 4096);
}

/** Mutates the footer at `at` (512 bytes); sometimes fixes its checksum so deeper code runs. */
function mutateFooter(rng: Random, bytes: Uint8Array, at: number): void {
  if (at < 0 || at + 512 > bytes.byteLength) return;
  const view = new DataView(bytes.buffer, bytes.byteOffset + at, 512);
  const field = rng.int(0, 6);
  if (field === 0) setU64(view, 48, wild(rng, bytes.byteLength)); // current_size
  else if (field === 1) view.setUint32(56, rng.int(0, 2 ** 32 - 1)); // geometry
  else if (field === 2) view.setUint32(60, rng.int(0, 7)); // disk type
  else if (field === 3) setU64(view, 16, wild(rng, bytes.byteLength)); // data offset
  else if (field === 4) {
    bytes.set(new TextEncoder().encode(rng.pick(["vpc ", "qemu", "win ", "tap\0"])), at + 28);
  } else bytes[at + rng.int(0, 511)] = rng.int(0, 255);
  if (rng.next() < 0.7) view.setUint32(64, vhdChecksum(bytes.subarray(at, at + 512), 64));
}

function mutateHeader(rng: Random, bytes: Uint8Array, ownName: string): void {
  if (bytes.byteLength < 1536) return;
  const view = new DataView(bytes.buffer, 512, 1024);
  const field = rng.int(0, 6);
  if (field === 0) setU64(view, 16, wild(rng, bytes.byteLength)); // BAT offset
  else if (field === 1) view.setUint32(28, rng.pick([0, 1, 3, 1 << 20, 1 << 25, 2 ** 32 - 1])); // entries
  else if (field === 2) {
    view.setUint32(32, rng.pick([0, 511, 512, 3000, 1 << 12, 1 << 21, 2 ** 31])); // block size
  } else if (field === 3) {
    const slot = 576 + rng.int(0, 7) * 24;
    view.setUint32(slot, rng.pick([0x57327275, 0x57326b75, 0x4d616358, 0x12345678]));
    view.setUint32(slot + 4, rng.pick([0, 1, 2, 512, 1000, 2 ** 32 - 1]));
    view.setUint32(slot + 8, rng.pick([0, 2, 18, 512, 70_000, 2 ** 32 - 1]));
    setU64(view, slot + 16, wild(rng, bytes.byteLength));
  } else if (field === 4) {
    // A locator naming the image itself, a missing file, or a folder above.
    const name = rng.pick([`.\\${ownName}`, ".\\missing.vhd", "..\\parent.raw", `C:\\${ownName}`]);
    const payload = new Uint8Array(name.length * 2);
    for (let i = 0; i < name.length; i += 1) payload[i * 2] = name.charCodeAt(i);
    const slot = 576 + rng.int(0, 1) * 24;
    const offset = Number(view.getBigUint64(slot + 16) & 0xffffffffn);
    if (offset > 0 && offset + payload.byteLength <= bytes.byteLength) {
      bytes.fill(0, offset, offset + 512 > bytes.byteLength ? bytes.byteLength : offset + 512);
      bytes.set(payload, offset);
      view.setUint32(slot + 8, payload.byteLength);
    }
  } else view.setUint8(rng.int(0, 1023), rng.int(0, 255));
  if (rng.next() < 0.7) view.setUint32(36, vhdChecksum(bytes.subarray(512, 1536), 36));
}

function mutateBat(rng: Random, bytes: Uint8Array): void {
  if (bytes.byteLength < 2048) return;
  const view = new DataView(bytes.buffer);
  const at = 1536 + rng.int(0, 127) * 4;
  const first = view.getUint32(1536);
  view.setUint32(
    at,
    rng.pick([
      0xffffffff,
      first,
      first + 1,
      0,
      3,
      rng.int(0, bytes.byteLength / 512 + 50),
      0xfffffffe,
    ]),
  );
}

/** One mutated copy of a base. */
function mutate(rng: Random, base: Base, ownName: string): Uint8Array {
  let bytes = base.bytes.slice();
  for (let m = rng.int(1, 3); m > 0; m -= 1) {
    const kind = rng.int(0, 8);
    if (kind <= 1) mutateFooter(rng, bytes, bytes.byteLength - 512);
    else if (kind === 2 && base.dynamic) mutateFooter(rng, bytes, 0);
    else if (kind === 3 && base.dynamic) mutateHeader(rng, bytes, ownName);
    else if (kind === 4 && base.dynamic) mutateBat(rng, bytes);
    else if (kind === 5) bytes = bytes.slice(0, rng.int(0, bytes.byteLength));
    else if (kind === 6) {
      const grown = new Uint8Array(bytes.byteLength + rng.int(1, 70_000));
      grown.set(bytes);
      grown.set(rng.bytes(grown.byteLength - bytes.byteLength), bytes.byteLength);
      bytes = grown;
    } else {
      for (let i = rng.int(1, 16); i > 0 && bytes.byteLength > 0; i -= 1) {
        bytes[rng.int(0, bytes.byteLength - 1)] = rng.int(0, 255);
      }
    }
  }
  return bytes;
}

const EXPECTED_ERRORS = new Set(["BlockError", "SysError", "VhdFormatError"]);

function expectedError(error: unknown, what: string): void {
  if (error instanceof Error && EXPECTED_ERRORS.has(error.name) && error.message.length > 0) return;
  throw new Error(`${what}: unexpected exception ${String(error)}`, { cause: error });
}

async function readSome(path: string, rng: Random, what: string, writable: boolean): Promise<void> {
  let driver;
  try {
    driver = await openImage(`vhd:${path}`, { readOnly: !writable, cache: "writeback" });
  } catch (error) {
    return expectedError(error, `${what} open`);
  }
  try {
    const size = driver.sizeBytes;
    for (let i = 0; i < 3 && size > 0; i += 1) {
      const length = Math.min(size, rng.int(1, 300_000));
      const offset = rng.int(0, size - length);
      try {
        if (writable && i > 0) await driver.write(offset, rng.bytes(Math.min(length, 9000)));
        else await driver.read(offset, new Uint8Array(length));
      } catch (error) {
        expectedError(error, `${what} I/O ${offset}+${length}`);
      }
    }
    try {
      await driver.blockStatus(0, Math.min(size, 8 << 20));
      if (writable) await driver.flush();
    } catch (error) {
      expectedError(error, `${what} block status / flush`);
    }
  } finally {
    await driver.close().catch((error) => expectedError(error, `${what} close`));
  }
}

/** Rejects when `work` takes longer than `ms`: a hang is a failure, not a stuck CI. */
async function watchdog<T>(work: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result after ${ms} ms (hang)`)), ms);
  });
  try {
    return await Promise.race([work, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

Deno.test("vhd fuzz: 10000 mutated images in process; input never written", async () => {
  await inTempDir(async (dir) => {
    const rng = testSeed("vhd-fuzz");
    const bases = await makeBases(dir);
    const path = `${dir}/fuzz.vhd`;
    const copy = `${dir}/copy.vhd`;
    for (let i = 0; i < in_process_cases; i += 1) {
      const base = bases[i % bases.length];
      const bytes = mutate(rng, base, "fuzz.vhd");
      await Deno.writeFile(path, bytes);
      const what = `case ${i} (${base.name})`;
      await watchdog(
        (async () => {
          const report = await checkVhd(path, { repair: false });
          assert.ok(Array.isArray(report.corruptions), what);
          await readSome(path, rng, what, false);
          if (i % 8 === 0) {
            // Writes go to a copy named like the input, so its locators resolve the same.
            await Deno.writeFile(copy, bytes);
            await readSome(copy, rng, `${what} (written)`, true);
          }
        })(),
        case_timeout_ms,
        what,
      );
      assert.deepEqual(await Deno.readFile(path), bytes, `${what}: input changed`);
    }
    console.log(`${in_process_cases} mutated images from ${bases.length} bases`);
  });
});

Deno.test("vhd fuzz: mutated images through the CLI give exit codes 0/1/2 and messages", async () => {
  await inTempDir(async (dir) => {
    const rng = testSeed("vhd-fuzz-cli");
    const bases = await makeBases(dir);
    let next = 0;
    const codes = new Map<string, number>();
    const worker = async (w: number) => {
      const path = `${dir}/cli${w}.vhd`;
      while (next < cli_cases) {
        const i = next++;
        const bytes = mutate(rng, bases[i % bases.length], `cli${w}.vhd`);
        await Deno.writeFile(path, bytes);
        const command = [
          ["check", `vhd:${path}`],
          ["info", `vhd:${path}`],
          ["convert", "-f", "vhd", "-O", "raw", "--force", path, `${dir}/out${w}.raw`],
        ][i % 3];
        const result = await watchdog(blktap(command), cli_timeout_ms, command.join(" "));
        const key = `${command[0]}=${result.code}`;
        codes.set(key, (codes.get(key) ?? 0) + 1);
        const allowed = command[0] === "check" ? [0, 1, 2] : [0, 1];
        assert.ok(
          allowed.includes(result.code),
          `${command.join(" ")}: exit ${result.code}\n${result.stderr}`,
        );
        assert.doesNotMatch(result.stderr, /Uncaught|panicked|at file:\/\//, result.stderr);
        if (result.code !== 0) assert.ok((result.stderr + result.stdout).trim().length > 0);
        assert.deepEqual(await Deno.readFile(path), bytes, "input unchanged");
      }
    };
    await Promise.all(Array.from({ length: cli_parallel }, (_, w) => worker(w)));
    console.log(`${cli_cases} CLI runs:`, Object.fromEntries(codes));
  });
});
