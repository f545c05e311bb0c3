/**
 * Protocol fuzzing: tens of thousands of mutated handshakes and malformed
 * commands from many connections, while a well-behaved client keeps using
 * the same server. The server must answer or disconnect each offender,
 * never crash (an unhandled rejection fails the test), never log an
 * unexpected error, and keep serving the bystander correctly.
 * `SEED=n` replays a run; `NBD_FUZZ_SCALE=k` multiplies the case counts.
 */
import assert from "node:assert/strict";
import * as P from "../../../src/frontends/nbd/protocol.ts";
import { type NbdExport, startNbdServer } from "../../../src/frontends/nbd/server.ts";
import { MemoryDriver } from "../../_helpers/memory_driver.ts";
import { infoData, metaContextData, RawNbdClient } from "../../_helpers/nbd_client.ts";
import { type Random, testSeed } from "../../_helpers/random.ts";

const MiB = 1 << 20;
const size_bytes = 16 * MiB;
const scale = Number(Deno.env.get("NBD_FUZZ_SCALE") ?? "1");
const handshake_cases = 12_000 * scale;
const command_connections = 300 * scale;
const commands_per_connection = 250;
const parallel_connections = 16;
const encoder = new TextEncoder();

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

function u32(value: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, value >>> 0);
  return b;
}

function option(code: number, data: Uint8Array): Uint8Array {
  const head = new Uint8Array(16);
  const view = new DataView(head.buffer);
  view.setBigUint64(0, P.IHAVEOPT);
  view.setUint32(8, code);
  view.setUint32(12, data.byteLength);
  return concat([head, data]);
}

function randomOption(r: Random): Uint8Array {
  const name = r.pick(["f", "ro", "", "nope", "f\u00e9"]);
  switch (r.int(0, 9)) {
    case 0:
      return option(P.NBD_OPT_LIST, new Uint8Array());
    case 1:
      return option(P.NBD_OPT_STRUCTURED_REPLY, new Uint8Array());
    case 2:
      return option(
        r.pick([P.NBD_OPT_INFO, P.NBD_OPT_GO]),
        infoData(name, [r.int(0, 5), r.int(0, 3)]),
      );
    case 3:
      return option(
        r.pick([P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT]),
        metaContextData(
          name,
          r.pick([[], ["base:"], [P.BASE_ALLOCATION], ["x:y", "base:allocation"]]),
        ),
      );
    case 4:
      return option(P.NBD_OPT_EXPORT_NAME, encoder.encode(name));
    case 5:
      return option(P.NBD_OPT_ABORT, new Uint8Array());
    case 6:
      return option(r.int(0, 20), r.bytes(r.int(0, 40)));
    default:
      return option(
        r.pick([P.NBD_OPT_GO, P.NBD_OPT_INFO, P.NBD_OPT_SET_META_CONTEXT]),
        r.bytes(r.int(0, 64)),
      );
  }
}

function mutate(r: Random, bytes: Uint8Array): Uint8Array {
  let out: Uint8Array = bytes.slice();
  for (let n = r.int(1, 4); n > 0 && out.byteLength > 0; n--) {
    const at = r.int(0, out.byteLength - 1);
    switch (r.int(0, 4)) {
      case 0:
        out[at] ^= 1 << r.int(0, 7);
        break;
      case 1:
        out.set(r.bytes(Math.min(4, out.byteLength - at)), at);
        break;
      case 2:
        out = out.slice(0, at);
        break;
      case 3:
        out = concat([out.subarray(0, at), r.bytes(r.int(1, 32)), out.subarray(at)]);
        break;
      default:
        if (at + 4 <= out.byteLength) {
          new DataView(out.buffer).setUint32(
            at,
            r.pick([0, 0xffffffff, 0x10000, r.int(0, 2 ** 31)]),
          );
        }
    }
  }
  return out;
}

/** A client handshake with 1-6 options, then mutated (or plain random bytes). */
function malformedHandshake(r: Random): Uint8Array {
  if (r.int(0, 19) === 0) return r.bytes(r.int(0, 200));
  const parts = [u32(r.pick([0, 1, 2, 3, 3, 3, 4, 0x80000000]))];
  for (let n = r.int(1, 6); n > 0; n--) parts.push(randomOption(r));
  return mutate(r, concat(parts));
}

/** One request header (often invalid) plus a payload that may not match its length. */
function malformedCommand(r: Random): Uint8Array {
  const head = new Uint8Array(28);
  const view = new DataView(head.buffer);
  view.setUint32(0, r.int(0, 999) > 0 ? P.NBD_REQUEST_MAGIC : r.int(0, 2 ** 32 - 1));
  view.setUint16(4, r.pick([0, 0, 0, 1, 2, 4, 8, 16, 3, 0x20, r.int(0, 0xffff)]));
  const type = r.int(0, 9) < 9 ? r.int(0, 7) : r.int(0, 0xffff);
  view.setUint16(6, type === P.NBD_CMD_DISC && r.int(0, 99) > 0 ? P.NBD_CMD_READ : type);
  view.setBigUint64(8, BigInt(r.int(0, 2 ** 31)));
  const offset = r.pick([
    r.int(0, size_bytes),
    size_bytes - r.int(0, 4096),
    r.int(0, 2 ** 52),
    2 ** 53 + r.int(0, 1000),
  ]);
  view.setBigUint64(16, BigInt(offset));
  // A 4 GiB write swallows the rest of the stream as its payload: keep it rare.
  const huge = type !== P.NBD_CMD_WRITE || r.int(0, 99) === 0 ? 0xffffffff : MiB + 1;
  const length = r.pick([
    0,
    r.int(1, 4096),
    r.int(1, 4096),
    r.int(1, 256 << 10),
    MiB,
    MiB + 1,
    huge,
  ]);
  view.setUint32(24, length);
  if (type !== P.NBD_CMD_WRITE) return head;
  // Now and then a payload that does not match its length: the stream desynchronizes.
  const payload = r.int(0, 99) > 0 && length <= MiB + 1 ? length : r.int(0, 4096);
  return concat([head, new Uint8Array(payload).fill(0xaa)]);
}

