/**
 * A minimal NBD client speaking raw bytes, for protocol tests and fuzzing:
 * it sends exactly what a test says (well-formed or not) and decodes what
 * the server answers, so the server's replies can be checked field by field.
 * @module
 */
import * as P from "../../src/frontends/nbd/protocol.ts";
import { SocketReader } from "../../src/frontends/nbd/socket_reader.ts";

const encoder = new TextEncoder();

/** One option reply. */
export interface OptionReply {
  option: number;
  type: number;
  data: Uint8Array;
}

/** One reply in transmission: simple (`structured` false) or one structured chunk. */
export interface Reply {
  structured: boolean;
  handle: bigint;
  /** Simple replies: the error. Structured: 0, see `type`/`data`. */
  error: number;
  flags: number;
  type: number;
  data: Uint8Array;
}

/** Options of {@linkcode RawNbdClient.go}. */
export interface GoOptions {
  structured?: boolean;
  meta?: boolean;
  noZeroes?: boolean;
}

/** A raw connection to an NBD server. */
export class RawNbdClient {
  readonly conn: Deno.UnixConn;
  readonly reader: SocketReader;
  size = 0;
  flags = 0;
  structured = false;

  private constructor(conn: Deno.UnixConn) {
    this.conn = conn;
    this.reader = new SocketReader(conn, 1 << 20);
  }

  static async connect(path: string): Promise<RawNbdClient> {
    return new RawNbdClient(await Deno.connect({ transport: "unix", path }));
  }

  close(): void {
    try {
      this.conn.close();
    } catch {
      // already closed
    }
  }

  async send(bytes: Uint8Array): Promise<void> {
    let done = 0;
    while (done < bytes.byteLength) done += await this.conn.write(bytes.subarray(done));
  }

  async readExact(count: number): Promise<Uint8Array> {
    const out = new Uint8Array(count);
    await this.reader.readInto(out);
    return out;
  }

  /** Reads the 18-byte greeting and answers with `clientFlags`. */
  async greet(clientFlags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES) {
    const greeting = new DataView((await this.readExact(18)).buffer);
    if (greeting.getBigUint64(0) !== P.NBDMAGIC || greeting.getBigUint64(8) !== P.IHAVEOPT) {
      throw new Error("bad greeting");
    }
    const flags = new Uint8Array(4);
    new DataView(flags.buffer).setUint32(0, clientFlags);
    await this.send(flags);
    return greeting.getUint16(16);
  }

  async sendOption(option: number, data: Uint8Array = new Uint8Array()): Promise<void> {
    const bytes = new Uint8Array(16 + data.byteLength);
    const view = new DataView(bytes.buffer);
    view.setBigUint64(0, P.IHAVEOPT);
    view.setUint32(8, option);
    view.setUint32(12, data.byteLength);
    bytes.set(data, 16);
    await this.send(bytes);
  }

  async readOptionReply(): Promise<OptionReply> {
    const view = new DataView((await this.readExact(20)).buffer);
    if (view.getBigUint64(0) !== P.OPTION_REPLY_MAGIC) throw new Error("bad option reply magic");
    const length = view.getUint32(16);
    return {
      option: view.getUint32(8),
      type: view.getUint32(12),
      data: await this.readExact(length),
    };
  }

