/**
 * Protocol fuzzing against `blktap ctrl` itself: 50,000 malformed option
 * requests and transmission commands through ctrl's NBD socket, to exports
 * served by real disk processes over the ring, from parallel connections,
 * while a well-behaved client keeps writing and verifying its own data.
 *
 * Only malformed cases are counted, and each one must be refused the way
 * proto.md says: an `NBD_REP_ERR_*` reply to the option that was sent, the
 * documented error of a command (simple reply or structured error chunk,
 * for the command's handle), or the connection closed where the framing
 * cannot be recovered (bad magic, unknown client flags, a stream that ends
 * in the middle of a message, an unknown name in NBD_OPT_EXPORT_NAME).
 * Every case has a watchdog: an answer that does not come fails the test.
 * Afterwards ctrl and both disk processes are the ones that started, and the
 * image files hold exactly the bystander's writes.
 *
 * `SEED=n` replays a run; `NBD_FUZZ_SCALE=k` multiplies the case counts.
 */
import assert from "node:assert/strict";
import * as P from "../../../src/frontends/nbd/protocol.ts";
import { CtrlHarness, rawImage } from "../../_helpers/ctrl_harness.ts";
import { infoData, metaContextData, RawNbdClient } from "../../_helpers/nbd_client.ts";
import { Random, testSeed } from "../../_helpers/random.ts";
import { sha256File } from "../../_helpers/tools.ts";
import { joinBytes } from "../../../src/formats/join_bytes.ts";

const MiB = 1 << 20;
const size_bytes = 16 * MiB;
/** The bystander owns the upper half of export "f"; no fuzz case may change any byte. */
const bystander_start_bytes = 8 * MiB;
const scale = Number(Deno.env.get("NBD_FUZZ_SCALE") ?? "1");
const handshake_cases = 20_000 * scale;
const command_cases = 30_000 * scale;
const options_per_connection_max = 40;
const commands_per_connection_max = 200;
const parallel_connections = 16;
/** One case (send, then the answer or the close) may take this long, loaded CI included. */
const case_timeout_ms = 15_000;
const encoder = new TextEncoder();

/** How a malformed case must be refused. */
type Refusal =
  | { kind: "option-error"; option: number; types?: number[] }
  | { kind: "command-error"; errors: number[] }
  | { kind: "close" };

interface Case {
  what: string;
  bytes: Uint8Array;
  /** Half-close after sending: the message stays incomplete for good. */
  endStream?: boolean;
  refusal: Refusal;
}

function option(code: number, data: Uint8Array, lengthField = data.byteLength): Uint8Array {
  const head = new Uint8Array(16);
  const view = new DataView(head.buffer);
  view.setBigUint64(0, P.IHAVEOPT);
  view.setUint32(8, code);
  view.setUint32(12, lengthField);
  return joinBytes([head, data]);
}

function optionError(what: string, code: number, data: Uint8Array, types?: number[]): Case {
  return {
    what,
    bytes: option(code, data),
    refusal: { kind: "option-error", option: code, types },
  };
}

function unknownName(r: Random): string {
  return `no-such-export-${r.int(0, 1e9)}`;
}

