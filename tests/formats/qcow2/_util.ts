/**
 * Helpers shared by the qcow2 tests: QEMU oracles (qemu-img check, compare,
 * create) and a seeded random-operation workload against a model.
 * @module
 */
import assert from "node:assert/strict";
import type { BlockDriver } from "../../../src/formats/driver.ts";
import { run, runOk } from "../../_helpers/tools.ts";
import type { Random } from "../../_helpers/random.ts";
import { firstDifference, randomWrite, readAll } from "../qcow/_util.ts";

export { firstDifference, hasQemu, inTempDir, noQemu, readAll } from "../qcow/_util.ts";

/** What `qemu-img check --output=json` counts. */
export interface QemuCheck {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  allocated: number;
  fragmented: number;
  compressed: number;
  imageEnd: number;
  exitCode: number;
  stderr: string;
}

/** Runs `qemu-img check --output=json` on a qcow2 image. */
export async function qemuCheck(path: string): Promise<QemuCheck> {
  const r = await run("qemu-img", ["check", "--output=json", "-f", "qcow2", path]);
  let json: Record<string, number> = {};
  try {
    json = JSON.parse(r.stdout);
  } catch {
    // exit code and stderr tell what went wrong
  }
  return {
    corruptions: json["corruptions"] ?? 0,
    leaks: json["leaks"] ?? 0,
    checkErrors: json["check-errors"] ?? 0,
    allocated: json["allocated-clusters"] ?? 0,
    fragmented: json["fragmented-clusters"] ?? 0,
    compressed: json["compressed-clusters"] ?? 0,
    imageEnd: json["image-end-offset"] ?? 0,
    exitCode: r.code,
    stderr: r.stderr,
  };
}

/** Asserts `qemu-img check` finds no corruption and (unless `leaksAllowed`) no leak. */
export async function assertQemuClean(path: string, leaksAllowed = false): Promise<QemuCheck> {
  const c = await qemuCheck(path);
  const what = `qemu-img check ${path}: ${JSON.stringify(c)}`;
  assert.equal(c.checkErrors, 0, what);
  assert.equal(c.corruptions, 0, what);
  if (!leaksAllowed) assert.equal(c.leaks, 0, what);
  return c;
}

/** Asserts `qemu-img compare` finds the qcow2 `image` identical to raw `expected` bytes. */
export async function assertQemuReads(dir: string, image: string, expected: Uint8Array) {
  const raw = `${dir}/expected-${crypto.randomUUID()}.raw`;
  await Deno.writeFile(raw, expected);
  try {
    const r = await run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", raw, image]);
    assert.equal(r.code, 0, `qemu-img compare ${image}: ${r.stdout}${r.stderr}`);
  } finally {
    await Deno.remove(raw);
  }
}

/** `qemu-img create -f qcow2` with `-o` options. */
export async function qemuCreate(
  path: string,
  size: number | string,
  options: Record<string, string> = {},
  backing?: { name: string; format: string },
): Promise<void> {
  const o = Object.entries(options).map(([k, v]) => `${k}=${v}`).join(",");
  const args = ["create", "-q", "-f", "qcow2"];
  if (o) args.push("-o", o);
  if (backing) args.push("-b", backing.name, "-F", backing.format);
  await runOk("qemu-img", [...args, path, String(size)]);
}

/** One operation of the random workload. */
export type Op =
  | { kind: "write"; offset: number; data: Uint8Array }
  | { kind: "zero"; offset: number; length: number; mayTrim: boolean }
  | { kind: "discard"; offset: number; length: number };

/** A random operation: mostly writes, some write-zeroes and discards (aligned or not). */
export function randomOp(rng: Random, diskBytes: number, clusterBytes: number): Op {
  const r = rng.next();
  if (r < 0.75) {
    const [offset, length] = randomWrite(rng, diskBytes);
    const data = rng.next() < 0.1 ? new Uint8Array(length) : rng.bytes(length);
    return { kind: "write", offset, data };
  }
  const clusters = rng.int(1, 8);
  let offset = rng.int(0, Math.floor(diskBytes / clusterBytes) - clusters) * clusterBytes;
  let length = clusters * clusterBytes;
  if (rng.next() < 0.3) {
    offset += rng.int(0, clusterBytes - 1);
    length = Math.min(diskBytes - offset, rng.int(1, length));
  }
  if (r < 0.9) return { kind: "zero", offset, length, mayTrim: rng.next() < 0.5 };
  return { kind: "discard", offset, length };
}