  /** Option replies up to and including the final (ACK or error) one. */
  async optionReplies(option: number, data?: Uint8Array): Promise<OptionReply[]> {
    await this.sendOption(option, data);
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.readOptionReply();
      replies.push(reply);
      if (reply.type === P.NBD_REP_ACK || reply.type >= 0x80000000) return replies;
    }
  }

  /** Greets, optionally negotiates structured replies and base:allocation, then GO. */
  async go(name: string, options: GoOptions = {}): Promise<void> {
    const noZeroes = options.noZeroes ?? true;
    await this.greet(P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0));
    if (options.structured || options.meta) {
      const [ack] = await this.optionReplies(P.NBD_OPT_STRUCTURED_REPLY);
      if (ack.type !== P.NBD_REP_ACK) throw new Error("structured replies refused");
      this.structured = true;
    }
    if (options.meta) {
      const replies = await this.optionReplies(
        P.NBD_OPT_SET_META_CONTEXT,
        metaContextData(name, [P.BASE_ALLOCATION]),
      );
      if (replies.length !== 2) throw new Error("base:allocation not selected");
    }
    const replies = await this.optionReplies(P.NBD_OPT_GO, infoData(name, []));
    const last = replies[replies.length - 1];
    if (last.type !== P.NBD_REP_ACK) throw new Error(`GO failed: ${last.type.toString(16)}`);
    for (const r of replies) {
      const view = new DataView(r.data.buffer);
      if (r.type === P.NBD_REP_INFO && view.getUint16(0) === P.NBD_INFO_EXPORT) {
        this.size = Number(view.getBigUint64(2));
        this.flags = view.getUint16(10);
      }
    }
  }

  /** Sends one request (and its payload, for writes). */
  async request(
    type: number,
    flags: number,
    handle: bigint,
    offset: number,
    length: number,
    payload?: Uint8Array,
  ) {
    const bytes = new Uint8Array(28 + (payload?.byteLength ?? 0));
    const view = new DataView(bytes.buffer);
    view.setUint32(0, P.NBD_REQUEST_MAGIC);
    view.setUint16(4, flags);
    view.setUint16(6, type);
    view.setBigUint64(8, handle);
    view.setBigUint64(16, BigInt(offset));
    view.setUint32(24, length);
    if (payload) bytes.set(payload, 28);
    await this.send(bytes);
  }

  /** Reads one simple reply (with `dataLength` bytes of data) or one structured chunk. */
  async readReply(dataLength = 0): Promise<Reply> {
    const head = new DataView((await this.readExact(4)).buffer);
    const magic = head.getUint32(0);
    if (magic === P.NBD_SIMPLE_REPLY_MAGIC) {
      const view = new DataView((await this.readExact(12)).buffer);
      const error = view.getUint32(0);
      const data = error === 0 ? await this.readExact(dataLength) : new Uint8Array();
      return { structured: false, handle: view.getBigUint64(4), error, flags: 0, type: 0, data };
    }
    if (magic !== P.NBD_STRUCTURED_REPLY_MAGIC) {
      throw new Error(`bad reply magic ${magic.toString(16)}`);
    }
    const view = new DataView((await this.readExact(16)).buffer);
    const length = view.getUint32(12);
    return {
      structured: true,
      handle: view.getBigUint64(4),
      error: 0,
      flags: view.getUint16(0),
      type: view.getUint16(2),
      data: await this.readExact(length),
    };
  }

  /** Every chunk of one structured reply (up to the one flagged DONE). */
  async readChunks(): Promise<Reply[]> {
    const chunks: Reply[] = [];
    for (;;) {
      const chunk = await this.readReply();
      chunks.push(chunk);
      if (!chunk.structured || (chunk.flags & P.NBD_REPLY_FLAG_DONE)) return chunks;
    }
  }

  /** Reads `length` bytes at `offset`, reassembling structured chunks. */
  async read(offset: number, length: number, flags = 0): Promise<Uint8Array> {
    await this.request(P.NBD_CMD_READ, flags, 1n, offset, length);
    if (!this.structured) {
      const reply = await this.readReply(length);
      if (reply.error) throw new Error(`read failed: ${reply.error}`);
      return reply.data;
    }
    const out = new Uint8Array(length);
    for (const chunk of await this.readChunks()) {
      const view = new DataView(chunk.data.buffer, chunk.data.byteOffset);
      if (chunk.type === P.NBD_REPLY_TYPE_OFFSET_DATA) {
        out.set(chunk.data.subarray(8), Number(view.getBigUint64(0)) - offset);
      } else if (chunk.type === P.NBD_REPLY_TYPE_OFFSET_HOLE) {
        const start = Number(view.getBigUint64(0)) - offset;
        out.fill(0, start, start + view.getUint32(8));
      } else if (chunk.type !== P.NBD_REPLY_TYPE_NONE) {
        throw new Error(`read failed: chunk type ${chunk.type} error ${view.getUint32(0)}`);
      }
    }
    return out;
  }

  /** Sends a command without payload-bearing reply; resolves to the NBD error (0 = success). */
  async command(type: number, flags: number, offset: number, length: number, payload?: Uint8Array) {
    await this.request(type, flags, 7n, offset, length, payload);
    return errorOf(await this.readChunks());
  }
}

/** The error of a reply: a simple reply's error, or a structured error chunk's. */
export function errorOf(chunks: Reply[]): number {
  for (const c of chunks) {
    if (!c.structured) return c.error;
    if (c.type & 0x8000) return new DataView(c.data.buffer, c.data.byteOffset).getUint32(0);
  }
  return 0;
}

/** NBD_OPT_INFO / NBD_OPT_GO payload. */
export function infoData(name: string, requests: number[]): Uint8Array {
  const nameBytes = encoder.encode(name);
  const bytes = new Uint8Array(4 + nameBytes.byteLength + 2 + 2 * requests.length);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, nameBytes.byteLength);
  bytes.set(nameBytes, 4);
  view.setUint16(4 + nameBytes.byteLength, requests.length);
  requests.forEach((r, i) => view.setUint16(6 + nameBytes.byteLength + 2 * i, r));
  return bytes;
}

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload. */
export function metaContextData(name: string, queries: string[]): Uint8Array {
  const parts = [name, ...queries].map((s) => encoder.encode(s));
  const total = 4 + parts[0].byteLength + 4 +
    parts.slice(1).reduce((n, q) => n + 4 + q.byteLength, 0);
  const bytes = new Uint8Array(total);
  const view = new DataView(bytes.buffer);
  let at = 0;
  view.setUint32(at, parts[0].byteLength);
  bytes.set(parts[0], at + 4);
  at += 4 + parts[0].byteLength;
  view.setUint32(at, queries.length);
  at += 4;
  for (const q of parts.slice(1)) {
    view.setUint32(at, q.byteLength);
    bytes.set(q, at + 4);
    at += 4 + q.byteLength;
  }
  return bytes;
}
