/**
 * In-memory image files for crash simulation (DESIGN.md §8).
 *
 * {@linkcode MemoryFile} is an {@linkcode ImageFile} in memory, with the
 * data/hole map a file system would report (4 KiB blocks ever written are
 * data; punched and truncated ones are holes).
 *
 * {@linkcode FaultFile} is a MemoryFile that records, in order, every write
 * and length change when it is issued and when it completes, and every
 * flush when it starts and when it completes, in a log it shares with the
 * test (`note`), so a crash simulator (crash_sim.ts) can rebuild the file
 * as a crash right after any I/O would leave it. Completions are delayed by
 * a seeded number of turns, so concurrent I/Os interleave.
 * @module
 */
import type { FileExtent, ImageFile } from "../../src/formats/image_file.ts";
import type { Random } from "./random.ts";

/** Data/hole granularity, as file systems report it. */
export const block_bytes = 4096;
export const sector_bytes = 512;

function grow(bytes: Uint8Array, length: number): Uint8Array {
  if (length <= bytes.byteLength) return bytes;
  const out = new Uint8Array(Math.max(length, bytes.byteLength * 2));
  out.set(bytes);
  return out;
}

function growBits(bits: Uint8Array, blocks: number): Uint8Array {
  const need = Math.ceil(blocks / 8);
  if (need <= bits.byteLength) return bits;
  const out = new Uint8Array(Math.max(need, bits.byteLength * 2));
  out.set(bits);
  return out;
}

/**
 * The contents of a file: bytes up to `bytesEnd` (everything past it reads
 * as zeros, so a file grown sparse costs no memory), its length, and which
 * 4 KiB blocks hold data.
 */
export interface FileState {
  bytes: Uint8Array;
  /** Bytes past this offset are zeros (at most `length`). */
  bytesEnd: number;
  length: number;
  /** Bit per 4 KiB block: set when the block holds data. */
  dataBlocks: Uint8Array;
}

/** A copy of `state`. */
export function cloneState(state: FileState): FileState {
  return {
    bytes: state.bytes.slice(0, Math.max(state.bytesEnd, 1)),
    bytesEnd: state.bytesEnd,
    length: state.length,
    dataBlocks: state.dataBlocks.slice(),
  };
}

/** The file's bytes `[0, length)` in one array. */
export function stateBytes(state: FileState): Uint8Array {
  const out = new Uint8Array(state.length);
  out.set(state.bytes.subarray(0, Math.min(state.bytesEnd, state.length)));
  return out;
}

/** Writes `data` at `offset` into `state` (growing it). */
export function writeState(state: FileState, offset: number, data: Uint8Array): void {
  const end = offset + data.byteLength;
  state.bytes = grow(state.bytes, end);
  state.bytes.set(data, offset);
  if (end > state.bytesEnd) state.bytesEnd = end;
  if (end > state.length) state.length = end;
  state.dataBlocks = growBits(state.dataBlocks, Math.ceil(end / block_bytes));
  for (let b = Math.floor(offset / block_bytes); b * block_bytes < end; b += 1) {
    state.dataBlocks[b >> 3] |= 1 << (b & 7);
  }
}

/** Sets the length of `state`: bytes past it read as zeros, blocks past it are holes. */
export function truncateState(state: FileState, length: number): void {
  if (length < state.length) {
    if (length < state.bytesEnd) {
      state.bytes.fill(0, length, state.bytesEnd);
      state.bytesEnd = length;
    }
    const blocks = Math.ceil(state.length / block_bytes);
    for (let b = Math.ceil(length / block_bytes); b < blocks; b += 1) {
      if (b >> 3 >= state.dataBlocks.byteLength) break;
      state.dataBlocks[b >> 3] &= ~(1 << (b & 7));
    }
  }
  state.length = length;
}

/** Zeroes a range; the whole blocks inside it become holes. */
export function punchState(state: FileState, offset: number, lengthBytes: number): void {
  const end = Math.min(offset + lengthBytes, state.length);
  if (end <= offset) return;
  if (offset < state.bytesEnd) state.bytes.fill(0, offset, Math.min(end, state.bytesEnd));
  for (let b = Math.ceil(offset / block_bytes); (b + 1) * block_bytes <= end; b += 1) {
    state.dataBlocks[b >> 3] &= ~(1 << (b & 7));
  }
}

