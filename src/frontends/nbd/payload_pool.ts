/**
 * Payload buffers for NBD requests that the driver does not lend, under one
 * server-wide memory budget. The data part of a buffer is page-aligned (so
 * the `aio` driver can DMA into it with O_DIRECT, no bounce copy) and
 * preceded by headroom where the reply header is written, so a READ reply
 * leaves in one socket write.
 *
 * Budget: every buffer a connection holds, and every free buffer kept for
 * reuse, counts its whole footprint; together they never exceed
 * `payload_bytes_max`. A connection takes at most
 * `connection_payload_bytes_max` at once (its share; a first buffer is
 * always allowed). A take that does not fit waits — the connection stops
 * reading its socket meanwhile — first for its own buffers to come back,
 * then in one first-come first-served queue for the server's, so no
 * connection overtakes another and a client whose requests complete keeps
 * making progress however many others are over their share.
 * @module
 */

const page_bytes = 4096;
/** Room before the data for the largest reply header (structured OFFSET_DATA: 28 bytes). */
export const payload_headroom_bytes = 64;
const class_bytes_min = 4096;
const pooled_buffers_per_class_max = 256;

/** A pooled buffer: `data` is the payload, `frame` = headroom + data. */
export interface Payload {
  /** `payload_headroom_bytes` + `lengthBytes`; the header goes at the end of the headroom. */
  readonly frame: Uint8Array;
  /** The payload bytes, page-aligned when the platform tells us addresses. */
  readonly data: Uint8Array;
  /** Size class (capacity of the whole data region). */
  readonly classBytes: number;
  /** The whole aligned region, reused for any length up to `classBytes`. */
  readonly region: Uint8Array;
}

/** The memory counts of a pool, for stats and tests. */
export interface PayloadMemory {
  /** Bytes of buffers connections hold now. */
  heldBytes: number;
  /** Most bytes ever held at once. */
  heldBytesPeak: number;
  /** Bytes of free buffers kept for reuse. */
  pooledBytes: number;
  /** Takes that had to wait for the server's budget (not counting waits for a connection's share). */
  waitsTotal: number;
}

function _assert(condition: boolean, what: string): void {
  if (!condition) throw new Error(`payload pool: ${what}`);
}

function sizeClass(lengthBytes: number): number {
  let size = class_bytes_min;
  while (size < lengthBytes) size *= 2;
  return size;
}

/** Bytes a buffer for a payload of `lengthBytes` occupies: its size class and alignment slack. */
export function payloadFootprintBytes(lengthBytes: number): number {
  return sizeClass(lengthBytes) + 2 * page_bytes;
}

function addressOf(bytes: Uint8Array): number | undefined {
  try {
    return Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes)));
  } catch {
    return undefined; // no FFI permission: alignment only matters to the aio driver
  }
}

// Carves a region whose data part (after the headroom) starts on a page.
function allocateRegion(classBytes: number): Uint8Array {
  const raw = new Uint8Array(payloadFootprintBytes(classBytes));
  const address = addressOf(raw) ?? 0;
  let start = (page_bytes - (address % page_bytes)) % page_bytes;
  if (start < payload_headroom_bytes) start += page_bytes;
  return raw.subarray(start - payload_headroom_bytes, start + classBytes);
}

function payloadOf(region: Uint8Array, classBytes: number, lengthBytes: number): Payload {
  return {
    region,
    classBytes,
    frame: region.subarray(0, payload_headroom_bytes + lengthBytes),
    data: region.subarray(payload_headroom_bytes, payload_headroom_bytes + lengthBytes),
  };
}

/** The payload memory of a server: buffers held by connections and free ones, within a budget. */
export class PayloadPool {
  /** The budget: held and pooled bytes together never exceed it. */
  readonly bytesMax: number;
  /** One connection's share. */
  readonly connectionBytesMax: number;
  readonly #free = new Map<number, Uint8Array[]>();
  readonly #queue: { classBytes: number; grant: () => void }[] = [];
  #held = 0;
  #heldPeak = 0;
  #pooled = 0;
  #waits = 0;

  constructor(bytesMax: number, connectionBytesMax: number) {
    if (!(connectionBytesMax > 0 && connectionBytesMax <= bytesMax)) {
      throw new RangeError(`payload share ${connectionBytesMax} outside 1..${bytesMax}`);
    }
    this.bytesMax = bytesMax;
    this.connectionBytesMax = connectionBytesMax;
  }

  /** The pool's own accounting. */
  get memory(): PayloadMemory {
    return {
      heldBytes: this.#held,
      heldBytesPeak: this.#heldPeak,
      pooledBytes: this.#pooled,
      waitsTotal: this.#waits,
    };
  }