/** A malformed option for a connection in option haggling (`structured`: already negotiated). */
function malformedOption(r: Random, structured: boolean): Case {
  const infoGo = r.pick([P.NBD_OPT_INFO, P.NBD_OPT_GO]);
  const good = infoData("f", r.pick([[], [P.NBD_INFO_NAME], [P.NBD_INFO_BLOCK_SIZE, 1]]));
  const meta = metaContextData("f", [P.BASE_ALLOCATION]);
  const INVALID = [P.NBD_REP_ERR_INVALID];
  const roll = r.int(0, 99);
  if (roll < 2) {
    const bad = option(P.NBD_OPT_LIST, new Uint8Array());
    bad[r.int(0, 7)] ^= 1 << r.int(0, 7);
    return { what: "bad option magic", bytes: bad, refusal: { kind: "close" } };
  }
  if (roll < 3) {
    const length = r.int(0x10000000, 0xffffffff);
    return {
      what: `option of ${length} bytes`,
      bytes: option(P.NBD_OPT_LIST, new Uint8Array(), length),
      refusal: { kind: "close" },
    };
  }
  if (roll < 4) {
    const full = option(infoGo, good);
    return {
      what: "option cut short by the end of the stream",
      bytes: full.subarray(0, r.int(1, full.byteLength - 1)),
      endStream: true,
      refusal: { kind: "close" },
    };
  }
  if (roll < 5) {
    return {
      what: "NBD_OPT_EXPORT_NAME of an unknown export",
      bytes: option(P.NBD_OPT_EXPORT_NAME, encoder.encode(unknownName(r))),
      refusal: { kind: "close" },
    };
  }
  switch (r.int(0, structured ? 9 : 8)) {
    case 0: {
      const code = r.int(12, 0x7fffffff); // proto.md defines 1..11
      const what = `unknown option ${code}`;
      return optionError(what, code, r.bytes(r.int(0, 64)), [P.NBD_REP_ERR_UNSUP]);
    }
    case 1:
      return optionError("LIST with data", P.NBD_OPT_LIST, r.bytes(r.int(1, 64)), INVALID);
    case 2:
      return optionError(
        "STRUCTURED_REPLY with data",
        P.NBD_OPT_STRUCTURED_REPLY,
        r.bytes(r.int(1, 64)),
        INVALID,
      );
    case 3:
      return optionError(
        "INFO/GO data cut short",
        infoGo,
        good.subarray(0, r.int(0, good.byteLength - 1)),
        INVALID,
      );
    case 4:
      return optionError(
        "INFO/GO with trailing bytes",
        infoGo,
        joinBytes([good, r.bytes(r.int(1, 8))]),
        INVALID,
      );
    case 5: {
      const data = good.slice();
      new DataView(data.buffer).setUint32(0, r.int(data.byteLength - 3, 0xffffffff));
      return optionError("INFO/GO name length past the data", infoGo, data, INVALID);
    }
    case 6: {
      const what = "INFO/GO of an unknown export";
      return optionError(what, infoGo, infoData(unknownName(r), []), [P.NBD_REP_ERR_UNKNOWN]);
    }
    case 7: {
      const name = new Uint8Array([0x66, 0xff, 0xfe, r.int(0x80, 0xbf)]);
      const data = new Uint8Array(4 + name.byteLength + 2);
      new DataView(data.buffer).setUint32(0, name.byteLength);
      data.set(name, 4);
      return optionError("INFO/GO name not UTF-8", infoGo, data);
    }
    case 8:
      if (!structured) {
        // proto.md: MUST NOT be requested before structured replies; SHOULD be ERR_INVALID.
        return optionError(
          "SET_META_CONTEXT before STRUCTURED_REPLY",
          P.NBD_OPT_SET_META_CONTEXT,
          meta,
        );
      }
      return optionError(
        "META_CONTEXT of an unknown export",
        r.pick([P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT]),
        metaContextData(unknownName(r), [P.BASE_ALLOCATION]),
      );
    default: {
      const code = r.pick([P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT]);
      const broken = r.int(0, 1) === 0
        ? meta.subarray(0, r.int(0, meta.byteLength - 1))
        : joinBytes([meta, r.bytes(r.int(1, 8))]);
      return optionError("META_CONTEXT data of the wrong length", code, broken, INVALID);
    }
  }
}

/** What a command connection negotiated. */
interface Session {
  name: "f" | "ro";
  structured: boolean;
  meta: boolean;
  readOnly: boolean;
}