/** An {@linkcode ImageFile} in memory. */
export class MemoryFile implements ImageFile {
  readonly path: string;
  readonly writable: boolean;
  protected state: FileState;

  constructor(path: string, initial: Uint8Array | FileState, writable = true) {
    this.path = path;
    this.writable = writable;
    if (initial instanceof Uint8Array) {
      this.state = {
        bytes: new Uint8Array(0),
        bytesEnd: 0,
        length: 0,
        dataBlocks: new Uint8Array(0),
      };
      writeState(this.state, 0, initial);
    } else {
      this.state = initial;
    }
  }

  /** The current contents (shared, not copied). */
  get contents(): FileState {
    return this.state;
  }

  lengthBytes(): number {
    return this.state.length;
  }

  read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    const end = Math.min(this.state.bytesEnd, offsetBytes + buffer.byteLength);
    if (end > offsetBytes) buffer.set(this.state.bytes.subarray(offsetBytes, end));
    buffer.fill(0, Math.max(0, end - offsetBytes));
    return Promise.resolve();
  }

  write(offsetBytes: number, data: Uint8Array): Promise<void> {
    writeState(this.state, offsetBytes, data);
    return Promise.resolve();
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  truncate(lengthBytes: number): Promise<void> {
    truncateState(this.state, lengthBytes);
    return Promise.resolve();
  }

  punchHole(offsetBytes: number, lengthBytes: number): Promise<void> {
    punchState(this.state, offsetBytes, lengthBytes);
    return Promise.resolve();
  }

  allocate(offsetBytes: number, lengthBytes: number): Promise<void> {
    if (offsetBytes + lengthBytes > this.state.length) {
      return this.truncate(offsetBytes + lengthBytes);
    }
    return Promise.resolve();
  }

  extents(offsetBytes: number, lengthBytes: number): Promise<FileExtent[]> {
    const end = Math.min(this.state.length, offsetBytes + lengthBytes);
    const extents: FileExtent[] = [];
    const mapped = this.state.dataBlocks.byteLength * 8 * block_bytes;
    for (let at = offsetBytes; at < end;) {
      const b = Math.floor(at / block_bytes);
      const data = (this.state.dataBlocks[b >> 3] & (1 << (b & 7))) !== 0;
      const next = at >= mapped ? end : Math.min(end, (b + 1) * block_bytes);
      const last = extents[extents.length - 1];
      if (last && last.data === data) last.lengthBytes += next - at;
      else extents.push({ offsetBytes: at, lengthBytes: next - at, data });
      at = next;
    }
    return Promise.resolve(extents);
  }

  allocatedBytes(): number {
    let blocks = 0;
    for (
      let b = 0;
      b * block_bytes < this.state.length && b >> 3 < this.state.dataBlocks.byteLength;
      b += 1
    ) {
      if (this.state.dataBlocks[b >> 3] & (1 << (b & 7))) blocks += 1;
    }
    return blocks * block_bytes;
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** A change to the file's contents, as issued. */
export type FileOp =
  | { kind: "write"; offset: number; data: Uint8Array }
  /** ftruncate; `growOnly`: fallocate past the end, which never shortens the file. */
  | { kind: "length"; length: number; growOnly?: boolean }
  | { kind: "punch"; offset: number; lengthBytes: number };

/** One entry of the shared log. */
export type LogEvent =
  /** A write, length change or punch was issued (a crash point). */
  | { kind: "io"; id: number; op: FileOp }
  /** That I/O completed: a flush started after this covers it. */
  | { kind: "io-done"; id: number }
  /** `range`: a ranged flush (`flushRange`), covering less; see {@linkcode FileSweep}. */
  | { kind: "flush"; id: number; range?: [number, number] }
  | { kind: "flush-done"; id: number }
  /** Written by the test through {@linkcode FaultFile.note} (the guest's view). */
  | { kind: "note"; note: unknown };

/** A MemoryFile that logs every I/O for crash simulation. */
export class FaultFile extends MemoryFile {
  /** Every I/O in order, and the test's notes among them. */
  readonly log: LogEvent[] = [];
  /** The contents when the log began. */
  readonly #initial: FileState = cloneState(this.state);
  /** Extra turns before an I/O completes (seeded by the test; 0 when unset). */
  completionTurns?: () => number;
  #nextId = 1;
  /** I/Os issued so far (writes, length changes, punches). */
  ios = 0;

  /** Puts a test event into the log, between the I/Os around it. */
  note(note: unknown): void {
    this.log.push({ kind: "note", note });
  }

  async #turns(): Promise<void> {
    for (let n = this.completionTurns?.() ?? 0; n > 0; n -= 1) await Promise.resolve();
  }

  // Logs the issue, waits, applies, logs the completion.
  async #io(op: FileOp, apply: () => void): Promise<void> {
    const id = this.#nextId++;
    this.ios += 1;
    this.log.push({ kind: "io", id, op });
    await Promise.resolve();
    await this.#turns();
    apply();
    this.log.push({ kind: "io-done", id });
  }

  override write(offsetBytes: number, data: Uint8Array): Promise<void> {
    const copy = data.slice();
    return this.#io(
      { kind: "write", offset: offsetBytes, data: copy },
      () => writeState(this.state, offsetBytes, copy),
    );
  }

  override truncate(lengthBytes: number): Promise<void> {
    // The length is visible at once (callers read it back synchronously).
    truncateState(this.state, lengthBytes);
    return this.#io({ kind: "length", length: lengthBytes }, () => {});
  }

  override allocate(offsetBytes: number, lengthBytes: number): Promise<void> {
    const end = offsetBytes + lengthBytes;
    if (end <= this.state.length) return Promise.resolve();
    truncateState(this.state, end);
    return this.#io({ kind: "length", length: end, growOnly: true }, () => {});
  }

  override punchHole(offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.#io(
      { kind: "punch", offset: offsetBytes, lengthBytes },
      () => punchState(this.state, offsetBytes, lengthBytes),
    );
  }

  override async flush(): Promise<void> {
    await this.#flush();
  }

  /** A ranged fdatasync: see how {@linkcode FileSweep} treats it. */
  async flushRange(offsetBytes: number, lengthBytes: number): Promise<void> {
    await this.#flush([offsetBytes, offsetBytes + lengthBytes]);
  }

  async #flush(range?: [number, number]): Promise<void> {
    const id = this.#nextId++;
    this.log.push({ kind: "flush", id, range });
    await Promise.resolve();
    await this.#turns();
    this.log.push({ kind: "flush-done", id });
  }

  /** The contents when the log began (what the sweep starts from). */
  get initial(): FileState {
    return this.#initial;
  }

  /** The bytes a crash right now could leave (every unflushed I/O dropped, applied or torn). */
  crashImage(rng: Random): Uint8Array {
    const sweep = new FileSweep(this.#initial);
    for (const event of this.log) sweep.apply(event);
    return stateBytes(sweep.crashImage(this.path, rng).toState());
  }
}

