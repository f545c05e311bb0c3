/**
 * Serialized, batched writing of replies to one connection. Replies are
 * queued whole (header and payload together), so chunks of two replies
 * never interleave on the wire; while one socket write is in flight the
 * replies that complete meanwhile gather, and small ones are copied into a
 * staging buffer so a burst of 4 KiB reads leaves in one `write` (Deno has
 * no writev). Large payloads are written from their own buffer, uncopied.
 * A payload's owner gets it back once its bytes (or their copy) are on the
 * wire, so the payload budget also bounds the copies waiting here. A reply
 * written by other means (sendfile on the socket's own descriptor) is
 * queued as a step of its own, run in its turn: it never overlaps a write.
 * @module
 */

/** A sink of bytes (a `Deno.Conn`, or a test double). */
export interface ByteSink {
  write(bytes: Uint8Array): Promise<number>;
}

/** Payloads up to this size are copied into the staging buffer. */
export const copy_payload_bytes_max = 64 << 10;
const staging_bytes = 256 << 10;
const spare_staging_buffers_max = 4;

interface Segment {
  bytes: Uint8Array;
  release?: () => void;
  /** Not copied: the caller's memory until `release`. */
  owned?: boolean;
  /** Writes this segment's `lengthBytes` itself (instead of `bytes`). */
  send?: () => Promise<void>;
  lengthBytes?: number;
}

/** The write side of a connection. */
export class ReplyWriter {
  readonly #sink: ByteSink;
  #staging: Uint8Array = new Uint8Array(staging_bytes);
  #stagingLength = 0;
  /** Owners of payloads copied into the staging buffer: released once it is written. */
  #stagingReleases: (() => void)[] = [];
  readonly #spare: Uint8Array[] = [];
  readonly #queue: Segment[] = [];
  /** Bytes accepted and not yet written. */
  #pendingBytes = 0;
  /** Of those, bytes in owned (uncopied) segments: memory of the payload budget. */
  #pendingOwnedBytes = 0;
  #writing = false;
  /** When the socket last accepted bytes (or the writer went from idle to busy). */
  #progressMs = 0;
  #scheduled = false;
  #failure: unknown;
  #idleWaiters: (() => void)[] = [];

  constructor(sink: ByteSink) {
    this.#sink = sink;
  }

  /** Bytes queued and not yet handed to the socket. */
  get pendingBytes(): number {
    return this.#pendingBytes;
  }

  /** Queued bytes this writer copied (its own memory): the back-pressure measure. */
  get pendingCopiedBytes(): number {
    return this.#pendingBytes - this.#pendingOwnedBytes;
  }

  /** How long queued replies have waited without the socket taking any (0 when idle). */
  stalledMs(nowMs: number): number {
    return this.#writing ? nowMs - this.#progressMs : 0;
  }

  /** The socket write error that stopped this writer, if any. */
  get failed(): boolean {
    return this.#failure !== undefined;
  }

