/**
 * NBD payload memory is one server-wide budget: hostile clients (many
 * connections pipelining maximum-size WRITEs and never reading a reply,
 * or READs whose replies they never take) wait or are cut; they cannot
 * exhaust the host, and a well-behaved client keeps being served.
 */
import assert from "node:assert/strict";
import * as P from "../../../src/frontends/nbd/protocol.ts";
import { payloadFootprintBytes, PayloadPool } from "../../../src/frontends/nbd/payload_pool.ts";
import {
  type NbdServerStats,
  type PayloadMemory,
  startNbdServer,
} from "../../../src/frontends/nbd/server.ts";
import { MemoryDriver } from "../../_helpers/memory_driver.ts";
import { RawNbdClient } from "../../_helpers/nbd_client.ts";
import { withNbdServer } from "../../_helpers/nbd_harness.ts";

const KiB = 1024;
const MiB = 1 << 20;

const SERVER = new URL("./_budget_server.ts", import.meta.url).pathname;

function rssBytes(pid: number): number {
  const line = Deno.readTextFileSync(`/proc/${pid}/status`).split("\n")
    .find((l) => l.startsWith("VmRSS:"))!;
  return Number(line.split(/\s+/)[1]) * KiB;
}

function header(type: number, offset: number, length: number): Uint8Array {
  const bytes = new Uint8Array(28);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, P.NBD_REQUEST_MAGIC);
  view.setUint16(6, type);
  view.setBigUint64(8, 99n);
  view.setBigUint64(16, BigInt(offset));
  view.setUint32(24, length);
  return bytes;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.byteLength;) done += await conn.write(bytes.subarray(done));
}

/** A client that pipelines `count` WRITEs of `payload` and never reads a reply. */
async function floodWrites(client: RawNbdClient, payload: Uint8Array, count: number) {
  for (let i = 0; i < count; i++) {
    await writeAll(
      client.conn,
      header(P.NBD_CMD_WRITE, (i % 4) * payload.byteLength, payload.length),
    );
    await writeAll(client.conn, payload);
  }
}

Deno.test("nbd payload pool: takes wait for the connection's share, then first come first served for the budget", async () => {
  const fp = payloadFootprintBytes(MiB);
  const pool = new PayloadPool(4 * fp, 2 * fp);
  const a = pool.account();
  const b = pool.account();
  const c = pool.account();
  const order: string[] = [];
  const a1 = await a.take(MiB);
  const a2 = await a.take(MiB);
  const a3 = a.take(MiB).then((p) => (order.push("a3"), p)); // over a's share
  const b1 = await b.take(MiB);
  const b2 = await b.take(MiB);
  const c1 = c.take(MiB).then((p) => (order.push("c1"), p)); // over the budget
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(order, []);
  assert.equal(pool.memory.heldBytes, 4 * fp);
  b.give(b1); // c queued first for the budget: c gets it, a still waits for its share
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(order, ["c1"]);
  a.give(a1); // a is under its share again, and the budget has room
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(order, ["c1", "a3"]);
  for (const [account, payload] of [[a, a2], [a, await a3], [b, b2], [c, await c1]] as const) {
    account.give(payload);
  }
  assert.equal(pool.memory.heldBytes, 0);
  assert.equal(pool.memory.heldBytesPeak, 4 * fp);
  assert.ok(pool.memory.heldBytes + pool.memory.pooledBytes <= pool.bytesMax);
  assert.equal(pool.memory.waitsTotal, 1, "c waited for the budget (a for its own share)");
  assert.throws(() => pool.checkFits(8 * MiB, "budget"), /cannot hold one 8388608-byte payload/);
});

/** The budget server of `_budget_server.ts`, in its own process (its RSS is its own). */
class BudgetServer {
  readonly socket: string;
  readonly #child: Deno.ChildProcess;
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly #lines: ReadableStreamDefaultReader<string>;
  #buffer = "";