/**
 * Whether a flush makes `op` durable: a full one every completed I/O; a
 * ranged one (fdatasync of a range) the writes and punches lying wholly in
 * its range, and length changes (the size is metadata it commits). Writes
 * reaching past the range stay volatile, the weaker assumption.
 */
function _covers(range: [number, number] | undefined, op: FileOp): boolean {
  if (!range) return true;
  if (op.kind === "length") return true;
  const start = op.offset;
  const end = op.kind === "write" ? op.offset + op.data.byteLength : op.offset + op.lengthBytes;
  return start >= range[0] && end <= range[1];
}

/** How a crash treats the I/Os no completed flush covers. */
export type CrashPolicy = "mixed" | "drop-all" | "apply-all";

/**
 * Replays a FaultFile's log event by event, keeping what is durable (I/Os
 * that completed before a flush that completed) apart from what is not.
 */
export class FileSweep {
  #durable: FileState;
  /** I/Os issued and not durable, in issue order. */
  readonly #volatile = new Map<number, { op: FileOp; done: boolean; doneOrder: number }>();
  readonly #flushCovers = new Map<number, number[]>();
  #doneOrder = 0;

  constructor(initial: FileState) {
    this.#durable = cloneState(initial);
  }

  /** I/Os that a crash now may or may not show. */
  get volatileCount(): number {
    return this.#volatile.size;
  }

