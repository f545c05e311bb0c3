/**
 * QEMU as the oracle: `qemu-img` and `qemu-io` invocations tests share.
 * Tests using them are ignored unless {@linkcode haveQemu}.
 * @module
 */
import assert from "node:assert/strict";
import type { MapEntry } from "../../src/tools/map.ts";
import { run, type RunResult } from "./tools.ts";

export { haveQemu } from "./tools.ts";

/** Runs `qemu-img ARGS`; the caller judges the exit status. */
export function qemuImg(...args: string[]): Promise<RunResult> {
  return run("qemu-img", args);
}

/**
 * Creates an image with `qemu-img create`, over `backing` (named relative to
 * the image's folder); without a size, the backing file's.
 */
export async function qemuCreate(
  path: string,
  format: string,
  size: string | undefined,
  backing?: { name: string; format: string },
): Promise<void> {
  const over = backing ? ["-b", backing.name, "-F", backing.format] : [];
  const result = await qemuImg(
    "create",
    "-q",
    "-f",
    format,
    ...over,
    path,
    ...(size ? [size] : []),
  );
  assert.equal(result.code, 0, `qemu-img create ${path}: ${result.stderr}`);
}

/** Runs `qemu-io -f FORMAT -c C1 -c C2 ... PATH` and asserts it exited 0 without an error line. */
export async function qemuIo(path: string, format: string, commands: string[]): Promise<void> {
  const args = ["-f", format, ...commands.flatMap((c) => ["-c", c]), path];
  const result = await run("qemu-io", args);
  assert.equal(result.code, 0, `qemu-io ${args.join(" ")}: ${result.stderr}`);
  assert.doesNotMatch(result.stdout + result.stderr, /Pattern verification failed|error/i);
}

/**
 * QEMU's map of an image (`qemu-img map --output=json`, the shape `blktap
 * map --json` prints); with -U, as the image may be locked by a disk
 * process that flushed it.
 */
export async function qemuMap(path: string, format?: string): Promise<MapEntry[]> {
  const args = ["map", "-U", "--output=json", ...(format ? ["-f", format] : []), path];
  const result = await qemuImg(...args);
  if (result.code !== 0) throw new Error(`qemu-img map ${path}: ${result.stderr}`);
  return JSON.parse(result.stdout);
}

/** Asserts `qemu-img compare` finds the same guest bytes in `a` and `b` (formats probed unless given). */
export async function assertQemuSame(
  a: string,
  b: string,
  formats: { a?: string; b?: string } = {},
): Promise<void> {
  const args = ["compare", ...(formats.a ? ["-f", formats.a] : [])];
  if (formats.b) args.push("-F", formats.b);
  const result = await qemuImg(...args, a, b);
  assert.equal(
    result.code,
    0,
    `qemu-img ${args.join(" ")} ${a} ${b}: ${result.stdout}${result.stderr}`,
  );
}

/** Reads an image's guest bytes as QEMU sees them (converted to raw in `dir`). */
export async function qemuReadAll(
  image: string,
  dir: string,
  format?: string,
): Promise<Uint8Array> {
  const out = `${dir}/qemu-read-${crypto.randomUUID()}.raw`;
  const args = ["convert", "-U", ...(format ? ["-f", format] : []), "-O", "raw", image, out];
  const result = await qemuImg(...args);
  assert.equal(result.code, 0, `qemu-img ${args.join(" ")}: ${result.stderr}`);
  try {
    return await Deno.readFile(out);
  } finally {
    await Deno.remove(out);
  }
}