  constructor(dir: string, delayMs: number, limits: Record<string, number>) {
    this.socket = `${dir}/nbd.sock`;
    this.#child = new Deno.Command(Deno.execPath(), {
      args: ["run", "--quiet", "-A", SERVER, this.socket, String(delayMs), JSON.stringify(limits)],
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    this.#writer = this.#child.stdin.getWriter();
    this.#lines = this.#child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  }

  async line(): Promise<string> {
    while (!this.#buffer.includes("\n")) {
      const { value, done } = await this.#lines.read();
      if (done) throw new Error("the budget server exited");
      this.#buffer += value;
    }
    const end = this.#buffer.indexOf("\n");
    const line = this.#buffer.slice(0, end);
    this.#buffer = this.#buffer.slice(end + 1);
    return line;
  }

  /** The server's own accounting: payload memory and counters. */
  async accounting(): Promise<{ memory: PayloadMemory; stats: NbdServerStats }> {
    await this.#writer.write(new TextEncoder().encode("?\n"));
    return JSON.parse(await this.line());
  }

  rssBytes(): number {
    return rssBytes(this.#child.pid);
  }

  async close(): Promise<void> {
    await this.#writer.close().catch(() => {});
    const timer = setTimeout(() => this.#child.kill("SIGKILL"), 10_000);
    await this.#child.status;
    clearTimeout(timer);
    await this.#lines.cancel().catch(() => {});
  }
}

Deno.test("nbd payload budget: 8 connections flooding 4 MiB WRITEs without reading replies stay within it; another client is served", async () => {
  const request_bytes_max = 4 * MiB;
  const payload_bytes_max = 32 * MiB + 64 * KiB;
  const dir = await Deno.makeTempDir({ prefix: "blktap-budget-" });
  const server = new BudgetServer(dir, 40, {
    request_bytes_max,
    payload_bytes_max,
    connection_payload_bytes_max: 8 * MiB + 32 * KiB,
  });
  const hostile: RawNbdClient[] = [];
  let floods: Promise<void>[] = [];
  try {
    assert.equal(await server.line(), "ready");
    const rssBefore = server.rssBytes();
    let rssPeak = rssBefore;
    const sampler = setInterval(() => (rssPeak = Math.max(rssPeak, server.rssBytes())), 5);
    try {
      const payload = new Uint8Array(request_bytes_max).fill(0x77);
      for (let i = 0; i < 8; i++) {
        const client = await RawNbdClient.connect(server.socket);
        await client.go("d");
        hostile.push(client);
      }
      floods = hostile.map((c) => floodWrites(c, payload, 16).catch(() => {}));
      await new Promise((r) => setTimeout(r, 300)); // the floods fill the budget
      const good = await RawNbdClient.connect(server.socket);
      try {
        await good.go("d");
        const started = performance.now();
        for (let i = 0; i < 10; i++) {
          const data = new Uint8Array(64 * KiB).fill(i + 1);
          const offset = 32 * MiB + i * 64 * KiB;
          assert.equal(await good.command(P.NBD_CMD_WRITE, 0, offset, data.length, data), 0);
          assert.deepEqual(await good.read(offset, data.length), data);
        }
        const ms = (performance.now() - started).toFixed(0);
        console.log(`well-behaved client: 20 requests in ${ms} ms beside the floods`);
      } finally {
        good.close();
      }
    } finally {
      clearInterval(sampler);
    }
    const { memory } = await server.accounting();
    assert.ok(memory.waitsTotal > 0, "the floods had to wait for memory");
    assert.ok(memory.heldBytesPeak <= payload_bytes_max, `held peak ${memory.heldBytesPeak}`);
    assert.ok(memory.heldBytesPeak > payload_bytes_max / 2, "the floods did fill the budget");
    const growth = rssPeak - rssBefore;
    console.log(
      `payload held peak ${memory.heldBytesPeak} bytes; server RSS growth ${growth} bytes`,
    );
    // The budget, plus receive buffers and what the garbage collector has not reclaimed yet.
    assert.ok(growth < payload_bytes_max + 96 * MiB, `server RSS grew by ${growth} bytes`);
  } finally {
    for (const c of hostile) c.close();
    await Promise.all(floods);
    await server.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("nbd payload budget: a client that never reads its READ replies is cut after the stall timeout, its memory back", async () => {
  const driver = new MemoryDriver(16 * MiB);
  await withNbdServer([{ name: "d", driver }], async (h) => {
    const idle = await RawNbdClient.connect(h.socket);
    try {
      await idle.go("d");
      for (let i = 0; i < 4; i++) await writeAll(idle.conn, header(P.NBD_CMD_READ, 0, 4 * MiB));
      for (let i = 0; i < 200 && h.server.stats.stalled_disconnects_total === 0; i++) {
        await new Promise((r) => setTimeout(r, 20));
      }
      assert.equal(h.server.stats.stalled_disconnects_total, 1);
      for (let i = 0; i < 100 && h.server.payloadMemory.heldBytes > 0; i++) {
        await new Promise((r) => setTimeout(r, 10));
      }
      assert.equal(h.server.payloadMemory.heldBytes, 0, "the cut connection's buffers came back");
    } finally {
      idle.close();
    }
    const good = await RawNbdClient.connect(h.socket);
    try {
      await good.go("d");
      assert.equal((await good.read(0, 4 * MiB)).byteLength, 4 * MiB);
    } finally {
      good.close();
    }
  }, {
    reply_stall_timeout_ms: 300,
    request_bytes_max: 4 * MiB,
    payload_bytes_max: 16 * MiB + 64 * KiB,
  });
});

Deno.test("nbd payload budget: a budget smaller than one maximum request is refused at start", async () => {
  await assert.rejects(
    () =>
      startNbdServer({
        tcp: { port: 0 },
        lookup: () => undefined,
        list: () => [],
        limits: { request_bytes_max: 32 * MiB, payload_bytes_max: 16 * MiB },
      }),
    /payload_bytes_max: 16777216 bytes cannot hold one 33554432-byte payload/,
  );
});
