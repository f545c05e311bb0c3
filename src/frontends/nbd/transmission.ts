/**
 * The transmission phase of one connection (proto.md "Transmission"):
 * requests are parsed from a buffered reader and run concurrently, up to
 * `inflight_requests_max` per connection; replies go out in completion
 * order through the connection's {@linkcode ReplyWriter}, each reply queued
 * whole so chunks of two replies never interleave.
 *
 * Payloads: when the driver lends buffers (a ring front end lends its data
 * pages), WRITE payloads are read from the socket straight into a borrowed
 * buffer and READ data is sent from one; otherwise page-aligned buffers
 * come from the connection's {@linkcode PayloadAccount}, with headroom for
 * the reply header so a READ reply leaves in one write. A WRITE whose
 * payload does not fit the connection's share or the server's budget is
 * not read from the socket until it does: the client waits, the host's
 * memory stays bounded.
 *
 * A large READ of bytes the driver finds in a page cache it can name
 * ({@linkcode CachedSpanSource}) is sent from there with sendfile on the
 * connection's own socket descriptor, in its turn among the replies: the
 * data never passes through this process's memory.
 * @module
 */
import type { SocketFd } from "../../../ffi/socket.ts";
import type {
  BlockDriver,
  BufferLender,
  CachedSpan,
  CachedSpanSource,
  Extent,
  ZeroReader,
} from "../../formats/driver.ts";
import type { Session } from "./handshake.ts";
import type { NbdLimits } from "./limits.ts";
import type { NbdServerStats } from "./stats.ts";
import { type Payload, payload_headroom_bytes, type PayloadAccount } from "./payload_pool.ts";
import * as P from "./protocol.ts";
import { copy_payload_bytes_max, type ReplyWriter } from "./reply_writer.ts";
import type { SocketReader } from "./socket_reader.ts";

/** What a connection's transmission phase shares with its server. */
export interface TransmissionContext {
  /** This connection's payload buffers (its share of the server's budget). */
  payloads: PayloadAccount;
  stats: NbdServerStats;
  limits: NbdLimits;
  /** Our own descriptor of the connection's socket, when it was found (see own_socket.ts). */
  socket?: SocketFd;
  shuttingDown(): boolean;
  log(level: "debug" | "info" | "warn", message: string): void;
}

/** The client broke the framing (bad request magic): the connection must end. */
export class ProtocolError extends Error {}

/** Reads at least this long look for holes first (structured replies only). */
const sparse_read_bytes_min = 64 << 10;
/** Holes shorter than this are sent as data: a chunk header costs more than zeros. */
const hole_chunk_bytes_min = 4096;
/** More extents than this in one read: send it as one data chunk. */
const read_chunks_max = 64;
/** Reads at least this long are sent from the page cache when they can (a thread hop per reply). */
const send_cached_bytes_min = 64 << 10;
const error_message_bytes_max = 1024;
/**
 * After a WRITE payload at least this long, the next header is read alone:
 * the client is likely sending another such payload behind it, which then
 * goes from the socket straight into its buffer instead of arriving with
 * the header in the read buffer and being copied out (a 1 MiB write moved
 * ~210 KiB through that copy, the most a Unix socket hands over at once).
 */
const header_alone_after_bytes = 64 << 10;

const ALLOWED_FLAGS: Record<number, number> = {
  [P.NBD_CMD_READ]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_DF,
  [P.NBD_CMD_WRITE]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_FLUSH]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_TRIM]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_WRITE_ZEROES]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE |
    P.NBD_CMD_FLAG_FAST_ZERO,
  [P.NBD_CMD_BLOCK_STATUS]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_REQ_ONE,
};

/** Commands (and flags) a client may use only when the export advertised them (proto.md). */
const NEEDS_ADVERTISED: [type: number, flag: number, advertised: number, what: string][] = [
  [P.NBD_CMD_FLUSH, 0, P.NBD_FLAG_SEND_FLUSH, "FLUSH"],
  [P.NBD_CMD_TRIM, 0, P.NBD_FLAG_SEND_TRIM, "TRIM"],
  [P.NBD_CMD_WRITE_ZEROES, 0, P.NBD_FLAG_SEND_WRITE_ZEROES, "WRITE_ZEROES"],
  [P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_FAST_ZERO, P.NBD_FLAG_SEND_FAST_ZERO, "FAST_ZERO"],
];

