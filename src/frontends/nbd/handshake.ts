/**
 * The fixed newstyle handshake (proto.md "Handshake"): greeting, client
 * flags, then option haggling until NBD_OPT_GO / NBD_OPT_EXPORT_NAME picks
 * an export, or the client aborts. Bad options get NBD_REP_ERR_* replies;
 * a client that breaks the framing (bad magic, unknown client flags, an
 * oversized option) is disconnected.
 * @module
 */
import { type NbdExport, transmissionFlags } from "./export.ts";
import { type NbdLimits, preferred_block_bytes, string_bytes_max } from "./limits.ts";
import * as P from "./protocol.ts";
import type { ReplyWriter } from "./reply_writer.ts";
import type { SocketReader } from "./socket_reader.ts";

/** What the server side of a handshake needs to know. */
export interface HandshakeContext {
  lookup(name: string): NbdExport | undefined;
  list(): NbdExport[];
  limits: NbdLimits;
  /** True once the server is closing: options get NBD_REP_ERR_SHUTDOWN. */
  shuttingDown(): boolean;
  log(level: "debug" | "info" | "warn", message: string): void;
}

/** The outcome of a successful handshake. */
export interface Session {
  nbdExport: NbdExport;
  structuredReplies: boolean;
  /** `base:allocation` was selected: BLOCK_STATUS is allowed. */
  baseAllocation: boolean;
  transmissionFlags: number;
}

/** The client broke the handshake framing; the connection must end. */
export class HandshakeAbort extends Error {}

const decoder = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();
const client_flags_known = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES;

interface State {
  noZeroes: boolean;
  structured: boolean;
  /** Export name `base:allocation` was selected for, if any. */
  metaExport: string | undefined;
}

/** A failed option: its reply type and a message for the user. */
class OptionError extends Error {
  constructor(readonly replyType: number, message: string) {
    super(message);
  }
}

