/**
 * The crash simulator (DESIGN.md §8, issue 11): every crash point of a
 * seeded workload, for any format.
 *
 * A seeded workload (writes of mixed sizes, overwrites, zero writes,
 * discards where the driver does them, flushes, several writers at once)
 * runs through a format driver on a {@linkcode FaultFile}, which logs every
 * I/O. Then, for every write I/O k (not a sample), the simulator rebuilds
 * the image a crash right after I/O k would leave: what completed flushes
 * made durable, plus every other I/O dropped, applied or torn at 512 bytes
 * in a random order (a seeded policy per point). On each crash image:
 *
 * - the format's `check` finds no corruption (leaks are allowed);
 * - every sector reads as a value the guest model allows: its value at the
 *   last completed flush (every write acknowledged before that flush reads
 *   back), or any later acknowledged or in-flight write, or — for sectors
 *   never written — the prior content (zeros, or the backing file's);
 *   nothing never written is visible;
 * - every `reopenEvery`-th point: opened read-write (the format's recovery
 *   of a dead writer runs), the image reads the same and `check` finds
 *   neither corruption nor leaks;
 * - every `qemuEvery`-th point (QEMU installed): `qemu-img check` where QEMU
 *   has one for the format, and `qemu-img compare` against what we read.
 *
 * A format plugs in with a {@linkcode CrashFormat}: create an image, open a
 * driver on an ImageFile, check an ImageFile. See tests/formats/qcow/
 * crash_sim_test.ts and tests/formats/vmdk/crash_sim_test.ts; bench/crash.sh
 * runs a million points.
 * @module
 */
import { Buffer } from "node:buffer";
import { AppendSpace } from "../../src/formats/append_space.ts";
import type { BlockDriver } from "../../src/formats/driver.ts";
import type { ImageFile } from "../../src/formats/image_file.ts";
import type { CheckReport } from "../../src/formats/inspect.ts";
import {
  type CrashImage,
  type CrashPolicy,
  FaultFile,
  FileSweep,
  type LogEvent,
  MemoryFile,
  sector_bytes,
} from "./fault_file.ts";
import { Random } from "./random.ts";
import { hasTool, run } from "./tools.ts";

/** What a format gives the simulator. */
export interface CrashFormat {
  /** For messages. */
  name: string;
  /**
   * Creates a fresh image at `path` (and whatever it needs beside it, such
   * as a backing file, in the same folder) of `sizeBytes`; returns what the
   * guest sees before any write (zeros, or the backing file's content).
   */
  create(path: string, sizeBytes: number, rng: Random): Promise<Uint8Array>;
  /** Opens a driver on `file`, the image at `path` (its parents by their paths). */
  open(path: string, file: ImageFile, readOnly: boolean): Promise<BlockDriver>;
  /** The format's structural check of `file` (the image at `path`). */
  check(path: string, file: ImageFile): Promise<CheckReport>;
  /** `qemu-img` format name, for `qemu-img compare` on crash images. */
  qemuFormat?: string;
  /** Set where QEMU has a `check` for the format (qcow2, vmdk; not qcow v1). */
  qemuCheck?: boolean;
  /**
   * Set where a read-write open cannot know a crash happened, so leaks stay
   * until `check --repair` (qcow2 v2 has no dirty bit; QEMU behaves alike).
   */
  reopenKeepsLeaks?: boolean;
}

/** Knobs of one simulation. */
export interface CrashSimOptions {
  seed: number;
  /** Folder for the image (and crash images handed to QEMU). */
  dir: string;
  sizeBytes: number;
  /** Stop the workload once the file saw this many write I/Os (the crash points). */
  ios: number;
  /** Concurrent writers. */
  writers?: number;
  /** Share of guest operations that are flushes (besides those `flushesMin` forces). */
  flushShare?: number;
  /**
   * Guest flushes the workload makes whatever its random draws: one starts
   * whenever a writer finds none started in the last `ios / flushesMin`
   * I/Os (default 10; the tests assert 5, leaving room for the I/Os of
   * writes still in flight past that mark).
   */
  flushesMin?: number;
  /** Largest write, in sectors. */
  writeSectorsMax?: number;
  /** Every n-th point is also opened read-write and checked again (0: never). */
  reopenEvery?: number;
  /** Every n-th point goes to QEMU when it is installed (0: never). */
  qemuEvery?: number;
  /** QEMU processes at once. */
  qemuParallel?: number;
  /**
   * First growth step of files allocating at their end (src/formats/
   * append_space.ts), small so that growth and its barrier happen often.
   */
  growthChunkBytes?: number;
}