/** Ranges an op may leave either way (discard: old bytes or zeros). */
function apply(model: Uint8Array, op: Op, unsure: Uint8Array): void {
  if (op.kind === "write") model.set(op.data, op.offset);
  else if (op.kind === "zero") model.fill(0, op.offset, op.offset + op.length);
  else unsure.fill(1, op.offset, op.offset + op.length);
}

/** Runs `op` on `driver` (a discard the driver does not offer is skipped: the bytes stay). */
export function runOp(driver: BlockDriver, op: Op): Promise<void> {
  if (op.kind === "write") return driver.write(op.offset, op.data);
  if (op.kind === "zero") return driver.writeZeroes(op.offset, op.length, { mayTrim: op.mayTrim });
  if (!driver.capabilities.canDiscard) return Promise.resolve();
  return driver.discard(op.offset, op.length);
}

/**
 * Bursts of 1..`burst` non-overlapping random operations issued together,
 * `count` in all; the model follows. Bytes a discard touched are taken
 * from what the driver reads (discard may keep or zero them) and then
 * checked to be one or the other.
 */
export async function randomOps(
  driver: BlockDriver,
  model: Uint8Array,
  rng: Random,
  count: number,
  clusterBytes: number,
  burst = 8,
): Promise<void> {
  for (let i = 0; i < count;) {
    const ops: Op[] = [];
    const taken: [number, number][] = [];
    for (let b = rng.int(1, burst); b > 0 && i < count; b -= 1, i += 1) {
      let op = randomOp(rng, model.byteLength, clusterBytes);
      const range = (o: Op): [number, number] =>
        o.kind === "write"
          ? [o.offset, o.offset + o.data.byteLength]
          : [o.offset, o.offset + o.length];
      while (taken.some(([s, e]) => range(op)[0] < e && s < range(op)[1])) {
        op = randomOp(rng, model.byteLength, clusterBytes);
      }
      taken.push(range(op));
      ops.push(op);
    }
    const before = model.slice();
    const unsure = new Uint8Array(model.byteLength);
    for (const op of ops) apply(model, op, unsure);
    await Promise.all(ops.map((op) => runOp(driver, op)));
    if (ops.some((op) => op.kind === "discard")) {
      await _settleDiscards(driver, model, before, unsure, ops);
    }
    if (rng.next() < 0.05) await driver.flush();
  }
}

async function _settleDiscards(
  driver: BlockDriver,
  model: Uint8Array,
  before: Uint8Array,
  unsure: Uint8Array,
  ops: Op[],
): Promise<void> {
  for (const op of ops) {
    if (op.kind !== "discard") continue;
    const got = new Uint8Array(op.length);
    await driver.read(op.offset, got);
    for (let k = 0; k < op.length; k += 1) {
      const at: number = op.offset + k;
      if (got[k] !== 0 && got[k] !== before[at]) {
        assert.fail(
          `discard at ${op.offset}+${op.length}: byte ${at} reads ${got[k]}, neither old nor zero`,
        );
      }
      model[at] = got[k];
    }
  }
  void unsure;
}

/** Asserts the whole disk reads as `model`. */
export async function assertReads(driver: BlockDriver, model: Uint8Array, what: string) {
  const got = await readAll(driver);
  const at = firstDifference(got, model);
  assert.equal(at, -1, `${what}: first difference at byte ${at} (${got[at]} vs ${model[at]})`);
}

/** One operation of the SIGKILL test: a write (`data`) or a write-zeroes. */
export interface KillOp {
  offset: number;
  length: number;
  data?: Uint8Array;
}

/** A batch of the SIGKILL test: 1-8 non-overlapping writes and zeroes, deterministic in `rng`. */
export function killBatch(rng: Random, diskBytes: number): KillOp[] {
  const ops: KillOp[] = [];
  for (let n = rng.int(1, 8); n > 0; n -= 1) {
    const [offset, length] = randomWrite(rng, diskBytes);
    if (ops.some((o) => offset < o.offset + o.length && o.offset < offset + length)) continue;
    ops.push(rng.next() < 0.15 ? { offset, length } : { offset, length, data: rng.bytes(length) });
  }
  return ops;
}
