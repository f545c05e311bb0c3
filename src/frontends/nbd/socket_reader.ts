/**
 * Buffered reading from a connection: one large `read` brings in many
 * request headers at once (a client at queue depth 32 sends them back to
 * back), which are parsed in place. Payloads go straight into their
 * destination: only the bytes that already arrived with the headers are
 * copied, the rest is read from the socket directly into the buffer.
 * @module
 */

/** A source of bytes (a `Deno.Conn`, or a test double). */
export interface ByteSource {
  read(buffer: Uint8Array): Promise<number | null>;
}

/** The connection ended in the middle of a message. */
export class ShortReadError extends Error {
  constructor(wanted: number) {
    super(`connection closed with ${wanted} bytes of a message still to come`);
    this.name = "ShortReadError";
  }
}

/** Reads a stream through a fixed buffer. */
export class SocketReader {
  readonly buffer: Uint8Array;
  readonly view: DataView;
  /** First unconsumed byte in `buffer`. */
  start = 0;
  /** End of the bytes received into `buffer`. */
  end = 0;
  readonly #source: ByteSource;

  constructor(source: ByteSource, bufferBytes: number) {
    this.#source = source;
    this.buffer = new Uint8Array(bufferBytes);
    this.view = new DataView(this.buffer.buffer);
  }

  /** Bytes received and not consumed. */
  get available(): number {
    return this.end - this.start;
  }

  /**
   * Makes at least `count` (≤ buffer size) bytes available from `start`.
   * Resolves false on a clean end of stream before any of them arrived;
   * throws {@linkcode ShortReadError} when the stream ends mid-message.
   * `exact`: read no more than `count` — the bytes behind are likely a
   * large payload, cheaper read straight into its destination than copied
   * out of this buffer.
   */
  async fill(count: number, exact = false): Promise<boolean> {
    if (this.end - this.start >= count) return true;
    if (this.start === this.end) this.start = this.end = 0;
    else if (this.start + count > this.buffer.byteLength) this.#compact();
    while (this.end - this.start < count) {
      const limit = exact ? this.start + count : this.buffer.byteLength;
      const got = await this.#source.read(this.buffer.subarray(this.end, limit));
      if (got === null || got === 0) {
        if (this.end === this.start) return false;
        throw new ShortReadError(count - (this.end - this.start));
      }
      this.end += got;
    }
    return true;
  }

  #compact(): void {
    this.buffer.copyWithin(0, this.start, this.end);
    this.end -= this.start;
    this.start = 0;
  }

  /** Fills all of `dest`: buffered bytes first, then straight from the source. */
  async readInto(dest: Uint8Array): Promise<void> {
    const buffered = Math.min(this.end - this.start, dest.byteLength);
    if (buffered > 0) {
      dest.set(this.buffer.subarray(this.start, this.start + buffered));
      this.start += buffered;
    }
    let done = buffered;
    while (done < dest.byteLength) {
      const got = await this.#source.read(dest.subarray(done));
      if (got === null || got === 0) throw new ShortReadError(dest.byteLength - done);
      done += got;
    }
  }

  /** Consumes and drops `count` bytes (an oversized or refused payload). */
  async skip(count: number): Promise<void> {
    let left = count;
    while (left > 0) {
      if (this.end === this.start) {
        this.start = this.end = 0;
        if (!(await this.fill(1))) throw new ShortReadError(left);
      }
      const take = Math.min(left, this.end - this.start);
      this.start += take;
      left -= take;
    }
  }
}