/** What a simulation did. */
export interface CrashSimResult {
  points: number;
  reopened: number;
  qemuChecked: number;
  guestWrites: number;
  guestFlushes: number;
  /** Most I/Os a crash point could drop, reorder or tear. */
  volatileMax: number;
  seconds: number;
}

/** A guest operation in the log. */
type GuestNote =
  | { g: "write"; id: number; offset: number; data: Uint8Array }
  | { g: "discard"; id: number; offset: number; length: number }
  | { g: "ack"; id: number }
  | { g: "flush"; id: number }
  | { g: "flushed"; id: number };

/** Runs the workload, then checks every crash point. Throws at the first violation. */
export async function simulateCrashes(
  format: CrashFormat,
  options: CrashSimOptions,
): Promise<CrashSimResult> {
  const started = performance.now();
  const rng = new Random(options.seed);
  const path = `${options.dir}/${format.name.replace(/\W/g, "_")}.img`;
  const prior = await format.create(path, options.sizeBytes, rng);
  const file = new FaultFile(path, await Deno.readFile(path));
  const growth = AppendSpace.growthChunkBytesMin;
  AppendSpace.growthChunkBytesMin = options.growthChunkBytes ?? 256 << 10;
  let workload;
  try {
    workload = await runWorkload(format, path, file, rng, options);
  } finally {
    AppendSpace.growthChunkBytesMin = growth;
  }
  const result = await checkCrashPoints(format, path, file, prior, options);
  return { ...result, ...workload, seconds: (performance.now() - started) / 1000 };
}

// ---- workload ---------------------------------------------------------------

async function runWorkload(
  format: CrashFormat,
  path: string,
  file: FaultFile,
  rng: Random,
  options: CrashSimOptions,
): Promise<{ guestWrites: number; guestFlushes: number }> {
  file.completionTurns = () => (rng.next() < 0.3 ? rng.int(1, 4) : 0);
  const driver = await format.open(path, file, false);
  const sectors = Math.floor(driver.sizeBytes / sector_bytes);
  const busy: [number, number][] = [];
  const hot: number[] = [];
  let nextId = 1;
  let guestWrites = 0;
  let guestFlushes = 0;
  let ops = 0;
  const flushEveryIos = Math.max(1, Math.floor(options.ios / (options.flushesMin ?? 10)));
  let lastFlushIos = 0;
  const writer = async () => {
    while (file.ios < options.ios && ops < options.ios * 8) {
      ops += 1;
      const id = nextId++;
      const flushDue = file.ios - lastFlushIos >= flushEveryIos;
      if (rng.next() < (options.flushShare ?? 0.04) || flushDue) {
        guestFlushes += 1;
        lastFlushIos = file.ios;
        file.note({ g: "flush", id } satisfies GuestNote);
        await driver.flush();
        file.note({ g: "flushed", id } satisfies GuestNote);
        continue;
      }
      const [first, count] = pickRange(rng, sectors, busy, hot, options.writeSectorsMax ?? 64);
      const range: [number, number] = [first, first + count];
      busy.push(range);
      const offset = first * sector_bytes;
      const length = count * sector_bytes;
      try {
        guestWrites += 1;
        await guestWrite(driver, file, rng, id, offset, length);
      } finally {
        busy.splice(busy.indexOf(range), 1);
      }
    }
  };
  await Promise.all(Array.from({ length: options.writers ?? 4 }, writer));
  await driver.close();
  return { guestWrites, guestFlushes };
}

// Writes (random bytes, or zeros) or discards one range and logs it.
async function guestWrite(
  driver: BlockDriver,
  file: FaultFile,
  rng: Random,
  id: number,
  offset: number,
  length: number,
): Promise<void> {
  const kind = rng.next();
  if (kind < 0.05 && driver.capabilities.canDiscard) {
    file.note({ g: "discard", id, offset, length } satisfies GuestNote);
    await driver.discard(offset, length);
  } else if (kind < 0.12) {
    file.note({ g: "write", id, offset, data: new Uint8Array(length) } satisfies GuestNote);
    await driver.writeZeroes(offset, length);
  } else {
    const data = rng.bytes(length);
    file.note({ g: "write", id, offset, data } satisfies GuestNote);
    await driver.write(offset, data);
  }
  file.note({ g: "ack", id } satisfies GuestNote);
}