const encoder = new TextEncoder();

/** A refused request: the NBD error and a message for the client's user. */
class RequestError extends Error {
  constructor(readonly nbdError: number, message: string) {
    super(message);
  }
}

function lenderOf(driver: BlockDriver): BufferLender | undefined {
  return "borrowBuffer" in driver ? driver as unknown as BufferLender : undefined;
}

function zeroReaderOf(driver: BlockDriver): ZeroReader | undefined {
  return "readAsZeros" in driver ? driver as unknown as ZeroReader : undefined;
}

function spanSourceOf(driver: BlockDriver): CachedSpanSource | undefined {
  return "leaseCached" in driver ? driver as unknown as CachedSpanSource : undefined;
}

/** One connection in the transmission phase. */
export class Transmission {
  readonly #reader: SocketReader;
  readonly #writer: ReplyWriter;
  readonly #context: TransmissionContext;
  readonly #driver: BlockDriver;
  readonly #lender: BufferLender | undefined;
  readonly #zeroReader: ZeroReader | undefined;
  /** Where large reads may be sent from with sendfile: only with the socket's own descriptor. */
  readonly #spans: CachedSpanSource | undefined;
  readonly #structured: boolean;
  readonly #baseAllocation: boolean;
  readonly #readOnly: boolean;
  /** The transmission flags advertised to this client. */
  readonly #advertised: number;
  readonly #header = new Uint8Array(64);
  readonly #headerView = new DataView(this.#header.buffer);
  #inflight = 0;
  #waiters: (() => void)[] = [];

  constructor(
    reader: SocketReader,
    writer: ReplyWriter,
    session: Session,
    context: TransmissionContext,
  ) {
    this.#reader = reader;
    this.#writer = writer;
    this.#context = context;
    this.#driver = session.nbdExport.driver;
    this.#lender = lenderOf(this.#driver);
    this.#zeroReader = zeroReaderOf(this.#driver);
    this.#spans = context.socket ? spanSourceOf(this.#driver) : undefined;
    this.#structured = session.structuredReplies;
    this.#baseAllocation = session.baseAllocation;
    this.#readOnly = (session.transmissionFlags & P.NBD_FLAG_READ_ONLY) !== 0;
    this.#advertised = session.transmissionFlags;
  }

  /** Requests being processed. */
  get inflight(): number {
    return this.#inflight;
  }