function request(
  type: number,
  flags: number,
  handle: bigint,
  offset: bigint,
  length: number,
  payload = new Uint8Array(),
): Uint8Array {
  const head = new Uint8Array(P.REQUEST_HEADER_BYTES);
  const view = new DataView(head.buffer);
  view.setUint32(0, P.NBD_REQUEST_MAGIC);
  view.setUint16(4, flags);
  view.setUint16(6, type);
  view.setBigUint64(8, handle);
  view.setBigUint64(16, offset);
  view.setUint32(24, length);
  return joinBytes([head, payload]);
}

/** Flags proto.md documents per command (FUA is valid on every command). */
const DOCUMENTED_FLAGS: Record<number, number> = {
  [P.NBD_CMD_READ]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_DF,
  [P.NBD_CMD_WRITE]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_TRIM]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_CACHE]: P.NBD_CMD_FLAG_FUA,
  [P.NBD_CMD_WRITE_ZEROES]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO,
  [P.NBD_CMD_BLOCK_STATUS]: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_REQ_ONE,
};
const FLAGS_KNOWN = 0x1f;

/** Commands with a range the session may send (BLOCK_STATUS needs base:allocation). */
function rangedCommands(s: Session): number[] {
  const types = [P.NBD_CMD_READ, P.NBD_CMD_TRIM, P.NBD_CMD_CACHE, P.NBD_CMD_WRITE_ZEROES];
  types.push(P.NBD_CMD_WRITE);
  if (s.meta) types.push(P.NBD_CMD_BLOCK_STATUS);
  return types;
}

const writes = new Set([P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES]);

/** The errors proto.md allows for a request reaching past the end. */
function pastEndErrors(type: number, s: Session): number[] {
  const errors = type === P.NBD_CMD_WRITE || type === P.NBD_CMD_WRITE_ZEROES
    ? [P.NBD_ENOSPC, P.NBD_EINVAL]
    : [P.NBD_EINVAL];
  return s.readOnly && writes.has(type) ? [...errors, P.NBD_EPERM] : errors;
}

function commandError(what: string, bytes: Uint8Array, errors: number[]): Case {
  return { what, bytes, refusal: { kind: "command-error", errors } };
}

/** A range inside the export, in the fuzzers' half (never the bystander's). */
function innerRange(r: Random): [bigint, number] {
  const length = r.int(1, 64) * 512;
  return [BigInt(r.int(0, (bystander_start_bytes - length) / 512) * 512), length];
}