  apply(event: LogEvent): void {
    switch (event.kind) {
      case "io":
        this.#volatile.set(event.id, { op: event.op, done: false, doneOrder: 0 });
        break;
      case "io-done": {
        const v = this.#volatile.get(event.id);
        if (v) {
          v.done = true;
          v.doneOrder = this.#doneOrder++;
        }
        break;
      }
      case "flush":
        this.#flushCovers.set(
          event.id,
          [...this.#volatile].filter(([, v]) => v.done && _covers(event.range, v.op))
            .map(([id]) => id),
        );
        break;
      case "flush-done":
        this.#makeDurable(this.#flushCovers.get(event.id) ?? []);
        this.#flushCovers.delete(event.id);
        break;
    }
  }

  // Applies covered I/Os to the durable state in completion order (as the page cache saw them).
  #makeDurable(ids: number[]): void {
    const ops = ids.map((id) => this.#volatile.get(id)).filter((v) => v !== undefined);
    ops.sort((a, b) => a.doneOrder - b.doneOrder);
    for (const v of ops) applyOp(this.#durable, v.op);
    for (const id of ids) this.#volatile.delete(id);
  }

  /**
   * The file after a crash now: the durable state, then every other I/O in
   * a random order, each dropped, applied, or torn at 512-byte sectors. The
   * image shares the durable bytes: use it before the sweep moves on.
   */
  crashImage(path: string, rng: Random, policy: CrashPolicy = "mixed"): CrashImage {
    const image = new CrashImage(path, this.#durable);
    const ops = [...this.#volatile.values()].map((v) => ({ op: v.op, key: rng.next() }));
    ops.sort((a, b) => a.key - b.key);
    for (const { op } of ops) {
      const fate = policy === "drop-all" ? 0 : policy === "apply-all" ? 0.5 : rng.next();
      if (fate < 1 / 3) continue; // dropped
      if (fate < 2 / 3 || op.kind !== "write") {
        image.apply(op);
        continue;
      }
      // Torn: a random subset of its (absolute) sectors made it.
      const end = op.offset + op.data.byteLength;
      for (let s = op.offset; s < end;) {
        const next = Math.min(end, (Math.floor(s / sector_bytes) + 1) * sector_bytes);
        if (rng.next() < 0.5) {
          image.apply({
            kind: "write",
            offset: s,
            data: op.data.subarray(s - op.offset, next - op.offset),
          });
        }
        s = next;
      }
    }
    return image;
  }
}

/**
 * A crash image, read-only: durable contents shared with the sweep, and the
 * I/Os the crash let through laid over them, so that no crash point copies
 * the whole file. `toState` makes a private copy (to open it read-write,
 * or to hand it to QEMU).
 */
export class CrashImage implements ImageFile {
  readonly path: string;
  readonly writable = false;
  readonly #base: FileState;
  /** Changes over the base, in order: bytes written, or a range zeroed. */
  readonly #layers: { offset: number; end: number; data?: Uint8Array }[] = [];
  /** Layer numbers by 64 KiB bucket of the file, in order (so a read visits only its own). */
  readonly #buckets = new Map<number, number[]>();
  #length: number;
  #dataBlocks: Uint8Array;

  constructor(path: string, base: FileState) {
    this.path = path;
    this.#base = base;
    this.#length = base.length;
    this.#dataBlocks = base.dataBlocks.slice();
  }

  /** Lays one I/O over the image. */
  apply(op: FileOp): void {
    if (op.kind === "write") {
      const end = op.offset + op.data.byteLength;
      this.#layer(op.offset, end, op.data);
      this.#length = Math.max(this.#length, end);
      this.#dataBlocks = growBits(this.#dataBlocks, Math.ceil(end / block_bytes));
      for (let b = Math.floor(op.offset / block_bytes); b * block_bytes < end; b += 1) {
        this.#dataBlocks[b >> 3] |= 1 << (b & 7);
      }
    } else if (op.kind === "length") {
      if (op.length < this.#length && !op.growOnly) {
        this.#layer(op.length, this.#length);
        this.#clearBlocks(
          Math.ceil(op.length / block_bytes),
          Math.ceil(this.#length / block_bytes),
        );
      }
      this.#length = op.growOnly ? Math.max(this.#length, op.length) : op.length;
    } else {
      const end = Math.min(op.offset + op.lengthBytes, this.#length);
      if (end <= op.offset) return;
      this.#layer(op.offset, end);
      this.#clearBlocks(Math.ceil(op.offset / block_bytes), Math.floor(end / block_bytes));
    }
  }

  // Bytes written over [offset, end), or zeros when `data` is absent.
  #layer(offset: number, end: number, data?: Uint8Array): void {
    const n = this.#layers.length;
    this.#layers.push({ offset, end, data });
    for (let b = Math.floor(offset / bucket_bytes); b * bucket_bytes < end; b += 1) {
      let list = this.#buckets.get(b);
      if (!list) this.#buckets.set(b, list = []);
      list.push(n);
    }
  }

  #clearBlocks(first: number, end: number): void {
    for (let b = first; b < end && b >> 3 < this.#dataBlocks.byteLength; b += 1) {
      this.#dataBlocks[b >> 3] &= ~(1 << (b & 7));
    }
  }

  lengthBytes(): number {
    return this.#length;
  }

  read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    const end = offsetBytes + buffer.byteLength;
    const baseEnd = Math.min(this.#base.bytesEnd, end, this.#length);
    if (baseEnd > offsetBytes) buffer.set(this.#base.bytes.subarray(offsetBytes, baseEnd));
    buffer.fill(0, Math.max(0, baseEnd - offsetBytes));
    const seen = new Set<number>();
    for (let b = Math.floor(offsetBytes / bucket_bytes); b * bucket_bytes < end; b += 1) {
      for (const n of this.#buckets.get(b) ?? []) seen.add(n);
    }
    for (const n of [...seen].sort((x, y) => x - y)) {
      const layer = this.#layers[n];
      const from = Math.max(offsetBytes, layer.offset);
      const to = Math.min(end, layer.end);
      if (from >= to) continue;
      if (layer.data) {
        buffer.set(layer.data.subarray(from - layer.offset, to - layer.offset), from - offsetBytes);
      } else buffer.fill(0, from - offsetBytes, to - offsetBytes);
    }
    if (end > this.#length) buffer.fill(0, Math.max(0, this.#length - offsetBytes));
    return Promise.resolve();
  }

  write(): Promise<void> {
    return Promise.reject(new Error(`${this.path}: crash image is read-only`));
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  truncate(): Promise<void> {
    return this.write();
  }
  punchHole(): Promise<void> {
    return this.write();
  }
  allocate(): Promise<void> {
    return this.write();
  }

  extents(offsetBytes: number, lengthBytes: number): Promise<FileExtent[]> {
    const state: FileState = {
      bytes: _empty,
      bytesEnd: 0,
      length: this.#length,
      dataBlocks: this.#dataBlocks,
    };
    return new MemoryFile(this.path, state, false).extents(offsetBytes, lengthBytes);
  }

  allocatedBytes(): number {
    const state: FileState = {
      bytes: _empty,
      bytesEnd: 0,
      length: this.#length,
      dataBlocks: this.#dataBlocks,
    };
    return new MemoryFile(this.path, state, false).allocatedBytes();
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  /** A private, writable copy of the image's contents. */
  toState(): FileState {
    const bytes = new Uint8Array(this.#length);
    this.read(0, bytes);
    return {
      bytes,
      bytesEnd: this.#length,
      length: this.#length,
      dataBlocks: this.#dataBlocks.slice(),
    };
  }
}

const _empty = new Uint8Array(0);
const bucket_bytes = 64 << 10;

/** Applies one I/O to a file's contents. */
export function applyOp(state: FileState, op: FileOp): void {
  if (op.kind === "write") writeState(state, op.offset, op.data);
  else if (op.kind === "length") {
    truncateState(state, op.growOnly ? Math.max(state.length, op.length) : op.length);
  } else punchState(state, op.offset, op.lengthBytes);
}