async function drain(conn: Deno.Conn): Promise<void> {
  const buffer = new Uint8Array(256 << 10);
  try {
    while ((await conn.read(buffer)) !== null) { /* discard */ }
  } catch {
    // reset by the server: fine
  }
}

async function sendAndClose(socket: string, bytes: Uint8Array, greeting: boolean): Promise<void> {
  const conn = await Deno.connect({ transport: "unix", path: socket });
  const drained = drain(conn);
  try {
    let done = 0;
    while (done < bytes.byteLength) done += await conn.write(bytes.subarray(done));
    await conn.closeWrite();
  } catch {
    // the server hung up first: that is an allowed answer
  }
  const timer = setTimeout(() => conn.close(), 10_000);
  await drained;
  clearTimeout(timer);
  try {
    conn.close();
  } catch {
    // closed by the timer
  }
  void greeting;
}

/** A valid handshake prefix (for command fuzzing) with random negotiation choices. */
function validHandshake(r: Random): Uint8Array {
  const parts = [u32(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)];
  const structured = r.int(0, 2) > 0;
  if (structured) parts.push(option(P.NBD_OPT_STRUCTURED_REPLY, new Uint8Array()));
  if (structured && r.int(0, 1)) {
    parts.push(option(P.NBD_OPT_SET_META_CONTEXT, metaContextData("f", [P.BASE_ALLOCATION])));
  }
  const name = r.int(0, 4) === 0 ? "ro" : "f";
  parts.push(
    r.int(0, 3) === 0
      ? option(P.NBD_OPT_EXPORT_NAME, encoder.encode(name))
      : option(P.NBD_OPT_GO, infoData(name, [])),
  );
  return concat(parts);
}

async function inParallel(count: number, task: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: parallel_connections }, async () => {
    while (next < count) await task(next++);
  }));
}

async function checkBystander(client: RawNbdClient, round: number): Promise<void> {
  const data = new Uint8Array(4096).fill(round & 0xff);
  const offset = (round * 4096) % (4 * MiB);
  assert.equal(await client.command(P.NBD_CMD_WRITE, 0, offset, data.length, data), 0);
  assert.deepEqual(await client.read(offset, data.length), data);
}

Deno.test("nbd fuzz: malformed handshakes and commands never disturb other clients", async () => {
  const random = testSeed("nbd fuzz");
  const dir = await Deno.makeTempDir({ prefix: "blktap-nbd-fuzz-" });
  const socket = `${dir}/nbd.sock`;
  const table = new Map<string, NbdExport>([
    ["f", { name: "f", driver: new MemoryDriver(size_bytes), readOnly: false }],
    ["ro", { name: "ro", driver: new MemoryDriver(size_bytes), readOnly: true }],
  ]);
  const warnings: string[] = [];
  const server = await startNbdServer({
    unixPath: socket,
    lookup: (name) => table.get(name),
    list: () => [...table.values()],
    limits: { request_bytes_max: MiB, handshake_timeout_ms: 20_000 },
    log: (level, message) => {
      if (level === "warn") warnings.push(message);
    },
  });
  const bystander = await RawNbdClient.connect(socket);
  try {
    await bystander.go("f", { meta: true });
    const batch = 2000;
    for (let start = 0; start < handshake_cases; start += batch) {
      const cases = Array.from(
        { length: Math.min(batch, handshake_cases - start) },
        () => malformedHandshake(random),
      );
      await inParallel(cases.length, (i) => sendAndClose(socket, cases[i], true));
      await checkBystander(bystander, start / batch);
    }
    let commands = 0;
    for (let start = 0; start < command_connections; start += 50) {
      const streams = Array.from({ length: Math.min(50, command_connections - start) }, () => {
        const parts = [validHandshake(random)];
        for (let n = 0; n < commands_per_connection; n++) parts.push(malformedCommand(random));
        commands += commands_per_connection;
        return concat(parts);
      });
      await inParallel(streams.length, (i) => sendAndClose(socket, streams[i], false));
      await checkBystander(bystander, 1000 + start);
    }
    const stats = server.stats;
    console.log(
      `nbd fuzz: sent ${handshake_cases} malformed handshakes and ${commands} malformed commands; ` +
        `server processed ${stats.connections_total} connections, ${stats.requests_total} requests ` +
        `(${stats.request_errors_total} refused), ${stats.protocol_disconnects_total} protocol disconnects`,
    );
    assert.ok(stats.connections_total >= handshake_cases + command_connections);
    assert.ok(
      handshake_cases + stats.requests_total >= 50_000,
      "at least 50,000 cases reached the server",
    );
    assert.ok(stats.request_errors_total > 10_000 && stats.protocol_disconnects_total > 1000);
    // Every offender is gone; the bystander still works and a new client can connect.
    for (let i = 0; i < 100 && server.connectionCount > 1; i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(server.connectionCount, 1);
    await checkBystander(bystander, 9999);
    const late = await RawNbdClient.connect(socket);
    await late.go("ro", { structured: true });
    assert.equal((await late.read(0, 4096)).byteLength, 4096);
    late.close();
    assert.deepEqual(warnings, []);
  } finally {
    bystander.close();
    await server.close();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});