/** A malformed command for a connection in transmission. */
function malformedCommand(r: Random, s: Session, handle: bigint): Case {
  const roll = r.int(0, 199);
  if (roll < 2) {
    const bytes = request(P.NBD_CMD_READ, 0, handle, 0n, 512);
    new DataView(bytes.buffer).setUint32(0, r.int(0, 0xffffffff) ^ 1 ^ P.NBD_REQUEST_MAGIC);
    return { what: "bad request magic", bytes, refusal: { kind: "close" } };
  }
  if (roll < 4 && !s.readOnly) {
    // A write the server would accept, but its payload never comes.
    const [offset, length] = innerRange(r);
    const payload = new Uint8Array(r.int(0, length - 1)).fill(0xaa);
    return {
      what: "WRITE payload cut short by the end of the stream",
      bytes: request(P.NBD_CMD_WRITE, 0, handle, offset, length, payload),
      endStream: true,
      refusal: { kind: "close" },
    };
  }
  const types = rangedCommands(s);
  const type = r.pick(types);
  const payloadFor = (length: number) =>
    type === P.NBD_CMD_WRITE ? new Uint8Array(length).fill(0xbb) : new Uint8Array();
  switch (r.int(0, 6)) {
    case 0: {
      // 9.. are not defined (8 is the experimental RESIZE): SHOULD be EINVAL.
      const unknown = r.int(9, 0xffff);
      const [offset, length] = innerRange(r);
      const bytes = request(unknown, 0, handle, offset, length);
      return commandError(`unknown command ${unknown}`, bytes, [P.NBD_EINVAL]);
    }
    case 1: {
      const flag = 1 << r.int(5, 15);
      const [offset, length] = innerRange(r);
      const bytes = request(type, flag, handle, offset, length, payloadFor(length));
      const errors = s.readOnly && writes.has(type) ? [P.NBD_EINVAL, P.NBD_EPERM] : [P.NBD_EINVAL];
      return commandError(
        `command ${type} with unknown flag 0x${flag.toString(16)}`,
        bytes,
        errors,
      );
    }
    case 2: {
      const misplaced = FLAGS_KNOWN & ~DOCUMENTED_FLAGS[type];
      const bits = [0, 1, 2, 3, 4].map((b) => 1 << b).filter((b) => misplaced & b);
      const flag = r.pick(bits);
      const [offset, length] = innerRange(r);
      const bytes = request(type, flag, handle, offset, length, payloadFor(length));
      const errors = s.readOnly && writes.has(type) ? [P.NBD_EINVAL, P.NBD_EPERM] : [P.NBD_EINVAL];
      return commandError(
        `command ${type} with flag 0x${flag.toString(16)} not documented for it`,
        bytes,
        errors,
      );
    }
    case 3: {
      const length = r.int(1, 128) * 512;
      const offset = size_bytes - r.int(0, length / 512 - 1) * 512;
      const bytes = request(type, 0, handle, BigInt(offset), length, payloadFor(length));
      return commandError(`command ${type} past the end`, bytes, pastEndErrors(type, s));
    }
    case 4: {
      const offset = r.pick([2n ** 63n, 2n ** 64n - 512n, BigInt(size_bytes) * 2n ** 20n]);
      const length = r.int(1, 8) * 512;
      const bytes = request(type, 0, handle, offset, length, payloadFor(length));
      return commandError(`command ${type} at offset ${offset}`, bytes, pastEndErrors(type, s));
    }
    case 5: {
      if (s.readOnly) {
        const write = r.pick([...writes]);
        const [offset, length] = innerRange(r);
        const payload = new Uint8Array(write === P.NBD_CMD_WRITE ? length : 0);
        const bytes = request(write, 0, handle, offset, length, payload);
        return commandError(`command ${write} on a read-only export`, bytes, [P.NBD_EPERM]);
      }
      const length = r.int(32 * MiB + 1, 0xffffffff);
      const bytes = request(P.NBD_CMD_READ, 0, handle, 0n, length);
      return commandError(`READ of ${length} bytes`, bytes, [P.NBD_EINVAL, P.NBD_EOVERFLOW]);
    }
    default: {
      const [offset, length] = innerRange(r);
      if (!s.meta) {
        const bytes = request(P.NBD_CMD_BLOCK_STATUS, 0, handle, offset, length);
        return commandError("BLOCK_STATUS without a metadata context", bytes, [P.NBD_EINVAL]);
      }
      if (!s.structured) throw new Error("meta without structured replies");
      const flag = r.pick([P.NBD_CMD_FLAG_DF, P.NBD_CMD_FLAG_NO_HOLE, P.NBD_CMD_FLAG_FAST_ZERO]);
      const bytes = request(P.NBD_CMD_BLOCK_STATUS, flag, handle, offset, length);
      return commandError(`BLOCK_STATUS with flag 0x${flag.toString(16)}`, bytes, [P.NBD_EINVAL]);
    }
  }
}

/** Counts of what was sent and how it was refused. */
interface Tally {
  sent: number;
  byRefusal: Record<string, number>;
  connections: number;
}

/** Runs `work` or fails naming the case when it takes longer than the watchdog allows. */
async function watchdog<T>(what: string, work: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`no answer within ${case_timeout_ms} ms to: ${what}`)),
      case_timeout_ms,
    );
  });
  try {
    return await Promise.race([work, expired]);
  } finally {
    clearTimeout(timer);
  }
}