/** A sector range no request in flight touches: often over earlier writes, sometimes far. */
function pickRange(
  rng: Random,
  sectors: number,
  busy: [number, number][],
  hot: number[],
  maxSectors: number,
): [number, number] {
  for (;;) {
    const r = rng.next();
    const count = r < 0.5
      ? rng.int(1, 8)
      : r < 0.9
      ? rng.int(8, maxSectors)
      : rng.int(1, 4 * maxSectors);
    const near = hot.length > 0 && rng.next() < 0.5;
    const base = near ? rng.pick(hot) + rng.int(-16, 16) : rng.int(0, sectors - 1);
    const first = Math.max(0, Math.min(sectors - count, base));
    if (busy.some(([s, e]) => first < e && s < first + count)) continue;
    if (hot.length < 64) hot.push(first);
    else hot[rng.int(0, 63)] = first;
    return [first, Math.min(count, sectors - first)];
  }
}

// ---- the guest's model ------------------------------------------------------

const PRIOR = -1;
const ZERO = -2;

interface GuestOp {
  kind: "write" | "discard";
  offset: number;
  length: number;
  data?: Uint8Array;
  acked: boolean;
  stable: boolean;
}

/**
 * What the guest may see, event by event: per sector, the operations that
 * touched it, which of them a completed flush made stable, and two images
 * (every write applied; stable writes applied) for a fast first comparison.
 */
class GuestModel {
  readonly prior: Uint8Array;
  readonly latest: Uint8Array;
  readonly stable: Uint8Array;
  /** Reused for reading each crash image. */
  readonly readBuffer: Uint8Array;
  readonly #ops = new Map<number, GuestOp>();
  readonly #sectorOps: (number[] | undefined)[];
  /** Acknowledged, not yet stable, in acknowledgement order. */
  #acked: number[] = [];
  readonly #flushCovers = new Map<number, number[]>();

  constructor(prior: Uint8Array) {
    this.prior = prior;
    this.latest = prior.slice();
    this.stable = prior.slice();
    this.readBuffer = new Uint8Array(prior.byteLength);
    this.#sectorOps = new Array(Math.ceil(prior.byteLength / sector_bytes));
  }

