/**
 * Helpers shared by the qcow tests: temp folders, QEMU oracles, models.
 * @module
 */
import assert from "node:assert/strict";
import type { BlockDriver } from "../../../src/formats/driver.ts";
import { hasTool, run, runOk } from "../../_helpers/tools.ts";
import type { Random } from "../../_helpers/random.ts";
import { randomWrite } from "../../_helpers/acked_writes.ts";

export { randomWrite, writeData } from "../../_helpers/acked_writes.ts";

export const hasQemu = hasTool("qemu-img") && hasTool("qemu-io");
export const noQemu = !hasQemu;

export { inTempDir } from "../../_helpers/tools.ts";

/** `count` random writes of random bytes, one after another, through `driver` and into `model`. */
export async function writeRandomly(
  driver: BlockDriver,
  model: Uint8Array,
  rng: Random,
  count: number,
): Promise<void> {
  for (let i = 0; i < count; i += 1) {
    const [offset, length] = randomWrite(rng, model.byteLength);
    const data = rng.bytes(length);
    model.set(data, offset);
    await driver.write(offset, data);
  }
}

/** Reads the whole disk. */
export async function readAll(driver: BlockDriver): Promise<Uint8Array> {
  const out = new Uint8Array(driver.sizeBytes);
  const chunk = 1 << 20;
  for (let pos = 0; pos < out.byteLength; pos += chunk) {
    await driver.read(pos, out.subarray(pos, Math.min(pos + chunk, out.byteLength)));
  }
  return out;
}

/** Asserts `qemu-img compare` finds `image` (format `fmt`) identical to raw `expected` bytes. */
export async function assertQemuSees(
  dir: string,
  image: string,
  expected: Uint8Array,
  fmt = "qcow",
): Promise<void> {
  const rawPath = `${dir}/expected-${crypto.randomUUID()}.raw`;
  await Deno.writeFile(rawPath, expected);
  try {
    await assertQemuSame(rawPath, image, fmt);
  } finally {
    await Deno.remove(rawPath);
  }
}

/** Asserts `qemu-img compare` finds `image` (format `fmt`) identical to the raw file `rawPath`. */
export async function assertQemuSame(
  rawPath: string,
  image: string,
  fmt = "qcow",
  what = "qemu-img compare",
): Promise<void> {
  const result = await run("qemu-img", ["compare", "-f", "raw", "-F", fmt, rawPath, image]);
  assert.equal(result.code, 0, `${what}: ${result.stdout}${result.stderr}`);
}

/**
 * `qemu-img convert` of the raw file `src` to the qcow `dst`. QEMU 7.2 ends
 * `convert -c` to qcow with a zero-length compressed write that qcow
 * refuses: exit 1 after writing every cluster, so `compressed` does not
 * check the exit code.
 */
export async function qemuConvertToQcow(src: string, dst: string, compressed = false) {
  const args = ["convert", ...(compressed ? ["-c"] : []), "-f", "raw", "-O", "qcow", src, dst];
  if (compressed) await run("qemu-img", args);
  else await runOk("qemu-img", args);
}

/** `qemu-img create` of the qcow `path` over the qcow `backing` (named as given). */
export async function qemuCreateOver(backing: string, path: string): Promise<void> {
  await runOk("qemu-img", ["create", "-q", "-f", "qcow", "-b", backing, "-F", "qcow", path]);
}

/** Data ranges per `qemu-img map`, merged. */
export async function qemuDataRanges(image: string): Promise<[number, number][]> {
  const out = JSON.parse(await runOk("qemu-img", ["map", "-U", "--output=json", image])) as {
    start: number;
    length: number;
    data: boolean;
  }[];
  return mergeRanges(out.filter((e) => e.data).map((e) => [e.start, e.start + e.length]));
}

/** Data ranges per our block status, merged. */
export async function ourDataRanges(driver: BlockDriver): Promise<[number, number][]> {
  const extents = await driver.blockStatus(0, driver.sizeBytes);
  return mergeRanges(
    extents.filter((e) => !e.hole).map((e) => [e.offsetBytes, e.offsetBytes + e.lengthBytes]),
  );
}

export function mergeRanges(ranges: [number, number][]): [number, number][] {
  const out: [number, number][] = [];
  for (const [s, e] of ranges.sort((a, b) => a[0] - b[0])) {
    const last = out[out.length - 1];
    if (last && last[1] >= s) last[1] = Math.max(last[1], e);
    else out.push([s, e]);
  }
  return out;
}

/** First differing offset of two buffers, or -1. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.byteLength, b.byteLength);
  for (let i = 0; i < n; i += 1) if (a[i] !== b[i]) return i;
  return a.byteLength === b.byteLength ? -1 : n;
}