async function send(c: RawNbdClient, kase: Case): Promise<void> {
  try {
    await c.send(kase.bytes);
    if (kase.endStream) await c.conn.closeWrite();
  } catch {
    // The server hung up first: judged by what it sent before.
  }
}

/** True when the stream ended (cleanly or reset) without another byte. */
async function closedWithoutAnswer(c: RawNbdClient): Promise<boolean> {
  try {
    return !(await c.reader.fill(1));
  } catch (error) {
    if (error instanceof Deno.errors.ConnectionReset || error instanceof Deno.errors.BrokenPipe) {
      return true;
    }
    throw error;
  }
}

/** Checks one option case's answer; resolves true when the connection goes on. */
async function judgeOption(c: RawNbdClient, kase: Case, seed: number): Promise<boolean> {
  const context = `${kase.what} (generator seed ${seed})`;
  const { refusal } = kase;
  if (refusal.kind === "close") {
    if (await closedWithoutAnswer(c)) return false;
    // A server may refuse an oversized option with ERR_TOO_BIG instead of hanging up.
    const reply = await c.readOptionReply();
    assert.equal(reply.type, P.NBD_REP_ERR_TOO_BIG, `${context}: answered ${reply.type}`);
    return false;
  }
  assert.equal(refusal.kind, "option-error");
  if (refusal.kind !== "option-error") return false;
  assert.equal(await closedWithoutAnswer(c), false, `${context}: the server hung up`);
  const reply = await c.readOptionReply();
  assert.equal(reply.option, refusal.option, `${context}: reply names option ${reply.option}`);
  assert.ok(
    reply.type >= 0x80000000,
    `${context}: answered 0x${reply.type.toString(16)}, not an error`,
  );
  if (refusal.types) {
    assert.ok(refusal.types.includes(reply.type), `${context}: error 0x${reply.type.toString(16)}`);
  }
  return true;
}

/** Checks one command case's answer; resolves true when the connection goes on. */
async function judgeCommand(c: RawNbdClient, kase: Case, handle: bigint, seed: number) {
  const context = `${kase.what} (generator seed ${seed})`;
  const { refusal } = kase;
  if (refusal.kind === "close") {
    if (!(await closedWithoutAnswer(c))) {
      const reply = await c.readReply().catch((e) => e);
      assert.fail(`${context}: the server answered instead of closing: ${Deno.inspect(reply)}`);
    }
    return false;
  }
  assert.equal(await closedWithoutAnswer(c), false, `${context}: the server hung up`);
  const reply = await c.readReply();
  assert.equal(reply.handle, handle, `${context}: reply for handle ${reply.handle}`);
  let error = reply.error;
  if (reply.structured) {
    assert.ok(reply.type & 0x8000, `${context}: chunk type ${reply.type} is not an error`);
    assert.ok(reply.flags & P.NBD_REPLY_FLAG_DONE, `${context}: error chunk without DONE`);
    const view = new DataView(reply.data.buffer, reply.data.byteOffset, reply.data.byteLength);
    error = view.getUint32(0);
    assert.ok(6 + view.getUint16(4) <= reply.data.byteLength, `${context}: message overruns`);
  }
  assert.ok(
    refusal.kind === "command-error" && refusal.errors.includes(error),
    `${context}: error ${error}`,
  );
  return true;
}

function count(tally: Tally, kase: Case): void {
  tally.sent += 1;
  const key = kase.refusal.kind;
  tally.byRefusal[key] = (tally.byRefusal[key] ?? 0) + 1;
}