  apply(note: GuestNote): void {
    switch (note.g) {
      case "write":
      case "discard": {
        const length = note.g === "write" ? note.data.byteLength : note.length;
        const op: GuestOp = {
          kind: note.g,
          offset: note.offset,
          length,
          data: note.g === "write" ? note.data : undefined,
          acked: false,
          stable: false,
        };
        this.#ops.set(note.id, op);
        for (
          let s = note.offset / sector_bytes;
          s < (note.offset + length) / sector_bytes;
          s += 1
        ) {
          (this.#sectorOps[s] ??= []).push(note.id);
        }
        if (op.data) this.latest.set(op.data, op.offset);
        else this.latest.fill(0, op.offset, op.offset + length);
        break;
      }
      case "ack":
        this.#ops.get(note.id)!.acked = true;
        this.#acked.push(note.id);
        break;
      case "flush":
        // A flush covers every write acknowledged before it, also those an
        // earlier flush still running covers.
        this.#flushCovers.set(note.id, this.#acked.slice());
        break;
      case "flushed": {
        const covered = this.#flushCovers.get(note.id) ?? [];
        for (const id of covered) {
          const op = this.#ops.get(id)!;
          if (op.stable) continue;
          op.stable = true;
          if (op.data) this.stable.set(op.data, op.offset);
        }
        const done = new Set(covered);
        this.#acked = this.#acked.filter((id) => !done.has(id));
        this.#flushCovers.delete(note.id);
        break;
      }
    }
  }

  /** The first sector of `image` no allowed value explains, described; undefined if none. */
  violation(image: Uint8Array): string | undefined {
    const chunk = 64 << 10;
    for (let at = 0; at < image.byteLength; at += chunk) {
      const end = Math.min(image.byteLength, at + chunk);
      if (_same(image, this.latest, at, end) || _same(image, this.stable, at, end)) continue;
      for (let s = at; s < end; s += sector_bytes) {
        const problem = this.#sectorViolation(image, s / sector_bytes);
        if (problem) return problem;
      }
    }
    return undefined;
  }

  #sectorViolation(image: Uint8Array, sector: number): string | undefined {
    let allowed = [PRIOR];
    for (const id of this.#sectorOps[sector] ?? []) {
      const op = this.#ops.get(id)!;
      if (op.kind === "discard") allowed.push(ZERO, PRIOR);
      else if (op.stable) allowed = [id];
      else allowed.push(id);
    }
    const at = sector * sector_bytes;
    const got = image.subarray(at, at + sector_bytes);
    for (const a of allowed) if (_equal(got, this.#sectorOf(a, at))) return undefined;
    const seen = _equal(got, zero_sector)
      ? "zeros"
      : _equal(got, this.#sectorOf(PRIOR, at))
      ? "its prior content"
      : "bytes never written there";
    const stableOp = allowed[0] === PRIOR ? "its prior content" : `write #${allowed[0]}`;
    return `sector ${sector} (offset ${at}) reads ${seen}; allowed: ${stableOp}` +
      (allowed.length > 1 ? ` or ${allowed.slice(1).map(_name).join(", ")}` : "") +
      " (the first is the value at the last completed flush)";
  }

  /** The 512 bytes value `a` gives the sector at guest offset `at`. */
  #sectorOf(a: number, at: number): Uint8Array {
    if (a === PRIOR) return this.prior.subarray(at, at + sector_bytes);
    if (a === ZERO) return zero_sector;
    const op = this.#ops.get(a)!;
    return op.data!.subarray(at - op.offset, at - op.offset + sector_bytes);
  }
}

const zero_sector = new Uint8Array(sector_bytes);

function _name(a: number): string {
  return a === PRIOR ? "the prior content" : a === ZERO ? "zeros" : `write #${a}`;
}

// `a` and `b` agree on [start, end) (native memcmp).
function _same(a: Uint8Array, b: Uint8Array, start: number, end: number): boolean {
  return _equal(a.subarray(start, end), b.subarray(start, end));
}

function _equal(a: Uint8Array, b: Uint8Array): boolean {
  return a.byteLength === b.byteLength &&
    Buffer.compare(
        Buffer.from(a.buffer, a.byteOffset, a.byteLength),
        Buffer.from(b.buffer, b.byteOffset, b.byteLength),
      ) === 0;
}

// ---- crash points -----------------------------------------------------------

async function checkCrashPoints(
  format: CrashFormat,
  path: string,
  file: FaultFile,
  prior: Uint8Array,
  options: CrashSimOptions,
) {
  const sweep = new FileSweep(file.initial);
  const model = new GuestModel(prior);
  const qemu = new QemuPool(format, options);
  let points = 0;
  let reopened = 0;
  let volatileMax = 0;
  const ios = file.log.filter((e) => e.kind === "io").length;
  for (const event of file.log) {
    if (event.kind === "note") model.apply(event.note as GuestNote);
    else sweep.apply(event);
    if (event.kind !== "io") continue;
    points += 1;
    volatileMax = Math.max(volatileMax, sweep.volatileCount);
    const pointRng = new Random((options.seed ^ Math.imul(points, 0x9e3779b1)) >>> 0);
    const policy: CrashPolicy = pointRng.pick(["mixed", "mixed", "mixed", "drop-all", "apply-all"]);
    const state = sweep.crashImage(path, pointRng, policy);
    const where = `crash point ${points}/${ios} (seed ${options.seed}, ${policy}, ` +
      `after ${_describe(event)}, ${sweep.volatileCount} I/Os not durable)`;
    const reopen = (options.reopenEvery ?? 0) > 0 && points % options.reopenEvery! === 0;
    const image = await checkPoint(format, path, state, model, where, reopen);
    if (reopen) reopened += 1;
    if ((options.qemuEvery ?? 0) > 0 && points % options.qemuEvery! === 0) {
      await qemu.submit(state, image, where);
    }
  }
  const qemuChecked = await qemu.finish();
  return { points, reopened, qemuChecked, volatileMax };
}

function _describe(event: LogEvent): string {
  if (event.kind !== "io") return event.kind;
  const op = event.op;
  if (op.kind === "write") return `write of ${op.data.byteLength} bytes at ${op.offset}`;
  if (op.kind === "length") return `length change to ${op.length}`;
  return `punch of ${op.lengthBytes} bytes at ${op.offset}`;
}

/** Checks one crash image; returns what the guest reads from it. */
async function checkPoint(
  format: CrashFormat,
  path: string,
  crash: CrashImage,
  model: GuestModel,
  where: string,
  reopen: boolean,
): Promise<Uint8Array> {
  const fail = (message: string): never => {
    throw new Error(`${format.name}: ${where}: ${message}`);
  };
  const report = await format.check(path, crash);
  if (report.unusable) fail(`check: unusable: ${report.unusable}`);
  if (report.corruptions.length > 0) fail(`check: ${report.corruptions.join("; ")}`);
  const image = await readGuest(format, path, crash, true, model.readBuffer)
    .catch((error) => fail(`read: ${error.message}`));
  const violation = model.violation(image);
  if (violation) fail(violation);
  if (reopen) {
    const writable = new MemoryFile(path, crash.toState(), true);
    const again = await readGuest(format, path, writable, false)
      .catch((error) => fail(`read-write open: ${error.message}`));
    if (!_same(again, image, 0, image.byteLength)) {
      fail("a read-write open changed what the guest reads");
    }
    const after = await format.check(path, new MemoryFile(path, writable.contents, false));
    if (after.corruptions.length > 0 || after.unusable) {
      fail(`check after a read-write open: ${after.unusable ?? after.corruptions.join("; ")}`);
    }
    if (after.leakedClusters > 0 && !format.reopenKeepsLeaks) {
      fail(`${after.leakedClusters} leaked clusters left after a read-write open`);
    }
  }
  return image;
}

async function readGuest(
  format: CrashFormat,
  path: string,
  file: ImageFile,
  readOnly: boolean,
  out?: Uint8Array,
): Promise<Uint8Array> {
  const driver = await format.open(path, file, readOnly);
  try {
    out = out?.byteLength === driver.sizeBytes ? out : new Uint8Array(driver.sizeBytes);
    const chunk = 1 << 20;
    for (let at = 0; at < out.byteLength; at += chunk) {
      await driver.read(at, out.subarray(at, Math.min(out.byteLength, at + chunk)));
    }
    return out;
  } finally {
    await driver.close();
  }
}

// ---- QEMU -------------------------------------------------------------------

/** Crash images handed to qemu-img, a few at a time, beside the sweep. */
class QemuPool {
  readonly #format: CrashFormat;
  readonly #dir: string;
  readonly #parallel: number;
  readonly #enabled: boolean;
  readonly #running = new Set<Promise<void>>();
  /** File name slots not in use by a running job. */
  readonly #free: number[];
  #done = 0;
  #failure: Error | undefined;

  constructor(format: CrashFormat, options: CrashSimOptions) {
    this.#format = format;
    this.#dir = options.dir;
    this.#parallel = options.qemuParallel ?? 3;
    this.#free = Array.from({ length: this.#parallel }, (_, i) => i);
    this.#enabled = format.qemuFormat !== undefined && hasTool("qemu-img");
  }

  async submit(crash: CrashImage, image: Uint8Array, where: string): Promise<void> {
    if (!this.#enabled) return;
    if (this.#failure) throw this.#failure;
    while (this.#free.length === 0) await Promise.race(this.#running);
    const slot = this.#free.pop()!;
    // Both copied now: the crash image and the read buffer change at the next point.
    const job: Promise<void> = this.#run(slot, crash.toState().bytes, image.slice(), where)
      .catch((error) => {
        this.#failure ??= error;
      })
      .finally(() => {
        this.#running.delete(job);
        this.#free.push(slot);
      });
    this.#running.add(job);
  }

  async #run(slot: number, bytes: Uint8Array, image: Uint8Array, where: string) {
    const crash = `${this.#dir}/qemu-${slot}.${this.#format.qemuFormat}`;
    const raw = `${this.#dir}/qemu-${slot}.raw`;
    await Deno.writeFile(crash, bytes);
    await Deno.writeFile(raw, image);
    const fmt = this.#format.qemuFormat!;
    if (this.#format.qemuCheck) {
      const check = await run("qemu-img", ["check", "-f", fmt, crash]);
      // Exit 3: leaked clusters only, which a crash may leave (DESIGN.md §4).
      if (check.code !== 0 && check.code !== 3) {
        throw new Error(
          `${this.#format.name}: ${where}: qemu-img check: ${check.stdout}${check.stderr}`,
        );
      }
    }
    const compare = await run("qemu-img", ["compare", "-f", "raw", "-F", fmt, raw, crash]);
    if (compare.code !== 0) {
      throw new Error(
        `${this.#format.name}: ${where}: qemu-img compare with what we read: ${compare.stdout}${compare.stderr}`,
      );
    }
    this.#done += 1;
  }

  /** Waits for the jobs; throws the first failure; returns how many passed. */
  async finish(): Promise<number> {
    await Promise.all(this.#running);
    if (this.#failure) throw this.#failure;
    return this.#done;
  }
}