  /**
   * Serves requests until NBD_CMD_DISC or end of stream, then waits for
   * the requests in flight and their replies. Throws {@linkcode ProtocolError}
   * or a socket error when the connection must be cut.
   */
  async run(): Promise<void> {
    const reader = this.#reader;
    const limits = this.#context.limits;
    let headerAlone = false;
    for (;;) {
      if (
        reader.available < P.REQUEST_HEADER_BYTES &&
        !(await reader.fill(P.REQUEST_HEADER_BYTES, headerAlone))
      ) {
        break;
      }
      const v = reader.view;
      const s = reader.start;
      if (v.getUint32(s) !== P.NBD_REQUEST_MAGIC) throw new ProtocolError("bad request magic");
      const flags = v.getUint16(s + 4);
      const type = v.getUint16(s + 6);
      const handleHigh = v.getUint32(s + 8);
      const handleLow = v.getUint32(s + 12);
      const offset = v.getUint32(s + 16) * 2 ** 32 + v.getUint32(s + 20);
      const length = v.getUint32(s + 24);
      reader.start = s + P.REQUEST_HEADER_BYTES;
      this.#context.stats.requests_total++;
      if (type === P.NBD_CMD_DISC) break;
      while (this.#inflight >= limits.inflight_requests_max) await this.#requestFinished();
      // A client that does not read its replies stops being read.
      if (this.#writer.pendingCopiedBytes > limits.pending_reply_bytes_max) {
        await this.#writer.idle();
      }
      headerAlone = type === P.NBD_CMD_WRITE && length >= header_alone_after_bytes;
      if (
        type === P.NBD_CMD_READ &&
        this.#readKnownZeros(flags, handleHigh, handleLow, offset, length)
      ) {
        continue;
      }
      this.#inflight++;
      if (type === P.NBD_CMD_WRITE) {
        await this.#receiveWrite(flags, handleHigh, handleLow, offset, length);
      } else {
        this.#execute(type, flags, handleHigh, handleLow, offset, length);
      }
    }
    await this.drain();
  }

  /** Resolves once no request is in flight and every reply has been written. */
  async drain(): Promise<void> {
    while (this.#inflight > 0) await this.#requestFinished();
    await this.#writer.idle();
  }

  #requestFinished(): Promise<void> {
    return new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  #finished(): void {
    this.#inflight--;
    if (this.#waiters.length === 0) return;
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }

  // Throws RequestError when the request must be refused.
  #validate(type: number, flags: number, offset: number, length: number): void {
    const allowed = ALLOWED_FLAGS[type];
    if (allowed === undefined) throw new RequestError(P.NBD_EINVAL, `unknown command ${type}`);
    if (this.#context.shuttingDown()) {
      throw new RequestError(P.NBD_ESHUTDOWN, "server is shutting down");
    }
    if ((flags & ~allowed) !== 0) {
      throw new RequestError(
        P.NBD_EINVAL,
        `flags 0x${flags.toString(16)} not valid for command ${type}`,
      );
    }
    if ((flags & P.NBD_CMD_FLAG_DF) && !this.#structured) {
      throw new RequestError(P.NBD_EINVAL, "DF without structured replies");
    }
    const writes = type === P.NBD_CMD_WRITE || type === P.NBD_CMD_TRIM ||
      type === P.NBD_CMD_WRITE_ZEROES;
    if (writes && this.#readOnly) throw new RequestError(P.NBD_EPERM, "export is read-only");
    for (const [command, flag, advertised, what] of NEEDS_ADVERTISED) {
      if (type === command && (flags & flag) === flag && (this.#advertised & advertised) === 0) {
        throw new RequestError(P.NBD_EINVAL, `${what} was not advertised for this export`);
      }
    }
    if (type === P.NBD_CMD_FLUSH) return;
    if (type === P.NBD_CMD_BLOCK_STATUS && !this.#baseAllocation) {
      throw new RequestError(P.NBD_EINVAL, "no metadata context negotiated");
    }
    if (offset + length > this.#driver.sizeBytes) {
      // proto.md: a write past the end SHOULD fail with ENOSPC, anything else EINVAL.
      const error = type === P.NBD_CMD_WRITE ? P.NBD_ENOSPC : P.NBD_EINVAL;
      throw new RequestError(
        error,
        `range ${offset}+${length} is past the end (${this.#driver.sizeBytes})`,
      );
    }
    if (
      (type === P.NBD_CMD_READ || type === P.NBD_CMD_WRITE) &&
      length > this.#context.limits.request_bytes_max
    ) {
      throw new RequestError(
        P.NBD_EINVAL,
        `request of ${length} bytes exceeds ${this.#context.limits.request_bytes_max}`,
      );
    }
    if (type === P.NBD_CMD_BLOCK_STATUS && length === 0) {
      throw new RequestError(P.NBD_EINVAL, "block status of an empty range");
    }
  }

  // The payload must be consumed whatever happens; the driver call runs concurrently.
  async #receiveWrite(flags: number, hi: number, lo: number, offset: number, length: number) {
    try {
      this.#validate(P.NBD_CMD_WRITE, flags, offset, length);
    } catch (error) {
      try {
        await this.#reader.skip(length);
      } finally {
        this.#replyError(P.NBD_CMD_WRITE, hi, lo, error);
        this.#finished();
      }
      return;
    }
    const borrowed = length > 0 ? this.#lender?.borrowBuffer(length) : undefined;
    // Waiting here for memory stops this connection's reading: its client waits.
    const payload = borrowed ? undefined : await this.#context.payloads.take(length);
    const data = borrowed ?? payload!.data;
    try {
      await this.#reader.readInto(data);
    } catch (error) {
      this.#release(borrowed, payload);
      this.#finished();
      throw error;
    }
    this.#runWrite(flags, hi, lo, offset, data, borrowed, payload);
  }

  async #runWrite(
    flags: number,
    hi: number,
    lo: number,
    offset: number,
    data: Uint8Array,
    borrowed: Uint8Array | undefined,
    payload: Payload | undefined,
  ) {
    try {
      await this.#driver.write(offset, data, { fua: (flags & P.NBD_CMD_FLAG_FUA) !== 0 });
      this.#replySimple(hi, lo, 0);
    } catch (error) {
      this.#replyError(P.NBD_CMD_WRITE, hi, lo, error);
    } finally {
      this.#release(borrowed, payload);
      this.#finished();
    }
  }

  #release(borrowed: Uint8Array | undefined, payload: Payload | undefined): void {
    if (borrowed) this.#lender!.returnBuffer(borrowed);
    if (payload) this.#context.payloads.give(payload);
  }