/** One connection haggling with malformed options until closed or its share is sent. */
async function optionSession(socket: string, r: Random, quota: { left: number }, tally: Tally) {
  const c = await RawNbdClient.connect(socket);
  tally.connections += 1;
  try {
    if (r.int(0, 29) === 0) {
      const flags = r.pick([4, 0x80, 0x10000, 0x80000000]) | P.NBD_FLAG_C_FIXED_NEWSTYLE;
      const kase: Case = {
        what: `client flags 0x${flags.toString(16)}`,
        bytes: new Uint8Array(),
        refusal: { kind: "close" },
      };
      quota.left -= 1;
      await watchdog(
        kase.what,
        (async () => {
          await c.greet(flags);
          assert.ok(await closedWithoutAnswer(c), `${kase.what}: the server went on`);
        })(),
      );
      count(tally, kase);
      return;
    }
    await c.greet();
    const structured = r.int(0, 1) === 1;
    if (structured) {
      const [ack] = await c.optionReplies(P.NBD_OPT_STRUCTURED_REPLY);
      assert.equal(ack.type, P.NBD_REP_ACK);
    }
    for (let n = 0; n < options_per_connection_max && quota.left > 0; n++) {
      quota.left -= 1;
      const kase = malformedOption(r, structured);
      const goesOn = await watchdog(
        kase.what,
        (async () => {
          await send(c, kase);
          return await judgeOption(c, kase, r.seed);
        })(),
      );
      count(tally, kase);
      if (!goesOn) return;
    }
  } finally {
    c.close();
  }
}

/** One connection in transmission sending malformed commands until closed or its share is sent. */
async function commandSession(socket: string, r: Random, quota: { left: number }, tally: Tally) {
  const c = await RawNbdClient.connect(socket);
  tally.connections += 1;
  try {
    const name = r.int(0, 3) === 0 ? "ro" : "f";
    const meta = r.int(0, 2) === 0;
    const structured = meta || r.int(0, 1) === 1;
    await c.go(name, { structured, meta });
    const session: Session = {
      name,
      structured,
      meta,
      readOnly: (c.flags & P.NBD_FLAG_READ_ONLY) !== 0,
    };
    assert.equal(session.readOnly, name === "ro");
    for (let n = 0; n < commands_per_connection_max && quota.left > 0; n++) {
      quota.left -= 1;
      const handle = BigInt(r.int(1, 2 ** 31)) << 16n | BigInt(n);
      const kase = malformedCommand(r, session, handle);
      const goesOn = await watchdog(
        kase.what,
        (async () => {
          await send(c, kase);
          return await judgeCommand(c, kase, handle, r.seed);
        })(),
      );
      count(tally, kase);
      if (!goesOn) return;
    }
    await c.request(P.NBD_CMD_DISC, 0, 0n, 0, 0);
  } finally {
    c.close();
  }
}

/**
 * Runs sessions from `parallel_connections` connections until `total` cases
 * were sent. Each connection draws from its own generator seeded from
 * `seed`, so a failing case is replayed by the seed its message names.
 */
async function fuzz(
  total: number,
  session: (r: Random, quota: { left: number }) => Promise<void>,
  seed: number,
): Promise<void> {
  const quota = { left: total };
  await Promise.all(Array.from({ length: parallel_connections }, async (_, worker) => {
    const r = new Random((seed + Math.imul(worker + 1, 0x9e3779b1)) >>> 0);
    while (quota.left > 0) await session(r, quota);
  }));
}

/** A client using the same export throughout, verifying every read against its model. */
class Bystander {
  readonly model = new Uint8Array(size_bytes - bystander_start_bytes);
  operations = 0;
  #stop = false;
  #done: Promise<void> | undefined;

  constructor(readonly client: RawNbdClient, readonly r: Random) {}

  start(): void {
    this.#done = this.#loop();
  }

  async stop(): Promise<void> {
    this.#stop = true;
    await this.#done;
  }

  async #loop(): Promise<void> {
    while (!this.#stop) await this.step();
  }