  /** A connection's view: its takes are bounded by its share. */
  account(): PayloadAccount {
    return new PayloadAccount(this);
  }

  /** Throws unless a payload of `lengthBytes` can ever be granted (a limits check). */
  checkFits(lengthBytes: number, what: string): void {
    const needed = payloadFootprintBytes(lengthBytes);
    if (needed > this.bytesMax) {
      throw new RangeError(
        `${what}: ${this.bytesMax} bytes cannot hold one ${lengthBytes}-byte payload ` +
          `(${needed} bytes with alignment)`,
      );
    }
  }

  /** Resolves with a region of `classBytes` once the budget allows; FIFO among waiters. */
  _region(classBytes: number): Promise<Uint8Array> | Uint8Array {
    if (this.#queue.length === 0) {
      const region = this.#tryRegion(classBytes);
      if (region) return region;
    }
    this.#waits += 1;
    return new Promise((resolve) => {
      this.#queue.push({ classBytes, grant: () => resolve(this.#tryRegion(classBytes)!) });
    });
  }

  // A region within the budget (a free one of the class, or a new one after
  // evicting free ones of other classes), or undefined when it does not fit.
  #tryRegion(classBytes: number): Uint8Array | undefined {
    const footprint = payloadFootprintBytes(classBytes);
    const reused = this.#free.get(classBytes)?.pop();
    if (reused) {
      this.#pooled -= footprint;
    } else {
      if (this.#held + footprint > this.bytesMax) return undefined;
      this.#evict(this.#held + this.#pooled + footprint - this.bytesMax);
    }
    this.#held += footprint;
    this.#heldPeak = Math.max(this.#heldPeak, this.#held);
    _assert(this.#held + this.#pooled <= this.bytesMax, "budget exceeded");
    return reused ?? allocateRegion(classBytes);
  }

  // Drops free regions until `bytes` are released (largest classes first).
  #evict(bytes: number): void {
    const classes = [...this.#free.keys()].sort((a, b) => b - a);
    for (const classBytes of classes) {
      const list = this.#free.get(classBytes)!;
      while (bytes > 0 && list.length > 0) {
        list.pop();
        const footprint = payloadFootprintBytes(classBytes);
        this.#pooled -= footprint;
        bytes -= footprint;
      }
    }
  }

  /** Gives a region back; kept for reuse while the budget has room. */
  _release(region: Uint8Array, classBytes: number): void {
    const footprint = payloadFootprintBytes(classBytes);
    this.#held -= footprint;
    _assert(this.#held >= 0, "a buffer given back twice");
    const list = this.#free.get(classBytes) ?? [];
    if (
      list.length < pooled_buffers_per_class_max &&
      this.#held + this.#pooled + footprint <= this.bytesMax
    ) {
      list.push(region);
      this.#free.set(classBytes, list);
      this.#pooled += footprint;
    }
    this.#grantWaiters();
  }

  #grantWaiters(): void {
    while (this.#queue.length > 0) {
      const head = this.#queue[0];
      const footprint = payloadFootprintBytes(head.classBytes);
      const reusable = (this.#free.get(head.classBytes)?.length ?? 0) > 0;
      if (!reusable && this.#held + footprint > this.bytesMax) return;
      this.#queue.shift();
      head.grant();
    }
  }
}

/** One connection's payload buffers, bounded by its share of the pool. */
export class PayloadAccount {
  readonly #pool: PayloadPool;
  #held = 0;
  #waiters: (() => void)[] = [];

  constructor(pool: PayloadPool) {
    this.#pool = pool;
  }

  /** Bytes of buffers this connection holds. */
  get heldBytes(): number {
    return this.#held;
  }

  /**
   * A buffer whose `data` is exactly `lengthBytes`, once this connection's
   * share and the server's budget allow it. Give it back with
   * {@linkcode PayloadAccount.give} once nothing uses it.
   */
  async take(lengthBytes: number): Promise<Payload> {
    const classBytes = sizeClass(lengthBytes);
    const footprint = payloadFootprintBytes(classBytes);
    while (this.#held > 0 && this.#held + footprint > this.#pool.connectionBytesMax) {
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
    this.#held += footprint; // before waiting: the share is ours while we queue
    const region = await this.#pool._region(classBytes);
    return payloadOf(region, classBytes, lengthBytes);
  }

  /** Gives a buffer back; it must not be used afterwards. */
  give(payload: Payload): void {
    this.#held -= payloadFootprintBytes(payload.classBytes);
    this.#pool._release(payload.region, payload.classBytes);
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }
}