/** Cursor over one option's payload; any overrun is NBD_REP_ERR_INVALID. */
class OptionData {
  #offset = 0;
  readonly #view: DataView;
  constructor(readonly bytes: Uint8Array) {
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  #need(count: number): void {
    if (this.#offset + count > this.bytes.byteLength) {
      throw new OptionError(P.NBD_REP_ERR_INVALID, "option data shorter than its fields say");
    }
  }
  u16(): number {
    this.#need(2);
    this.#offset += 2;
    return this.#view.getUint16(this.#offset - 2);
  }
  u32(): number {
    this.#need(4);
    this.#offset += 4;
    return this.#view.getUint32(this.#offset - 4);
  }
  string(length: number): string {
    if (length > string_bytes_max) {
      throw new OptionError(
        P.NBD_REP_ERR_INVALID,
        `string of ${length} bytes (max ${string_bytes_max})`,
      );
    }
    this.#need(length);
    const bytes = this.bytes.subarray(this.#offset, this.#offset + length);
    this.#offset += length;
    try {
      const text = decoder.decode(bytes);
      if (text.includes("\0")) throw new Error("NUL");
      return text;
    } catch {
      throw new OptionError(P.NBD_REP_ERR_INVALID, "string is not UTF-8 without NUL");
    }
  }
  end(): void {
    if (this.#offset !== this.bytes.byteLength) {
      throw new OptionError(P.NBD_REP_ERR_INVALID, "option data longer than its fields say");
    }
  }
}

function u64(value: number): bigint {
  return BigInt(value);
}

function sendOptionReply(writer: ReplyWriter, option: number, type: number, payload?: Uint8Array) {
  const length = payload?.byteLength ?? 0;
  const bytes = new Uint8Array(20 + length);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(0, P.OPTION_REPLY_MAGIC);
  view.setUint32(8, option);
  view.setUint32(12, type >>> 0);
  view.setUint32(16, length);
  if (payload) bytes.set(payload, 20);
  writer.pushCopy(bytes);
}

function sizedString(text: string, extra?: string): Uint8Array {
  const name = encoder.encode(text);
  const tail = extra === undefined ? new Uint8Array() : encoder.encode(extra);
  const bytes = new Uint8Array(4 + name.byteLength + tail.byteLength);
  new DataView(bytes.buffer).setUint32(0, name.byteLength);
  bytes.set(name, 4);
  bytes.set(tail, 4 + name.byteLength);
  return bytes;
}

/** Runs the handshake; resolves to the session, or undefined when the client left. */
export async function negotiate(
  reader: SocketReader,
  writer: ReplyWriter,
  context: HandshakeContext,
): Promise<Session | undefined> {
  const greeting = new Uint8Array(18);
  const greetingView = new DataView(greeting.buffer);
  greetingView.setBigUint64(0, P.NBDMAGIC);
  greetingView.setBigUint64(8, P.IHAVEOPT);
  greetingView.setUint16(16, P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
  writer.pushCopy(greeting);

  if (!(await reader.fill(4))) return undefined;
  const clientFlags = reader.view.getUint32(reader.start);
  reader.start += 4;
  if ((clientFlags & ~client_flags_known) !== 0) {
    throw new HandshakeAbort(`unknown client flags 0x${clientFlags.toString(16)}`);
  }
  const state: State = {
    noZeroes: (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0,
    structured: false,
    metaExport: undefined,
  };
  for (let count = 0; count < context.limits.options_per_handshake_max; count++) {
    if (!(await reader.fill(16))) return undefined;
    const view = reader.view;
    if (view.getBigUint64(reader.start) !== P.IHAVEOPT) {
      throw new HandshakeAbort("bad option magic");
    }
    const option = view.getUint32(reader.start + 8);
    const length = view.getUint32(reader.start + 12);
    reader.start += 16;
    if (length > context.limits.option_bytes_max) {
      throw new HandshakeAbort(`option ${option} of ${length} bytes is too large`);
    }
    const data = new Uint8Array(length);
    await reader.readInto(data);
    const outcome = handleOption(option, new OptionData(data), state, writer, context);
    if (outcome !== "continue") return outcome;
  }
  throw new HandshakeAbort(`more than ${context.limits.options_per_handshake_max} options`);
}

// One option; "continue" to keep haggling, a Session to transmit, undefined to end.
function handleOption(
  option: number,
  data: OptionData,
  state: State,
  writer: ReplyWriter,
  context: HandshakeContext,
): Session | undefined | "continue" {
  context.log("debug", `option ${option} (${data.bytes.byteLength} bytes)`);
  if (option === P.NBD_OPT_EXPORT_NAME) return exportName(data, state, writer, context);
  if (option === P.NBD_OPT_ABORT) {
    sendOptionReply(writer, option, P.NBD_REP_ACK);
    return undefined;
  }
  try {
    if (context.shuttingDown()) {
      throw new OptionError(P.NBD_REP_ERR_SHUTDOWN, "server is shutting down");
    }
    switch (option) {
      case P.NBD_OPT_LIST:
        return optList(data, writer, context);
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO:
        return optInfoGo(option, data, state, writer, context);
      case P.NBD_OPT_STRUCTURED_REPLY:
        data.end();
        state.structured = true;
        sendOptionReply(writer, option, P.NBD_REP_ACK);
        return "continue";
      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT:
        return optMetaContext(option, data, state, writer, context);
      default:
        throw new OptionError(P.NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  } catch (error) {
    if (!(error instanceof OptionError)) throw error;
    context.log("debug", `option ${option}: ${error.message}`);
    sendOptionReply(writer, option, error.replyType, encoder.encode(error.message));
    return "continue";
  }
}

function exportName(
  data: OptionData,
  state: State,
  writer: ReplyWriter,
  context: HandshakeContext,
) {
  let name: string;
  try {
    name = data.string(data.bytes.byteLength);
  } catch {
    throw new HandshakeAbort("NBD_OPT_EXPORT_NAME with an invalid name");
  }
  const nbdExport = context.shuttingDown() ? undefined : context.lookup(name);
  // proto.md: an export that cannot be served here ends the session (no error reply exists).
  if (!nbdExport) throw new HandshakeAbort(`NBD_OPT_EXPORT_NAME: no export '${name}'`);
  const flags = transmissionFlags(nbdExport, state.structured);
  const reply = new Uint8Array(state.noZeroes ? 10 : 134);
  const view = new DataView(reply.buffer);
  view.setBigUint64(0, u64(nbdExport.driver.sizeBytes));
  view.setUint16(8, flags);
  writer.pushCopy(reply);
  return {
    nbdExport,
    structuredReplies: state.structured,
    baseAllocation: state.structured && state.metaExport === name,
    transmissionFlags: flags,
  };
}

function optList(data: OptionData, writer: ReplyWriter, context: HandshakeContext): "continue" {
  data.end();
  for (const e of context.list()) {
    sendOptionReply(writer, P.NBD_OPT_LIST, P.NBD_REP_SERVER, sizedString(e.name, e.description));
  }
  sendOptionReply(writer, P.NBD_OPT_LIST, P.NBD_REP_ACK);
  return "continue";
}

function infoReply(type: number, bodyBytes: number, fill: (view: DataView) => void) {
  const bytes = new Uint8Array(2 + bodyBytes);
  const view = new DataView(bytes.buffer);
  view.setUint16(0, type);
  fill(view);
  return bytes;
}

function optInfoGo(
  option: number,
  data: OptionData,
  state: State,
  writer: ReplyWriter,
  context: HandshakeContext,
): Session | "continue" {
  const name = data.string(data.u32());
  const requests = new Set<number>();
  for (let n = data.u16(); n > 0; n--) requests.add(data.u16());
  data.end();
  const nbdExport = context.lookup(name);
  if (!nbdExport) throw new OptionError(P.NBD_REP_ERR_UNKNOWN, `no export named '${name}'`);
  const flags = transmissionFlags(nbdExport, state.structured);
  const send = (payload: Uint8Array) => sendOptionReply(writer, option, P.NBD_REP_INFO, payload);
  send(infoReply(P.NBD_INFO_EXPORT, 10, (v) => {
    v.setBigUint64(2, u64(nbdExport.driver.sizeBytes));
    v.setUint16(10, flags);
  }));
  if (requests.has(P.NBD_INFO_NAME)) {
    const nameBytes = encoder.encode(nbdExport.name);
    const reply = infoReply(P.NBD_INFO_NAME, nameBytes.byteLength, () => {});
    reply.set(nameBytes, 2);
    send(reply);
  }
  if (requests.has(P.NBD_INFO_DESCRIPTION) && nbdExport.description) {
    const text = encoder.encode(nbdExport.description);
    const reply = infoReply(P.NBD_INFO_DESCRIPTION, text.byteLength, () => {});
    reply.set(text, 2);
    send(reply);
  }
  // Sent unasked too: minimum 1 means no alignment constraint, which every client accepts.
  send(infoReply(P.NBD_INFO_BLOCK_SIZE, 12, (v) => {
    v.setUint32(2, 1);
    v.setUint32(6, preferred_block_bytes);
    v.setUint32(10, context.limits.request_bytes_max);
  }));
  sendOptionReply(writer, option, P.NBD_REP_ACK);
  if (option === P.NBD_OPT_INFO) return "continue";
  return {
    nbdExport,
    structuredReplies: state.structured,
    // A context selected for another export does not carry over (proto.md: tied to the export).
    baseAllocation: state.structured && state.metaExport === name,
    transmissionFlags: flags,
  };
}

function optMetaContext(
  option: number,
  data: OptionData,
  state: State,
  writer: ReplyWriter,
  context: HandshakeContext,
): "continue" {
  if (!state.structured) {
    throw new OptionError(P.NBD_REP_ERR_INVALID, "negotiate structured replies first");
  }
  const name = data.string(data.u32());
  const queries: string[] = [];
  for (let n = data.u32(); n > 0; n--) queries.push(data.string(data.u32()));
  data.end();
  if (!context.lookup(name)) {
    throw new OptionError(P.NBD_REP_ERR_UNKNOWN, `no export named '${name}'`);
  }
  const listing = option === P.NBD_OPT_LIST_META_CONTEXT;
  const matches = (q: string) => q === P.BASE_ALLOCATION || (listing && q === "base:");
  const selected = (listing && queries.length === 0) || queries.some(matches);
  if (selected) {
    const id = listing ? 0 : P.BASE_ALLOCATION_ID;
    const payload = new Uint8Array(4 + P.BASE_ALLOCATION.length);
    new DataView(payload.buffer).setUint32(0, id);
    payload.set(encoder.encode(P.BASE_ALLOCATION), 4);
    sendOptionReply(writer, option, P.NBD_REP_META_CONTEXT, payload);
  }
  if (!listing) state.metaExport = selected ? name : undefined;
  sendOptionReply(writer, option, P.NBD_REP_ACK);
  return "continue";
}