  async #execute(
    type: number,
    flags: number,
    hi: number,
    lo: number,
    offset: number,
    length: number,
  ) {
    try {
      this.#validate(type, flags, offset, length);
      const fua = (flags & P.NBD_CMD_FLAG_FUA) !== 0;
      switch (type) {
        case P.NBD_CMD_READ:
          await this.#read(flags, hi, lo, offset, length);
          return;
        case P.NBD_CMD_FLUSH:
          await this.#driver.flush();
          break;
        case P.NBD_CMD_TRIM:
          await this.#driver.discard(offset, length);
          if (fua) await this.#driver.flush();
          break;
        case P.NBD_CMD_WRITE_ZEROES:
          await this.#driver.writeZeroes(offset, length, {
            mayTrim: (flags & P.NBD_CMD_FLAG_NO_HOLE) === 0,
            fast: (flags & P.NBD_CMD_FLAG_FAST_ZERO) !== 0,
            fua,
          });
          break;
        case P.NBD_CMD_BLOCK_STATUS:
          await this.#blockStatus(flags, hi, lo, offset, length);
          return;
      }
      this.#replySimple(hi, lo, 0);
    } catch (error) {
      this.#replyError(type, hi, lo, error);
    } finally {
      this.#finished();
    }
  }

  async #read(flags: number, hi: number, lo: number, offset: number, length: number) {
    if (length === 0) {
      if (this.#structured) {
        this.#chunkHeader(P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, hi, lo, 0);
      } else this.#replySimple(hi, lo, 0);
      return;
    }
    const sparse = this.#structured && (flags & P.NBD_CMD_FLAG_DF) === 0 &&
      length >= sparse_read_bytes_min && this.#driver.capabilities.canExtents;
    const span = length >= send_cached_bytes_min
      ? this.#spans?.leaseCached(offset, length)
      : undefined;
    let chunks: Extent[] | undefined;
    if (span) {
      // Holes are sent as holes: a span goes out only as one data chunk.
      chunks = sparse ? await this.#readChunks(offset, length).catch(() => undefined) : undefined;
      if (chunks) span.drop();
      else if (await this.#sendSpan(hi, lo, offset, span)) return;
    }
    if (sparse) return this.#readSparse(hi, lo, offset, length, chunks);
    const borrowed = this.#lender?.borrowBuffer(length);
    const payload = borrowed ? undefined : await this.#context.payloads.take(length);
    const data = borrowed ?? payload!.data;
    try {
      await this.#driver.read(offset, data);
    } catch (error) {
      this.#release(borrowed, payload);
      throw error;
    }
    this.#sendData(hi, lo, offset, length, data, payload);
  }

  // A read the driver knows reads as zeros, answered in this turn without a
  // buffer or a promise: one hole chunk, or zeros written into the reply
  // writer's staging buffer. False: the read takes the ordinary way (which
  // also answers a request that fails validation).
  #readKnownZeros(flags: number, hi: number, lo: number, offset: number, length: number): boolean {
    const zeros = this.#zeroReader;
    if (zeros === undefined || length === 0) return false;
    const hole = this.#structured && (flags & P.NBD_CMD_FLAG_DF) === 0;
    if (!hole && length > copy_payload_bytes_max) return false;
    try {
      this.#validate(P.NBD_CMD_READ, flags, offset, length);
    } catch {
      return false;
    }
    if (!zeros.readAsZeros(offset, length)) return false;
    if (hole) {
      this.#pushHole(P.NBD_REPLY_FLAG_DONE, hi, lo, offset, length);
    } else {
      this.#writer.pushCopy(
        this.#header.subarray(0, this.#buildDataHeader(hi, lo, offset, length)),
      );
      this.#writer.pushZeros(length);
    }
    return true;
  }

  // The header of a whole READ's data (a DONE data chunk, or a simple
  // reply) in the scratch header; returns its length.
  #buildDataHeader(hi: number, lo: number, offset: number, length: number): number {
    if (!this.#structured) {
      this.#buildSimple(hi, lo, 0);
      return P.SIMPLE_REPLY_BYTES;
    }
    this.#buildChunkHeader(P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, hi, lo, 8 + length);
    this.#headerView.setUint32(20, Math.floor(offset / 2 ** 32));
    this.#headerView.setUint32(24, offset >>> 0);
    return P.STRUCTURED_REPLY_BYTES + 8;
  }

  // proto.md: OFFSET_HOLE, payload length 12: the offset and the hole's size.
  #pushHole(flags: number, hi: number, lo: number, offset: number, length: number): void {
    const v = this.#headerView;
    this.#buildChunkHeader(flags, P.NBD_REPLY_TYPE_OFFSET_HOLE, hi, lo, 12);
    v.setUint32(20, Math.floor(offset / 2 ** 32));
    v.setUint32(24, offset >>> 0);
    v.setUint32(28, length);
    this.#writer.pushCopy(this.#header.subarray(0, 32));
  }

  // One data chunk (or simple reply) from a filled buffer: the pool payload
  // (header written in its headroom) or a lent buffer, returned once sent.
  #sendData(
    hi: number,
    lo: number,
    offset: number,
    length: number,
    data: Uint8Array,
    payload: Payload | undefined,
  ) {
    const headerBytes = this.#buildDataHeader(hi, lo, offset, length);
    if (payload) {
      const start = payload_headroom_bytes - headerBytes;
      payload.frame.set(this.#header.subarray(0, headerBytes), start);
      this.#writer.pushOwned(
        payload.frame.subarray(start),
        () => this.#context.payloads.give(payload),
      );
    } else {
      this.#writer.pushCopy(this.#header.subarray(0, headerBytes));
      this.#writer.pushOwned(data, () => this.#lender!.returnBuffer(data));
    }
  }

  // Resolves once the reply is on the wire, or the socket failed (the
  // writer's failure, not the request's: nothing more to send): true; false
  // when the lease was refused before any of it was written (the read must
  // go the usual way).
  #sendSpan(hi: number, lo: number, offset: number, span: CachedSpan): Promise<boolean> {
    const headerBytes = this.#buildDataHeader(hi, lo, offset, span.lengthBytes);
    const head = this.#header.slice(0, headerBytes);
    const socket = this.#context.socket!;
    const waitMs = this.#context.limits.reply_stall_timeout_ms;
    return new Promise((resolve) => {
      this.#writer.pushSend(
        headerBytes + span.lengthBytes,
        async () => {
          try {
            resolve(await span.send(socket, head, waitMs));
          } catch (error) {
            resolve(true);
            throw error;
          }
        },
        () => {
          span.drop();
          resolve(true); // after the send; or dropped unsent: the writer failed
        },
      );
    });
  }

  // The data and the allocation map are fetched at once, so a sparse read
  // costs the slower of the two round trips, not their sum (`known`: the
  // map was fetched already). The data lands in a lent buffer when the
  // driver has one (ring pages: no bounce copy).
  async #readSparse(hi: number, lo: number, offset: number, length: number, known?: Extent[]) {
    const borrowed = this.#lender?.borrowBuffer(length);
    const payload = borrowed ? undefined : await this.#context.payloads.take(length);
    const data = borrowed ?? payload!.data;
    const [chunks, read] = await Promise.allSettled([
      known ?? this.#readChunks(offset, length),
      this.#driver.read(offset, data),
    ]);
    if (read.status === "rejected") {
      this.#release(borrowed, payload);
      throw read.reason;
    }
    if (chunks.status === "fulfilled" && chunks.value) {
      this.#sendChunks(hi, lo, offset, chunks.value, data, () => this.#release(borrowed, payload));
    } else {
      this.#sendData(hi, lo, offset, length, data, payload);
    }
  }

  // The read's extents as chunks, or undefined when one data chunk is best.
  async #readChunks(offset: number, length: number): Promise<Extent[] | undefined> {
    const extents = clipExtents(await this.#driver.blockStatus(offset, length), offset, length);
    const chunks: Extent[] = [];
    for (const e of extents) {
      const zero = e.zero && e.lengthBytes >= hole_chunk_bytes_min;
      const last = chunks[chunks.length - 1];
      if (last && last.zero === zero) last.lengthBytes += e.lengthBytes;
      else {chunks.push({
          offsetBytes: e.offsetBytes,
          lengthBytes: e.lengthBytes,
          hole: zero,
          zero,
        });}
    }
    const covered = chunks.reduce((sum, c) => sum + c.lengthBytes, 0);
    if (covered !== length || chunks.length > read_chunks_max) return undefined;
    if (chunks.length === 1 && !chunks[0].zero) return undefined;
    return chunks;
  }

  // proto.md: chunks of one reply may be in any order, DONE on the last; holes as OFFSET_HOLE.
  #sendChunks(
    hi: number,
    lo: number,
    offset: number,
    chunks: Extent[],
    data: Uint8Array,
    release: () => void,
  ) {
    for (let i = 0; i < chunks.length; i++) {
      const c = chunks[i];
      const flags = i === chunks.length - 1 ? P.NBD_REPLY_FLAG_DONE : 0;
      const v = this.#headerView;
      if (c.zero) {
        this.#pushHole(flags, hi, lo, c.offsetBytes, c.lengthBytes);
      } else {
        this.#buildChunkHeader(flags, P.NBD_REPLY_TYPE_OFFSET_DATA, hi, lo, 8 + c.lengthBytes);
        v.setUint32(20, Math.floor(c.offsetBytes / 2 ** 32));
        v.setUint32(24, c.offsetBytes >>> 0);
        this.#writer.pushCopy(this.#header.subarray(0, 28));
        this.#writer.pushOwned(
          data.subarray(c.offsetBytes - offset, c.offsetBytes - offset + c.lengthBytes),
        );
      }
    }
    // Data chunks above the copy threshold are written from `data` itself.
    this.#writer.pushRelease(release);
  }

  async #blockStatus(flags: number, hi: number, lo: number, offset: number, length: number) {
    const extents = clipExtents(await this.#driver.blockStatus(offset, length), offset, length);
    const limit = (flags & P.NBD_CMD_FLAG_REQ_ONE) ? 1 : this.#context.limits.extents_per_reply_max;
    const lengths: number[] = [];
    const states: number[] = [];
    for (const e of extents) {
      const state = (e.hole ? P.NBD_STATE_HOLE : 0) | (e.zero ? P.NBD_STATE_ZERO : 0);
      const n = lengths.length;
      if (n > 0 && states[n - 1] === state) lengths[n - 1] += e.lengthBytes;
      else if (n < limit) {
        lengths.push(e.lengthBytes);
        states.push(state);
      } else break;
    }
    if (lengths.length === 0) {
      lengths.push(length);
      states.push(0);
    }
    const body = new Uint8Array(P.STRUCTURED_REPLY_BYTES + 4 + 8 * lengths.length);
    const view = new DataView(body.buffer);
    this.#buildChunkHeader(
      P.NBD_REPLY_FLAG_DONE,
      P.NBD_REPLY_TYPE_BLOCK_STATUS,
      hi,
      lo,
      body.byteLength - 20,
    );
    body.set(this.#header.subarray(0, P.STRUCTURED_REPLY_BYTES));
    view.setUint32(20, P.BASE_ALLOCATION_ID);
    for (let i = 0; i < lengths.length; i++) {
      view.setUint32(24 + 8 * i, lengths[i]);
      view.setUint32(28 + 8 * i, states[i]);
    }
    this.#writer.pushOwned(body);
  }

  #buildSimple(hi: number, lo: number, error: number): void {
    const v = this.#headerView;
    v.setUint32(0, P.NBD_SIMPLE_REPLY_MAGIC);
    v.setUint32(4, error);
    v.setUint32(8, hi);
    v.setUint32(12, lo);
  }

  #replySimple(hi: number, lo: number, error: number): void {
    this.#buildSimple(hi, lo, error);
    this.#writer.pushCopy(this.#header.subarray(0, P.SIMPLE_REPLY_BYTES));
  }

  #buildChunkHeader(flags: number, type: number, hi: number, lo: number, length: number): void {
    const v = this.#headerView;
    v.setUint32(0, P.NBD_STRUCTURED_REPLY_MAGIC);
    v.setUint16(4, flags);
    v.setUint16(6, type);
    v.setUint32(8, hi);
    v.setUint32(12, lo);
    v.setUint32(16, length);
  }

  #chunkHeader(flags: number, type: number, hi: number, lo: number, length: number): void {
    this.#buildChunkHeader(flags, type, hi, lo, length);
    this.#writer.pushCopy(this.#header.subarray(0, P.STRUCTURED_REPLY_BYTES));
  }

  #replyError(type: number, hi: number, lo: number, error: unknown): void {
    this.#context.stats.request_errors_total++;
    const nbdError = error instanceof RequestError ? error.nbdError : P.nbdErrorOf(error);
    const message = error instanceof Error ? error.message : String(error);
    if (!(error instanceof RequestError)) {
      // FAST_ZERO refusals are an expected answer, not a fault.
      this.#context.log(
        nbdError === P.NBD_ENOTSUP ? "debug" : "warn",
        `command ${type} failed: ${message}`,
      );
    }
    // proto.md: with structured replies a READ never gets a simple reply; errors carry a message.
    if (!this.#structured) {
      this.#replySimple(hi, lo, nbdError);
      return;
    }
    const text = encoder.encode(message).subarray(0, error_message_bytes_max);
    const body = new Uint8Array(P.STRUCTURED_REPLY_BYTES + 6 + text.byteLength);
    this.#buildChunkHeader(
      P.NBD_REPLY_FLAG_DONE,
      P.NBD_REPLY_TYPE_ERROR,
      hi,
      lo,
      6 + text.byteLength,
    );
    body.set(this.#header.subarray(0, P.STRUCTURED_REPLY_BYTES));
    const view = new DataView(body.buffer);
    view.setUint32(20, nbdError);
    view.setUint16(24, text.byteLength);
    body.set(text, 26);
    this.#writer.pushOwned(body);
  }
}

/** Extents restricted to `[offset, offset+length)`, dropping empty ones. */
function clipExtents(extents: Extent[], offset: number, length: number): Extent[] {
  const end = offset + length;
  const clipped: Extent[] = [];
  let position = offset;
  for (const e of extents) {
    const start = Math.max(e.offsetBytes, position);
    const stop = Math.min(e.offsetBytes + e.lengthBytes, end);
    if (stop <= start || start !== position) {
      if (start > position) break; // a gap: stop where coverage stops
      continue;
    }
    clipped.push({ offsetBytes: start, lengthBytes: stop - start, hole: e.hole, zero: e.zero });
    position = stop;
  }
  return clipped;
}
