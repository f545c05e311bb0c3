/**
 * An in-memory sparse disk for front-end, ring and disk-server tests: 64 KiB
 * chunks allocated on first write (absent chunks are holes that read as
 * zeros), counters for flushes and concurrency, optional delays (fixed or
 * random, to let completions overtake each other), injected failures, and
 * a buffer lender standing in for a ring's data pages.
 * @module
 */
import {
  BlockDriverBase,
  BlockError,
  type BufferLender,
  type DriverCapabilities,
  type Extent,
  type ZeroOptions,
} from "../../src/formats/driver.ts";

const chunk_bytes = 64 << 10;

/** Options of {@linkcode MemoryDriver}. */
export interface MemoryDriverOptions {
  readOnly?: boolean;
  /** Milliseconds each read/write waits before completing (to test concurrency). */
  delayMs?: number;
  /** Wait a random time in [0, delayMs) instead, so completions come out of order. */
  randomDelay?: boolean;
  /** Answer block status (default true); false: EOPNOTSUPP, as drivers without extents. */
  extents?: boolean;
  /** Fail every operation touching this offset with EIO. */
  failAtBytes?: number;
}

/** A sparse disk in memory. */
export class MemoryDriver extends BlockDriverBase {
  readonly format = "memory";
  readonly path: string;
  readonly sizeBytes: number;
  readonly capabilities: DriverCapabilities;
  readonly chunks = new Map<number, Uint8Array>();
  flushCount = 0;
  /** Reads and writes running now, and the most ever at once. */
  inflight = 0;
  inflightMax = 0;
  /** Delay of each read and write; may be changed between runs. */
  delayMs: number;
  randomDelay: boolean;
  readonly #options: MemoryDriverOptions;

  constructor(sizeBytes: number, options: MemoryDriverOptions = {}, path = "memory") {
    super();
    this.sizeBytes = sizeBytes;
    this.path = path;
    this.#options = options;
    this.delayMs = options.delayMs ?? 0;
    this.randomDelay = options.randomDelay ?? false;
    const canWrite = !options.readOnly;
    this.capabilities = {
      canWrite,
      canFlush: true,
      canDiscard: canWrite,
      canZero: canWrite,
      canExtents: options.extents ?? true,
      canMultiConn: true,
    };
  }

  /** A copy of the whole disk, holes as zeros. */
  contents(): Uint8Array {
    const out = new Uint8Array(this.sizeBytes);
    for (const [i, chunk] of this.chunks) {
      out.set(
        chunk.subarray(0, Math.min(chunk_bytes, this.sizeBytes - i * chunk_bytes)),
        i * chunk_bytes,
      );
    }
    return out;
  }

  /** Stores `data` at `offsetBytes` at once (no delay, no failure): what a completed write leaves. */
  store(offsetBytes: number, data: Uint8Array): void {
    this.#walk(offsetBytes, data.byteLength, (i, o, n, p) => {
      let chunk = this.chunks.get(i);
      if (!chunk) this.chunks.set(i, chunk = new Uint8Array(chunk_bytes));
      chunk.set(data.subarray(p, p + n), o);
    });
  }

  async #maybeDelay(offsetBytes: number, lengthBytes: number): Promise<void> {
    const { failAtBytes } = this.#options;
    this.inflightMax = Math.max(this.inflightMax, ++this.inflight);
    try {
      const delayMs = this.randomDelay ? Math.random() * this.delayMs : this.delayMs;
      if (delayMs > 0) await new Promise((resolve) => setTimeout(resolve, delayMs));
    } finally {
      this.inflight--;
    }
    if (
      failAtBytes !== undefined && offsetBytes <= failAtBytes &&
      failAtBytes < offsetBytes + lengthBytes
    ) {
      throw new BlockError("EIO", `${this.path}: injected failure at ${failAtBytes}`);
    }
  }

  // Calls `visit(chunkIndex, offsetInChunk, length, positionInRange)` over a range.
  #walk(
    offsetBytes: number,
    lengthBytes: number,
    visit: (i: number, o: number, n: number, p: number) => void,
  ) {
    let position = 0;
    while (position < lengthBytes) {
      const absolute = offsetBytes + position;
      const index = Math.floor(absolute / chunk_bytes);
      const within = absolute % chunk_bytes;
      const n = Math.min(chunk_bytes - within, lengthBytes - position);
      visit(index, within, n, position);
      position += n;
    }
  }

  protected async _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    await this.#maybeDelay(offsetBytes, buffer.byteLength);
    this.#walk(offsetBytes, buffer.byteLength, (i, o, n, p) => {
      const chunk = this.chunks.get(i);
      if (chunk) buffer.set(chunk.subarray(o, o + n), p);
      else buffer.fill(0, p, p + n);
    });
  }

  protected async _write(offsetBytes: number, data: Uint8Array): Promise<void> {
    await this.#maybeDelay(offsetBytes, data.byteLength);
    this.store(offsetBytes, data);
  }

  protected _flush(): Promise<void> {
    this.flushCount++;
    return Promise.resolve();
  }

  protected override _discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.#walk(offsetBytes, lengthBytes, (i, o, n) => {
      if (n === chunk_bytes) this.chunks.delete(i);
      else this.chunks.get(i)?.fill(0, o, o + n);
    });
    return Promise.resolve();
  }

  protected override async _writeZeroes(
    offsetBytes: number,
    lengthBytes: number,
    options: ZeroOptions,
  ) {
    if (options.mayTrim) return this._discard(offsetBytes, lengthBytes);
    if (options.fast) throw new BlockError("EOPNOTSUPP", `${this.path}: no fast zeroing`);
    await super._writeZeroes(offsetBytes, lengthBytes, options);
  }

  protected override _blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    const extents: Extent[] = [];
    this.#walk(offsetBytes, lengthBytes, (i, _o, n, p) => {
      const hole = !this.chunks.has(i);
      const last = extents[extents.length - 1];
      if (last && last.hole === hole) last.lengthBytes += n;
      else extents.push({ offsetBytes: offsetBytes + p, lengthBytes: n, hole, zero: hole });
    });
    return Promise.resolve(extents);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** A {@linkcode MemoryDriver} that lends buffers from a fixed budget, like a ring's data pages. */
export class LendingMemoryDriver extends MemoryDriver implements BufferLender {
  borrowed = 0;
  returned = 0;
  refused = 0;
  #outstandingBytes = 0;
  readonly #budgetBytes: number;
  readonly #lent = new Set<Uint8Array>();

  constructor(sizeBytes: number, budgetBytes: number, options: MemoryDriverOptions = {}) {
    super(sizeBytes, options, "lending-memory");
    this.#budgetBytes = budgetBytes;
  }

  borrowBuffer(lengthBytes: number): Uint8Array | undefined {
    if (this.#outstandingBytes + lengthBytes > this.#budgetBytes) {
      this.refused++;
      return undefined;
    }
    this.#outstandingBytes += lengthBytes;
    this.borrowed++;
    const buffer = new Uint8Array(lengthBytes);
    this.#lent.add(buffer);
    return buffer;
  }

  returnBuffer(buffer: Uint8Array): void {
    if (!this.#lent.delete(buffer)) throw new Error("returnBuffer of a buffer not lent (or twice)");
    this.#outstandingBytes -= buffer.byteLength;
    this.returned++;
  }

  /** Buffers lent and not yet returned. */
  get outstanding(): number {
    return this.#lent.size;
  }
}