  /** Queues a copy of `bytes` (a header built in a scratch buffer). */
  pushCopy(bytes: Uint8Array): void {
    if (this.#failure !== undefined) return;
    const length = bytes.byteLength;
    if (this.#stagingLength + length > this.#staging.byteLength) this.#seal();
    if (length > this.#staging.byteLength) {
      this.#queue.push({ bytes: bytes.slice() });
    } else {
      this.#staging.set(bytes, this.#stagingLength);
      this.#stagingLength += length;
    }
    this.#pendingBytes += length;
    this.#kick();
  }

  /** Queues `length` zero bytes (at most `copy_payload_bytes_max`): a read of known zeros. */
  pushZeros(length: number): void {
    if (length > copy_payload_bytes_max) throw new Error(`pushZeros: ${length} bytes is too long`);
    if (this.#failure !== undefined) return;
    if (this.#stagingLength + length > this.#staging.byteLength) this.#seal();
    // The staging buffer is reused: its bytes are those of earlier replies.
    this.#staging.fill(0, this.#stagingLength, this.#stagingLength + length);
    this.#stagingLength += length;
    this.#pendingBytes += length;
    this.#kick();
  }

  /**
   * Queues `bytes` without copying when large; `release` runs once they
   * (or their copy) have been written, or dropped on failure.
   */
  pushOwned(bytes: Uint8Array, release?: () => void): void {
    if (this.#failure !== undefined) {
      release?.();
      return;
    }
    if (bytes.byteLength <= copy_payload_bytes_max) {
      this.pushCopy(bytes);
      if (release && bytes.byteLength === 0) release();
      else if (release) this.#stagingReleases.push(release);
      return;
    }
    this.#seal();
    this.#queue.push({ bytes, release, owned: true });
    this.#pendingBytes += bytes.byteLength;
    this.#pendingOwnedBytes += bytes.byteLength;
    this.#kick();
  }

  /**
   * Queues a reply of `lengthBytes` that `send` writes to the socket by
   * other means, once everything queued before it has been written and
   * before anything queued after; `release` runs after it, or when it is
   * dropped (the writer failed). A rejected `send` fails the writer.
   */
  pushSend(lengthBytes: number, send: () => Promise<void>, release: () => void): void {
    if (this.#failure !== undefined) {
      release();
      return;
    }
    this.#seal();
    this.#queue.push({ bytes: new Uint8Array(0), send, lengthBytes, release, owned: true });
    this.#pendingBytes += lengthBytes;
    this.#pendingOwnedBytes += lengthBytes;
    this.#kick();
  }

  /**
   * Runs `release` once every byte queued before this call has been
   * written (or dropped): for a buffer whose parts went out as several
   * segments (a sparse READ's data chunks).
   */
  pushRelease(release: () => void): void {
    if (this.#failure !== undefined) {
      release();
      return;
    }
    this.#seal();
    this.#queue.push({ bytes: new Uint8Array(0), release });
    this.#kick();
  }

  /** Resolves once everything queued so far has been written (or dropped). */
  idle(): Promise<void> {
    if (!this.#writing && !this.#scheduled && this.#stagingLength === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  // Moves the staging buffer's bytes into the queue as one segment.
  #seal(): void {
    if (this.#stagingLength === 0) return;
    const staging = this.#staging;
    const releases = this.#stagingReleases;
    this.#stagingReleases = [];
    this.#queue.push({
      bytes: staging.subarray(0, this.#stagingLength),
      release: () => {
        if (this.#spare.length < spare_staging_buffers_max) this.#spare.push(staging);
        for (const release of releases) release();
      },
    });
    this.#staging = this.#spare.pop() ?? new Uint8Array(staging_bytes);
    this.#stagingLength = 0;
  }

  #kick(): void {
    if (this.#writing || this.#scheduled) return;
    this.#scheduled = true;
    // A microtask later: replies completing in the same turn share the write.
    queueMicrotask(() => this.#run());
  }

  async #run(): Promise<void> {
    this.#scheduled = false;
    this.#writing = true;
    this.#progressMs = performance.now();
    try {
      for (;;) {
        if (this.#queue.length === 0) this.#seal();
        const segment = this.#queue.shift();
        if (!segment) break;
        const length = segment.lengthBytes ?? segment.bytes.byteLength;
        try {
          if (segment.send) await segment.send();
          else await this.#writeAll(segment.bytes);
          this.#progressMs = performance.now();
        } finally {
          this.#pendingBytes = Math.max(0, this.#pendingBytes - length);
          if (segment.owned) this.#pendingOwnedBytes -= length;
          segment.release?.();
        }
      }
    } catch (error) {
      this.#fail(error);
    } finally {
      this.#writing = false;
      const waiters = this.#idleWaiters;
      this.#idleWaiters = [];
      for (const wake of waiters) wake();
    }
  }

  async #writeAll(bytes: Uint8Array): Promise<void> {
    let done = 0;
    while (done < bytes.byteLength) {
      done += await this.#sink.write(done === 0 ? bytes : bytes.subarray(done));
      this.#progressMs = performance.now();
    }
  }

  #fail(error: unknown): void {
    this.#failure = error ?? new Error("write failed");
    for (const segment of this.#queue.splice(0)) segment.release?.();
    for (const release of this.#stagingReleases.splice(0)) release();
    this.#stagingLength = 0;
    this.#pendingBytes = 0;
    this.#pendingOwnedBytes = 0;
  }
}
