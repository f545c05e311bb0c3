/**
 * Helpers shared by the vhd tests: peers (QEMU, libvhdi's vhdiinfo and
 * vhdimount) and seeded writes that straddle sectors and blocks.
 * @module
 */
import assert from "node:assert/strict";
import type { BlockDriver } from "../../../src/formats/driver.ts";
import { blktap, hasTool, run, runOk } from "../../_helpers/tools.ts";
import type { Random } from "../../_helpers/random.ts";
import { firstDifference, readAll } from "../qcow/_util.ts";

export { firstDifference, readAll };

export const hasQemu = hasTool("qemu-img") && hasTool("qemu-io");
export const hasVhdiInfo = hasTool("vhdiinfo");

let fuseChecked: Promise<boolean> | undefined;

/** Whether vhdimount can mount here (needs FUSE); checked once with a real image. */
export function vhdimountWorks(): Promise<boolean> {
  fuseChecked ??= (async () => {
    if (!hasTool("vhdimount") || !hasQemu) return false;
    try {
      Deno.statSync("/dev/fuse");
    } catch {
      return false;
    }
    const dir = await Deno.makeTempDir({ prefix: "vhdi-probe-" });
    try {
      await runOk("qemu-img", ["create", "-q", "-f", "vpc", `${dir}/p.vhd`, "1M"]);
      return await withVhdiMount(`${dir}/p.vhd`, (files) => Promise.resolve(files.length > 0))
        .catch(() => false);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  })();
  return fuseChecked;
}

/**
 * Mounts `image` with vhdimount and runs `fn` on the exposed layer files
 * (`vhdi1`, `vhdi2`, ...: the parent first, the image itself last).
 */
export async function withVhdiMount<T>(image: string, fn: (files: string[]) => Promise<T>) {
  const mountPoint = await Deno.makeTempDir({ prefix: "vhdi-mnt-" });
  const mounted = await run("vhdimount", [image, mountPoint]);
  try {
    if (mounted.code !== 0) throw new Error(`vhdimount ${image}: ${mounted.stderr}`);
    const files = [...Deno.readDirSync(mountPoint)].map((e) => e.name).sort();
    return await fn(files.map((name) => `${mountPoint}/${name}`));
  } finally {
    if (mounted.code === 0) {
      const unmounted = await run("umount", [mountPoint]);
      if (unmounted.code !== 0) await run("fusermount", ["-u", mountPoint]);
    }
    await Deno.remove(mountPoint, { recursive: true }).catch(() => {});
  }
}

/**
 * Reads through vhdimount one 4 KiB unit per O_DIRECT read (dd), so no
 * readahead merges them. libvhdi 20210425 takes a whole read from the
 * parent when it starts in sectors absent from a differencing block and
 * runs on into present ones (8 KiB over an absent unit and a present one
 * returns the parent's bytes for both, while each unit read alone is
 * right): larger reads would test that bug, not the image.
 */
const vhdi_read_bytes = 4096;

/** Asserts libvhdi (vhdimount) reads `image` as `expected`. */
export async function assertVhdiReads(image: string, expected: Uint8Array): Promise<void> {
  await withVhdiMount(image, async (files) => {
    const layer = files[files.length - 1];
    assert.equal((await Deno.stat(layer)).size, expected.byteLength, "size through vhdimount");
    const dd = await new Deno.Command("dd", {
      args: [`if=${layer}`, `bs=${vhdi_read_bytes}`, "iflag=direct", "status=none"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(dd.code, 0, `dd through vhdimount: ${new TextDecoder().decode(dd.stderr)}`);
    const got = dd.stdout;
    assert.equal(got.byteLength, expected.byteLength, "bytes read through vhdimount");
    const at = firstDifference(got, expected);
    assert.equal(at, -1, `vhdimount: first difference at byte ${at}`);
  });
}

/** `vhdiinfo` fields as a record (`Media size` -> bytes, `Disk type`, ...). */
export async function vhdiInfo(image: string): Promise<Record<string, string>> {
  const out = await runOk("vhdiinfo", [image]);
  const fields: Record<string, string> = {};
  for (const line of out.split("\n")) {
    const match = /^\s*([^:]+?)\s*:\s*(.*)$/.exec(line);
    if (match) fields[match[1]] = match[2];
  }
  return fields;
}

/** `qemu-img info --output=json` of a vpc image. */
export async function qemuInfo(image: string): Promise<{ "virtual-size": number }> {
  return JSON.parse(await runOk("qemu-img", ["info", "-f", "vpc", "--output=json", image]));
}

/** A random write: 1 byte to 300 KiB, often unaligned, often crossing sectors, units and blocks. */
export function vhdWrite(rng: Random, diskBytes: number, blockBytes: number): [number, number] {
  const kind = rng.next();
  let length: number;
  if (kind < 0.25) length = rng.int(1, 8) * 4096;
  else if (kind < 0.45) length = rng.int(1, 16) * 512;
  else length = rng.int(1, rng.pick([40, 600, 5000, 70_000, 300_000]));
  length = Math.min(length, diskBytes);
  let offset = rng.int(0, diskBytes - length);
  if (kind < 0.45) offset -= offset % (kind < 0.25 ? 4096 : 512);
  if (rng.next() < 0.15) {
    // Straddle a block boundary.
    const boundary = rng.int(1, Math.max(1, Math.floor(diskBytes / blockBytes) - 1)) * blockBytes;
    offset = Math.max(0, Math.min(diskBytes - length, boundary - rng.int(1, length)));
  }
  return [offset, length];
}

/** Random bytes, sometimes all zeros (zero writes must not allocate, yet must read back). */
export function vhdData(rng: Random, length: number): Uint8Array {
  return rng.next() < 0.12 ? new Uint8Array(length) : rng.bytes(length);
}

/** Asserts the driver reads `model`, naming the first wrong byte. */
export async function assertReads(driver: BlockDriver, model: Uint8Array, what: string) {
  const got = await readAll(driver);
  const at = firstDifference(got, model);
  assert.equal(at, -1, `${what}: byte ${at} is ${got[at]}, expected ${model[at]}`);
}

/** Writes the raw file `path` and asks `qemu-img compare` whether the vpc `image` equals it. */
export async function assertQemuReads(dir: string, image: string, expected: Uint8Array) {
  const raw = `${dir}/expected-${crypto.randomUUID()}.raw`;
  await Deno.writeFile(raw, expected);
  try {
    const result = await run("qemu-img", ["compare", "-f", "raw", "-F", "vpc", raw, image]);
    assert.equal(result.code, 0, `qemu-img compare: ${result.stdout}${result.stderr}`);
  } finally {
    await Deno.remove(raw);
  }
}

/** `blktap create` of a differencing `image` over `parent` (named relative to it). */
export async function createChild(
  image: string,
  parent: string,
  parentFormat: "raw" | "vhd",
  blockBytes = 2 << 20,
): Promise<void> {
  const args = ["-o", `block_size=${blockBytes}`, "-b", parent, "-F", parentFormat, image];
  const made = await blktap(["create", "-q", "-f", "vhd", ...args]);
  assert.equal(made.code, 0, made.stderr);
}

/** `count` random writes through `driver`, mirrored into `model`. */
export async function writeRandomly(
  driver: BlockDriver,
  model: Uint8Array,
  rng: Random,
  count: number,
  blockBytes = 2 << 20,
): Promise<void> {
  for (let i = 0; i < count; i += 1) {
    const [offset, length] = vhdWrite(rng, model.byteLength, blockBytes);
    const data = vhdData(rng, length);
    model.set(data, offset);
    await driver.write(offset, data);
  }
}
