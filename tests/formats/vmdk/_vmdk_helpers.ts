/**
 * Helpers shared by the vmdk tests: temp folders, raw dumps of a model for
 * `qemu-img compare`, and the data ranges of a map (ours or QEMU's).
 * @module
 */
import assert from "node:assert/strict";
import type { MapEntry } from "../../../src/tools/map.ts";
import { run } from "../../_helpers/tools.ts";

/** True when qemu-img is on PATH (tests needing it are skipped otherwise). */
export const HAVE_QEMU = await (async () => {
  try {
    return (await run("qemu-img", ["--version"])).code === 0;
  } catch {
    return false;
  }
})();

/** Runs `qemu-img` and returns its result. */
export function qemuImg(...args: string[]) {
  return run("qemu-img", args);
}

/** Converts the raw file `src` to the vmdk `dst` of `subformat` with qemu-img; asserts it did. */
export async function qemuToVmdk(src: string, dst: string, subformat: string): Promise<void> {
  const converted = await qemuImg(
    "convert",
    "-f",
    "raw",
    "-O",
    "vmdk",
    "-o",
    `subformat=${subformat}`,
    src,
    dst,
  );
  assert.equal(converted.code, 0, converted.stderr);
}

/** Asserts `qemu-img compare` reads the vmdk `path` as the raw file `rawPath`. */
export async function assertQemuSameAsRaw(path: string, rawPath: string): Promise<void> {
  const compare = await qemuImg("compare", "-f", "vmdk", "-F", "raw", path, rawPath);
  assert.equal(compare.code, 0, `qemu-img compare: ${compare.stdout}${compare.stderr}`);
}

/** One map entry as `qemu-img map --output=json` prints it (the same shape `blktap map` prints). */
export type JsonMapEntry = MapEntry;

/** QEMU's map of an image. */
export async function qemuMap(path: string, format?: string): Promise<JsonMapEntry[]> {
  const args = ["map", "--output=json", ...(format ? ["-f", format] : []), path];
  const result = await qemuImg(...args);
  if (result.code !== 0) throw new Error(`qemu-img map ${path}: ${result.stderr}`);
  return JSON.parse(result.stdout);
}

/** The map reduced to merged runs of one key (`data`, `zero`, `depth`...), for comparison. */
export function mergedRuns(
  entries: JsonMapEntry[],
  key: (e: JsonMapEntry) => string,
): [number, number, string][] {
  const runs: [number, number, string][] = [];
  for (const e of entries) {
    const k = key(e);
    const last = runs[runs.length - 1];
    if (last && last[2] === k && last[0] + last[1] === e.start) last[1] += e.length;
    else runs.push([e.start, e.length, k]);
  }
  return runs;
}

/** Writes `bytes` as a raw file. */
export async function writeRaw(path: string, bytes: Uint8Array): Promise<void> {
  await Deno.writeFile(path, bytes);
}