  async step(): Promise<void> {
    const c = this.client;
    const length = this.r.int(1, 128) * 512;
    const at = this.r.int(0, (this.model.byteLength - length) / 512) * 512;
    const roll = this.r.int(0, 9);
    if (roll < 4) {
      const data = this.r.bytes(length);
      const error = await c.command(P.NBD_CMD_WRITE, 0, bystander_start_bytes + at, length, data);
      assert.equal(error, 0, "bystander write");
      this.model.set(data, at);
    } else if (roll === 4) {
      assert.equal(await c.command(P.NBD_CMD_FLUSH, 0, 0, 0), 0, "bystander flush");
    } else {
      const got = await c.read(bystander_start_bytes + at, length);
      assert.deepEqual(got, this.model.subarray(at, at + length), `bystander read at ${at}`);
    }
    this.operations += 1;
  }
}

function alive(pid: number): boolean {
  try {
    const state = Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1];
    return !state.startsWith("Z");
  } catch {
    return false;
  }
}

Deno.test("nbd fuzz: 50,000 malformed handshakes and commands to ctrl, each refused; a bystander's data and every process survive", async () => {
  const random = testSeed("nbd fuzz");
  const h = await CtrlHarness.start();
  try {
    const image = await rawImage(h.dir, "f.raw", size_bytes);
    const roImage = `${h.dir}/ro.raw`;
    await Deno.writeFile(roImage, random.bytes(size_bytes));
    const roDigest = await sha256File(roImage);
    await h.request({ op: "create", image: `aio:${image}`, name: "f" });
    await h.request({ op: "create", image: `aio:${roImage}`, name: "ro", readOnly: true });
    const pids = [await h.diskPid(0), await h.diskPid(1)];
    const socket = `${h.runDir}/nbd.sock`;

    const bystander = new Bystander(
      await RawNbdClient.connect(socket),
      new Random(random.seed + 2),
    );
    await bystander.client.go("f", { meta: true });
    bystander.start();
    const tally: Tally = { sent: 0, byRefusal: {}, connections: 0 };
    try {
      await fuzz(handshake_cases, (r, q) => optionSession(socket, r, q, tally), random.seed);
      await fuzz(command_cases, (r, q) => commandSession(socket, r, q, tally), random.seed + 1);
    } finally {
      await bystander.stop();
    }
    console.log(
      `nbd fuzz: ${tally.sent} malformed cases refused over ${tally.connections} connections ` +
        `(${JSON.stringify(tally.byRefusal)}); bystander ${bystander.operations} operations`,
    );
    assert.ok(tally.sent >= handshake_cases + command_cases);
    assert.ok(tally.sent >= 50_000 * scale, `${tally.sent} malformed cases`);
    assert.ok(bystander.operations >= 100, `bystander ran ${bystander.operations} operations`);

    // Still serving: the bystander reads all of its data back, a new client connects.
    const whole = await bystander.client.read(bystander_start_bytes, bystander.model.byteLength);
    assert.deepEqual(whole, bystander.model);
    const late = await RawNbdClient.connect(socket);
    await late.go("ro", { structured: true });
    const roBytes = await Deno.readFile(roImage);
    assert.deepEqual(await late.read(12345, 4096), roBytes.subarray(12345, 12345 + 4096));
    late.close();
    bystander.client.close();

    // ctrl and both disk processes are the ones that started; none was restarted.
    assert.ok(alive(h.ctrlPid), "ctrl is alive");
    const minors = await h.list();
    assert.deepEqual(minors.map((m) => [m.pid, m.state, m.restarts]), [
      [pids[0], "running", 0],
      [pids[1], "running", 0],
    ]);
    for (const pid of pids) assert.ok(alive(pid), `disk process ${pid} is alive`);

    // No malformed request reached an image: exactly the bystander's writes.
    await h.request({ op: "destroy", minor: "f" });
    await h.request({ op: "destroy", minor: "ro" });
    const expected = new Uint8Array(size_bytes);
    expected.set(bystander.model, bystander_start_bytes);
    assert.deepEqual(await Deno.readFile(image), expected);
    assert.equal(await sha256File(roImage), roDigest);
  } finally {
    await h.close();
  }
});
