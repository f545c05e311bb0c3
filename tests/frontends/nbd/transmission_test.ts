import assert from "node:assert/strict";
import { File } from "../../../ffi/file.ts";
import { SocketFd } from "../../../ffi/socket.ts";
import {
  BlockDriverBase,
  type CachedSpan,
  type CachedSpanSource,
  type DriverCapabilities,
  type Extent,
} from "../../../src/formats/driver.ts";
import * as P from "../../../src/frontends/nbd/protocol.ts";
import { startNbdServer } from "../../../src/frontends/nbd/server.ts";
import { LendingMemoryDriver, MemoryDriver } from "../../_helpers/memory_driver.ts";
import { errorOf, RawNbdClient } from "../../_helpers/nbd_client.ts";
import { withNbdServer } from "../../_helpers/nbd_harness.ts";
import { testSeed } from "../../_helpers/random.ts";
import { missingTools, runOk } from "../../_helpers/tools.ts";

const KiB = 1024;
const MiB = 1 << 20;

async function connected(socket: string, name: string, options = {}): Promise<RawNbdClient> {
  const client = await RawNbdClient.connect(socket);
  await client.go(name, options);
  return client;
}

function pattern(length: number, seed: number): Uint8Array {
  return new Uint8Array(length).map((_, i) => (i * 31 + seed) & 0xff);
}

Deno.test("nbd transmission: simple replies, errors for bad requests keep the connection usable", async () => {
  const driver = new MemoryDriver(4 * MiB);
  await withNbdServer([{ name: "d", driver }], async (h) => {
    const c = await connected(h.socket, "d");
    try {
      const data = pattern(100 * KiB, 1);
      assert.equal(await c.command(P.NBD_CMD_WRITE, 0, 12345, data.length, data), 0);
      assert.deepEqual(await c.read(12345, data.length), data);
      // proto.md: a write past the end is ENOSPC; its payload is still consumed.
      assert.equal(
        await c.command(P.NBD_CMD_WRITE, 0, 4 * MiB - 10, 20, new Uint8Array(20)),
        P.NBD_ENOSPC,
      );
      assert.equal(await c.command(P.NBD_CMD_READ, 0, 4 * MiB - 10, 20), P.NBD_EINVAL);
      assert.equal(await c.command(P.NBD_CMD_TRIM, 0, 4 * MiB, 1), P.NBD_EINVAL);
      assert.equal(await c.command(42, 0, 0, 0), P.NBD_EINVAL);
      assert.equal(await c.command(P.NBD_CMD_FLUSH, 0x40, 0, 0), P.NBD_EINVAL);
      assert.equal(await c.command(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 0, 10), P.NBD_EINVAL);
      assert.equal(await c.command(P.NBD_CMD_BLOCK_STATUS, 0, 0, 10), P.NBD_EINVAL);
      const big = 32 * MiB + 1;
      assert.equal(await c.command(P.NBD_CMD_READ, 0, 0, big), P.NBD_EINVAL);
      assert.equal(await c.command(P.NBD_CMD_READ, 0, 0, 0), 0);
      // CACHE is never advertised (no driver has a cache a hint could warm): refused.
      assert.equal(c.flags & P.NBD_FLAG_SEND_CACHE, 0);
      assert.equal(await c.command(P.NBD_CMD_CACHE, 0, 0, 4096), P.NBD_EINVAL);
      const flushes = driver.flushCount;
      assert.equal(await c.command(P.NBD_CMD_FLUSH, 0, 0, 0), 0);
      assert.equal(await c.command(P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FUA, 0, 4, pattern(4, 9)), 0);
      assert.equal(driver.flushCount, flushes + 2);
      assert.deepEqual(await c.read(12345, data.length), data);
    } finally {
      c.close();
    }
  });
});

Deno.test("nbd transmission: structured reads send holes, DF one chunk, errors as error chunks", async () => {
  const driver = new MemoryDriver(4 * MiB, { failAtBytes: 3 * MiB });
  await withNbdServer([{ name: "d", driver }], async (h) => {
    const c = await connected(h.socket, "d", { structured: true });
    try {
      assert.ok(c.flags & P.NBD_FLAG_SEND_DF);
      const data = pattern(64 * KiB, 3);
      await c.command(P.NBD_CMD_WRITE, 0, 128 * KiB, data.length, data);
      await c.request(P.NBD_CMD_READ, 0, 9n, 0, MiB);
      const chunks = await c.readChunks();
      assert.deepEqual(chunks.map((x) => x.type), [
        P.NBD_REPLY_TYPE_OFFSET_HOLE,
        P.NBD_REPLY_TYPE_OFFSET_DATA,
        P.NBD_REPLY_TYPE_OFFSET_HOLE,
      ]);
      assert.ok(chunks.every((x) => x.handle === 9n));
      assert.equal(chunks.at(-1)!.flags & P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_FLAG_DONE);
      const whole = await c.read(0, MiB);
      assert.deepEqual(whole.subarray(128 * KiB, 192 * KiB), data);
      assert.equal(whole.subarray(0, 128 * KiB).some((b) => b !== 0), false);

      await c.request(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 10n, 0, MiB);
      const df = await c.readChunks();
      assert.deepEqual(df.map((x) => x.type), [P.NBD_REPLY_TYPE_OFFSET_DATA]);
      assert.equal(df[0].data.byteLength, 8 + MiB);

      await c.request(P.NBD_CMD_READ, 0, 11n, 3 * MiB - 4096, 8192);
      const failed = await c.readChunks();
      assert.equal(errorOf(failed), P.NBD_EIO);
      assert.equal(failed[0].type, P.NBD_REPLY_TYPE_ERROR);
      assert.deepEqual(await c.read(128 * KiB, 16), data.subarray(0, 16));
    } finally {
      c.close();
    }
  });
});

Deno.test("nbd transmission: block status, REQ_ONE, trim and write-zeroes flags", async () => {
  const driver = new MemoryDriver(4 * MiB);
  await withNbdServer([{ name: "d", driver }], async (h) => {
    const c = await connected(h.socket, "d", { meta: true });
    try {
      await c.command(P.NBD_CMD_WRITE, 0, MiB, 128 * KiB, pattern(128 * KiB, 5));
      const status = async (offset: number, length: number, flags = 0) => {
        await c.request(P.NBD_CMD_BLOCK_STATUS, flags, 3n, offset, length);
        const [chunk] = await c.readChunks();
        assert.equal(chunk.type, P.NBD_REPLY_TYPE_BLOCK_STATUS);
        const v = new DataView(chunk.data.buffer);
        assert.equal(v.getUint32(0), P.BASE_ALLOCATION_ID);
        const out: [number, number][] = [];
        for (let at = 4; at < chunk.data.byteLength; at += 8) {
          out.push([v.getUint32(at), v.getUint32(at + 4)]);
        }
        return out;
      };
      const hz = P.NBD_STATE_HOLE | P.NBD_STATE_ZERO;
      assert.deepEqual(await status(0, 4 * MiB), [[MiB, hz], [128 * KiB, 0], [
        3 * MiB - 128 * KiB,
        hz,
      ]]);
      assert.deepEqual(await status(0, 4 * MiB, P.NBD_CMD_FLAG_REQ_ONE), [[MiB, hz]]);
      assert.deepEqual(await status(MiB + 4096, 4096), [[4096, 0]]);
      assert.equal(await c.command(P.NBD_CMD_BLOCK_STATUS, 0, 4 * MiB - 1, 2), P.NBD_EINVAL);

      // WRITE_ZEROES may punch a hole unless NO_HOLE; FAST_ZERO refuses a slow zero.
      assert.equal(await c.command(P.NBD_CMD_WRITE_ZEROES, 0, MiB, 64 * KiB), 0);
      assert.deepEqual((await status(MiB, 128 * KiB))[0], [64 * KiB, hz]);
      const fastNoHole = P.NBD_CMD_FLAG_FAST_ZERO | P.NBD_CMD_FLAG_NO_HOLE;
      assert.equal(
        await c.command(P.NBD_CMD_WRITE_ZEROES, fastNoHole, MiB + 64 * KiB, 4096),
        P.NBD_ENOTSUP,
      );
      assert.equal(
        await c.command(P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_NO_HOLE, MiB + 64 * KiB, 4096),
        0,
      );
      assert.equal(
        await c.command(P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_DF, 0, 4096),
        P.NBD_EINVAL,
      );
      assert.deepEqual((await c.read(MiB + 60 * KiB, 12 * KiB)).some((b) => b !== 0), true);
      assert.equal((await c.read(MiB + 64 * KiB, 4 * KiB)).some((b) => b !== 0), false);
      assert.equal(await c.command(P.NBD_CMD_TRIM, P.NBD_CMD_FLAG_FUA, MiB, 128 * KiB), 0);
      assert.deepEqual(await status(0, 4 * MiB), [[4 * MiB, hz]]);
    } finally {
      c.close();
    }
  });
});

Deno.test("nbd transmission: read-only export refuses writes with EPERM, reads work", async () => {
  const driver = new MemoryDriver(MiB);
  await driver.write(0, pattern(4096, 7));
  await withNbdServer([{ name: "ro", driver, readOnly: true }], async (h) => {
    const c = await connected(h.socket, "ro", { structured: true });
    try {
      assert.equal(await c.command(P.NBD_CMD_WRITE, 0, 0, 4096, new Uint8Array(4096)), P.NBD_EPERM);
      assert.equal(await c.command(P.NBD_CMD_TRIM, 0, 0, 4096), P.NBD_EPERM);
      assert.equal(await c.command(P.NBD_CMD_WRITE_ZEROES, 0, 0, 4096), P.NBD_EPERM);
      assert.deepEqual(await c.read(0, 4096), pattern(4096, 7));
      assert.equal(await c.command(P.NBD_CMD_FLUSH, 0, 0, 0), 0);
    } finally {
      c.close();
    }
  });
});

Deno.test("nbd transmission: pipelined requests run concurrently and complete out of order", async () => {
  const driver = new MemoryDriver(8 * MiB, { delayMs: 20 });
  await withNbdServer([{ name: "d", driver }], async (h) => {
    const c = await connected(h.socket, "d", { structured: true });
    try {
      const count = 64;
      for (let i = 0; i < count; i++) {
        const data = pattern(4096 * (1 + (i % 5)), i);
        await c.request(P.NBD_CMD_WRITE, 0, BigInt(i), i * 64 * KiB, data.length, data);
      }
      const seen = new Set<bigint>();
      for (let i = 0; i < count; i++) {
        const reply = await c.readReply();
        assert.equal(reply.error, 0);
        seen.add(reply.handle);
      }
      assert.equal(seen.size, count);
      // Requests ran concurrently, never more than inflight_requests_max of them.
      assert.equal(driver.inflightMax, 8);
      for (let i = 0; i < count; i += 7) {
        assert.deepEqual(
          await c.read(i * 64 * KiB, 4096 * (1 + (i % 5))),
          pattern(4096 * (1 + (i % 5)), i),
        );
      }
    } finally {
      c.close();
    }
  }, { inflight_requests_max: 8 });
});

Deno.test("nbd transmission: payloads go through the driver's lent buffers, with fallback when exhausted", async () => {
  const driver = new LendingMemoryDriver(8 * MiB, 256 * KiB, { delayMs: 5 });
  await withNbdServer([{ name: "d", driver }], async (h) => {
    const c = await connected(h.socket, "d", { structured: true });
    try {
      for (let i = 0; i < 16; i++) {
        const data = pattern(128 * KiB, i);
        await c.request(P.NBD_CMD_WRITE, 0, BigInt(i), i * 128 * KiB, data.length, data);
      }
      for (let i = 0; i < 16; i++) assert.equal((await c.readReply()).error, 0);
      for (let i = 0; i < 16; i++) {
        assert.deepEqual(
          await c.read(i * 128 * KiB, 128 * KiB, P.NBD_CMD_FLAG_DF),
          pattern(128 * KiB, i),
        );
      }
      assert.ok(driver.borrowed > 0, "buffers were borrowed");
      assert.ok(driver.refused > 0, "the budget ran out and the pool took over");
      assert.equal(await c.command(P.NBD_CMD_FLUSH, 0, 0, 0), 0);
      assert.equal(driver.outstanding, 0, "every borrowed buffer was returned");
      assert.equal(driver.borrowed, driver.returned);
    } finally {
      c.close();
    }
  });
});

Deno.test("nbd transmission: seeded random I/O over three connections matches a model", async () => {
  const random = testSeed("nbd random I/O");
  const size = 2 * MiB;
  const driver = new MemoryDriver(size);
  const model = new Uint8Array(size);
  await withNbdServer([{ name: "d", driver }], async (h) => {
    const clients = await Promise.all([
      connected(h.socket, "d"),
      connected(h.socket, "d", { structured: true }),
      connected(h.socket, "d", { meta: true }),
    ]);
    try {
      for (let step = 0; step < 300; step++) {
        const c = random.pick(clients);
        const offset = random.int(0, size - 1);
        const length = random.int(1, Math.min(size - offset, 200 * KiB));
        const op = random.int(0, 9);
        if (op < 4) {
          const data = random.bytes(length);
          assert.equal(await c.command(P.NBD_CMD_WRITE, random.int(0, 1), offset, length, data), 0);
          model.set(data, offset);
        } else if (op < 5) {
          const flags = random.pick([0, P.NBD_CMD_FLAG_NO_HOLE]);
          assert.equal(await c.command(P.NBD_CMD_WRITE_ZEROES, flags, offset, length), 0);
          model.fill(0, offset, offset + length);
        } else {
          const flags = c.structured ? random.pick([0, P.NBD_CMD_FLAG_DF]) : 0;
          const got = await c.read(offset, length, flags);
          assert.deepEqual(
            got,
            model.subarray(offset, offset + length),
            `step ${step} seed ${random.seed}`,
          );
        }
      }
    } finally {
      clients.forEach((c) => c.close());
    }
  });
});

Deno.test("nbd server: close waits for requests in flight; disconnectExport ends one export's clients", async () => {
  const slow = new MemoryDriver(MiB, { delayMs: 100 });
  const other = new MemoryDriver(MiB);
  await withNbdServer(
    [{ name: "slow", driver: slow }, { name: "other", driver: other }],
    async (h) => {
      const a = await connected(h.socket, "slow");
      const b = await connected(h.socket, "other");
      try {
        await a.request(P.NBD_CMD_WRITE, 0, 1n, 0, 4, pattern(4, 1));
        await new Promise((resolve) => setTimeout(resolve, 20));
        await h.server.disconnectExport("slow");
        // The write in flight was answered before the connection closed.
        assert.equal((await a.readReply()).error, 0);
        const stored = new Uint8Array(4);
        await slow.read(0, stored);
        assert.deepEqual(stored, pattern(4, 1), "the answered write reached the disk");
        assert.equal(await b.command(P.NBD_CMD_FLUSH, 0, 0, 0), 0);
        assert.equal(h.server.connectionCount, 1);
      } finally {
        a.close();
        b.close();
      }
    },
  );
});

Deno.test("nbd server: during close, requests in flight finish and new ones get ESHUTDOWN", async () => {
  const slow = new MemoryDriver(MiB, { delayMs: 150 });
  await withNbdServer([{ name: "slow", driver: slow }], async (h) => {
    const c = await connected(h.socket, "slow");
    try {
      await c.request(P.NBD_CMD_WRITE, 0, 1n, 0, 4, pattern(4, 1));
      await new Promise((resolve) => setTimeout(resolve, 20));
      const closing = h.server.close();
      await c.request(P.NBD_CMD_FLUSH, 0, 2n, 0, 0);
      const replies = [await c.readReply(), await c.readReply()];
      const byHandle = new Map(replies.map((r) => [r.handle, r.error]));
      assert.equal(byHandle.get(1n), 0);
      assert.equal(byHandle.get(2n), P.NBD_ESHUTDOWN);
      await closing;
      assert.equal(await c.conn.read(new Uint8Array(1)).catch(() => null), null);
    } finally {
      c.close();
    }
  });
});

Deno.test("nbd transmission: pipelined sparse and dense reads never share a buffer still being sent", async () => {
  const driver = new MemoryDriver(16 * MiB);
  await driver.write(256 * KiB, pattern(512 * KiB, 11));
  await driver.write(8 * MiB, pattern(MiB, 12));
  await withNbdServer([{ name: "d", driver }], async (h) => {
    const c = await connected(h.socket, "d", { structured: true });
    try {
      for (let round = 0; round < 5; round++) {
        await c.request(P.NBD_CMD_READ, 0, 1n, 0, MiB); // holes around 512 KiB of data
        // Not reading yet: the socket fills and the data chunk waits in the writer,
        // while the next reads take buffers from the pool.
        await new Promise((resolve) => setTimeout(resolve, 10));
        await c.request(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 2n, 8 * MiB, MiB);
        await c.request(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 3n, 8 * MiB, MiB);
        await new Promise((resolve) => setTimeout(resolve, 10));
        const got = new Map<bigint, Uint8Array>();
        for (let done = 0; done < 3;) {
          const chunk = await c.readReply();
          // Bytes no chunk covers keep this filler and fail the comparison.
          const out = got.get(chunk.handle) ?? new Uint8Array(MiB).fill(0xee);
          got.set(chunk.handle, out);
          const view = new DataView(chunk.data.buffer, chunk.data.byteOffset);
          const at = Number(view.getBigUint64(0)) - (chunk.handle === 1n ? 0 : 8 * MiB);
          if (chunk.type === P.NBD_REPLY_TYPE_OFFSET_DATA) out.set(chunk.data.subarray(8), at);
          else if (chunk.type === P.NBD_REPLY_TYPE_OFFSET_HOLE) {
            out.fill(0, at, at + view.getUint32(8));
          } else assert.fail(`unexpected chunk type ${chunk.type}`);
          if (chunk.flags & P.NBD_REPLY_FLAG_DONE) done++;
        }
        const sparse = new Uint8Array(MiB);
        sparse.set(pattern(512 * KiB, 11), 256 * KiB);
        assert.deepEqual(got.get(1n), sparse);
        assert.deepEqual(got.get(2n), pattern(MiB, 12));
        assert.deepEqual(got.get(3n), pattern(MiB, 12));
      }
    } finally {
      c.close();
    }
  });
});

// A driver that knows where it reads as zeros (as the ring client does):
// every 64 KiB chunk never written. Counts the reads that reach it.
class ZeroKnowingDriver extends MemoryDriver {
  reads = 0;
  zeroAnswers = 0;

  readAsZeros(offsetBytes: number, lengthBytes: number): boolean {
    const first = Math.floor(offsetBytes / (64 * KiB));
    const last = Math.floor((offsetBytes + lengthBytes - 1) / (64 * KiB));
    for (let i = first; i <= last; i++) if (this.chunks.has(i)) return false;
    this.zeroAnswers++;
    return true;
  }

  protected override _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    this.reads++;
    return super._read(offsetBytes, buffer);
  }
}

Deno.test("nbd transmission: reads of known zeros are one hole chunk, zeros with DF or simple replies", async () => {
  const driver = new ZeroKnowingDriver(4 * MiB);
  await withNbdServer([{ name: "d", driver }], async (h) => {
    const s = await connected(h.socket, "d", { structured: true });
    const simple = await connected(h.socket, "d");
    try {
      const data = pattern(4 * KiB, 5);
      assert.equal(await s.command(P.NBD_CMD_WRITE, 0, MiB, data.length, data), 0);
      const reads = driver.reads;
      // proto.md: one OFFSET_HOLE chunk, DONE, covering the whole read; no data.
      for (const [handle, offset, length] of [[21n, 3 * MiB, 4 * KiB], [22n, 2 * MiB, MiB]]) {
        await s.request(P.NBD_CMD_READ, 0, handle as bigint, offset as number, length as number);
        const chunks = await s.readChunks();
        assert.deepEqual(chunks.map((c) => [c.type, c.flags, c.handle]), [
          [P.NBD_REPLY_TYPE_OFFSET_HOLE, P.NBD_REPLY_FLAG_DONE, handle],
        ]);
        const view = new DataView(chunks[0].data.buffer, chunks[0].data.byteOffset);
        assert.equal(chunks[0].data.byteLength, 12);
        assert.equal(Number(view.getBigUint64(0)), offset);
        assert.equal(view.getUint32(8), length);
      }
      // DF: one data chunk of zeros; a simple reply carries the zeros too.
      await s.request(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 23n, 3 * MiB + 512, 8 * KiB);
      const df = await s.readChunks();
      assert.deepEqual(df.map((c) => [c.type, c.handle]), [[P.NBD_REPLY_TYPE_OFFSET_DATA, 23n]]);
      assert.deepEqual(df[0].data.subarray(8), new Uint8Array(8 * KiB));
      assert.equal(Number(new DataView(df[0].data.buffer).getBigUint64(0)), 3 * MiB + 512);
      // Pipelined behind a non-zero read, so staging bytes of other replies are about.
      await simple.request(P.NBD_CMD_READ, 0, 24n, MiB, 4 * KiB);
      await simple.request(P.NBD_CMD_READ, 0, 25n, 3 * MiB, 4 * KiB);
      const replies = [await simple.readReply(4 * KiB), await simple.readReply(4 * KiB)];
      const byHandle = new Map(replies.map((r) => [r.handle, r.data]));
      assert.deepEqual(byHandle.get(24n), data);
      assert.deepEqual(byHandle.get(25n), new Uint8Array(4 * KiB));
      assert.equal(driver.reads, reads + 1, "only the read of written data reached the driver");
      // A bad read is refused as before, known zeros or not.
      assert.equal(await s.command(P.NBD_CMD_READ, 0, 4 * MiB - 4 * KiB, 8 * KiB), P.NBD_EINVAL);
      assert.equal(await simple.command(P.NBD_CMD_READ, 0x40, 3 * MiB, 4 * KiB), P.NBD_EINVAL);
      // Once written, the range is read from the driver.
      assert.equal(await s.command(P.NBD_CMD_WRITE, 0, 3 * MiB, data.length, data), 0);
      assert.deepEqual(await s.read(3 * MiB, 4 * KiB), data);
      assert.deepEqual(await simple.read(3 * MiB, 4 * KiB), data);
      assert.ok(driver.zeroAnswers >= 4);
    } finally {
      s.close();
      simple.close();
    }
  });
});

/**
 * A driver over a file in the page cache that offers its large reads to
 * be sent from the file, as ctrl's ring disk of a raw image does; of its
 * leases some are refused when sent, and some ranges are not offered.
 */
class FileSpanDriver extends BlockDriverBase implements CachedSpanSource {
  readonly format = "file-span";
  readonly capabilities: DriverCapabilities = {
    canWrite: true,
    canFlush: true,
    canDiscard: false,
    canZero: false,
    canExtents: false,
    canMultiConn: true,
  };
  leases = 0;
  sent = 0;
  refused = 0;

  constructor(readonly file: File, readonly sizeBytes: number) {
    super();
  }

  get path(): string {
    return this.file.path;
  }

  leaseCached(offsetBytes: number, lengthBytes: number): CachedSpan | undefined {
    this.leases++;
    if (this.leases % 5 === 0) return undefined;
    const refuse = this.leases % 4 === 0;
    return {
      lengthBytes,
      send: async (socket, head, waitMs) => {
        if (refuse) {
          this.refused++;
          return false;
        }
        await socket.sendFile(head, this.file, offsetBytes, lengthBytes, waitMs);
        this.sent++;
        return true;
      },
      drop: () => {},
    };
  }

  protected _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    this.file.pread(buffer, offsetBytes);
    return Promise.resolve();
  }

  protected _write(offsetBytes: number, data: Uint8Array): Promise<void> {
    this.file.pwriteAll(data, offsetBytes);
    return Promise.resolve();
  }

  protected _flush(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    this.file.close();
    return Promise.resolve();
  }
}

const fileSpanDriver = (file: File, sizeBytes: number) => new FileSpanDriver(file, sizeBytes);

// `bytes` as the file `disk` of a new directory, served by the driver `open`
// makes of it; the driver is closed and the directory removed after `body`.
async function withSpanFile<D extends FileSpanDriver>(
  bytes: Uint8Array,
  open: (file: File, sizeBytes: number) => D,
  body: (driver: D, dir: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-span-" });
  try {
    await Deno.writeFile(`${dir}/disk`, bytes);
    const driver = open(File.open(`${dir}/disk`, { write: true }), bytes.byteLength);
    try {
      await body(driver, dir);
    } finally {
      await driver.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("nbd transmission: reads sent from the page cache with sendfile arrive whole, among pipelined replies", async () => {
  const random = testSeed("nbd sendfile reads");
  const size = 8 * MiB;
  const model = random.bytes(size);
  await withSpanFile(model, fileSpanDriver, async (driver) => {
    await withNbdServer([{ name: "d", driver }], async (h) => {
      const structured = await connected(h.socket, "d", { structured: true });
      const simple = await connected(h.socket, "d");
      try {
        for (let step = 0; step < 60; step++) {
          const data = random.bytes(random.int(1, 300 * KiB));
          const at = random.int(0, size - data.length);
          assert.equal(
            await random.pick([structured, simple]).command(
              P.NBD_CMD_WRITE,
              0,
              at,
              data.length,
              data,
            ),
            0,
          );
          model.set(data, at);
          // A burst of small and large reads: their replies leave in completion order.
          const reads = new Map<bigint, { offset: number; out: Uint8Array }>();
          for (let i = 0; i < random.int(1, 8); i++) {
            const length = random.pick([random.int(1, 64 * KiB), random.int(64 * KiB, 2 * MiB)]);
            const offset = random.int(0, size - length);
            reads.set(BigInt(i + 1), { offset, out: new Uint8Array(length).fill(0xee) });
            await structured.request(P.NBD_CMD_READ, 0, BigInt(i + 1), offset, length);
          }
          for (let done = 0; done < reads.size;) {
            const chunk = await structured.readReply();
            const read = reads.get(chunk.handle)!;
            assert.equal(
              chunk.type,
              P.NBD_REPLY_TYPE_OFFSET_DATA,
              `step ${step} seed ${random.seed}`,
            );
            const view = new DataView(chunk.data.buffer, chunk.data.byteOffset);
            read.out.set(chunk.data.subarray(8), Number(view.getBigUint64(0)) - read.offset);
            if (chunk.flags & P.NBD_REPLY_FLAG_DONE) done++;
          }
          for (const { offset, out } of reads.values()) {
            assert.deepEqual(
              out,
              model.subarray(offset, offset + out.length),
              `step ${step} seed ${random.seed}`,
            );
          }
          const length = random.int(64 * KiB, MiB);
          const offset = random.int(0, size - length);
          assert.deepEqual(
            await simple.read(offset, length),
            model.subarray(offset, offset + length),
          );
        }
        assert.ok(driver.sent > 0 && driver.refused > 0, "sent and refused leases were both met");
      } finally {
        structured.close();
        simple.close();
      }
    });
  });
});

// A file whose second half of every MiB is a hole, as its extents say.
class SparseFileSpanDriver extends FileSpanDriver {
  override readonly capabilities: DriverCapabilities = {
    canWrite: true,
    canFlush: true,
    canDiscard: false,
    canZero: false,
    canExtents: true,
    canMultiConn: true,
  };
  statusAsks = 0;

  protected override _blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.statusAsks++;
    const extents: Extent[] = [];
    const end = offsetBytes + lengthBytes;
    for (let at = offsetBytes; at < end;) {
      const half = Math.floor(at / (MiB / 2));
      const next = Math.min(end, (half + 1) * (MiB / 2));
      const zero = half % 2 === 1;
      extents.push({ offsetBytes: at, lengthBytes: next - at, hole: zero, zero });
      at = next;
    }
    return Promise.resolve(extents);
  }
}

Deno.test("nbd transmission: a sparse read that could go by sendfile asks the allocation map once and sends its holes as holes", async () => {
  const size = 8 * MiB;
  const model = pattern(size, 7);
  for (let at = MiB / 2; at < size; at += MiB) model.fill(0, at, at + MiB / 2);
  const sparse = (file: File, sizeBytes: number) => new SparseFileSpanDriver(file, sizeBytes);
  await withSpanFile(model, sparse, async (driver) => {
    await withNbdServer([{ name: "d", driver }], async (h) => {
      const c = await connected(h.socket, "d", { structured: true });
      try {
        for (let i = 0; i < 4; i++) {
          const asks = driver.statusAsks;
          await c.request(P.NBD_CMD_READ, 0, BigInt(i), i * 2 * MiB, 2 * MiB);
          const chunks = await c.readChunks();
          assert.equal(driver.statusAsks - asks, 1, "one allocation map per read");
          const holes = chunks.filter((k) => k.type === P.NBD_REPLY_TYPE_OFFSET_HOLE);
          assert.equal(holes.length, 2, "each hole half sent as a hole chunk");
          const got = new Uint8Array(2 * MiB);
          for (const k of chunks) {
            if (k.type !== P.NBD_REPLY_TYPE_OFFSET_DATA) continue;
            const at = Number(new DataView(k.data.buffer, k.data.byteOffset).getBigUint64(0));
            got.set(k.data.subarray(8), at - i * 2 * MiB);
          }
          assert.deepEqual(got, model.subarray(i * 2 * MiB, (i + 1) * 2 * MiB));
        }
        assert.ok(driver.leases > 0, "the reads were offered a cached span");
      } finally {
        c.close();
      }
    });
  });
});

Deno.test("nbd transmission: a client gone during sendfile replies ends only its connection, leaking no descriptor", async () => {
  const size = 16 * MiB;
  const model = pattern(size, 5);
  // Test modules run in parallel in this process: count only the descriptors the server took.
  const taken: { fd: number; link: string }[] = [];
  const adopt = SocketFd.adopt;
  SocketFd.adopt = (fd: number, inode: bigint) => {
    const socket = adopt.call(SocketFd, fd, inode);
    taken.push({ fd: socket.fd, link: `socket:[${inode}]` });
    return socket;
  };
  const stillOpen = () =>
    taken.filter(({ fd, link }) => {
      try {
        return Deno.readLinkSync(`/proc/self/fd/${fd}`) === link;
      } catch {
        return false;
      }
    });
  try {
    await withSpanFile(
      model,
      fileSpanDriver,
      (driver) =>
        withNbdServer([{ name: "d", driver }], async (h) => {
          for (let round = 0; round < 3; round++) {
            const gone = await connected(h.socket, "d", { structured: true });
            // More than the socket buffers hold: sends wait for room when the client leaves.
            for (let i = 0; i < 8; i++) {
              await gone.request(P.NBD_CMD_READ, 0, BigInt(i), i * 2 * MiB, 2 * MiB);
            }
            await new Promise((resolve) => setTimeout(resolve, 20));
            gone.close();
          }
          const c = await connected(h.socket, "d", { structured: true });
          try {
            assert.deepEqual(await c.read(3 * MiB, 2 * MiB), model.subarray(3 * MiB, 5 * MiB));
            for (let i = 0; i < 100 && h.server.connectionCount > 1; i++) {
              await new Promise((resolve) => setTimeout(resolve, 20));
            }
            assert.equal(h.server.connectionCount, 1, "the connections whose client left ended");
            assert.ok(driver.sent > 0);
          } finally {
            c.close();
          }
          for (let i = 0; i < 100 && h.server.connectionCount > 0; i++) {
            await new Promise((resolve) => setTimeout(resolve, 20));
          }
          assert.equal(taken.length, 4, "the server took a descriptor for each connection");
          // A send still on its thread closes the descriptor when it returns.
          for (let i = 0; i < 100 && stillOpen().length > 0; i++) {
            await new Promise((resolve) => setTimeout(resolve, 20));
          }
          assert.deepEqual(stillOpen(), [], "every socket descriptor the server took is closed");
        }),
    );
  } finally {
    SocketFd.adopt = adopt;
  }
});

Deno.test("nbd server: disconnectExport ends a client that stopped reading sendfile replies after the close grace, not the stall timeout", async () => {
  await withSpanFile(pattern(16 * MiB, 6), fileSpanDriver, async (driver) => {
    await withNbdServer([{ name: "d", driver }], async (h) => {
      const stuck = await connected(h.socket, "d", { structured: true });
      try {
        // More than the socket buffers hold: a send waits for room the client never makes.
        for (let i = 0; i < 8; i++) {
          await stuck.request(P.NBD_CMD_READ, 0, BigInt(i), i * 2 * MiB, 2 * MiB);
        }
        for (let i = 0; i < 100 && driver.sent === 0; i++) {
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
        assert.ok(driver.sent > 0, "a sendfile reply is under way");
        const started = performance.now();
        await h.server.disconnectExport("d");
        const tookMs = performance.now() - started;
        // The close grace (300 ms), not the 60 s a send may wait for room.
        assert.ok(tookMs < 5_000, `disconnectExport took ${Math.round(tookMs)} ms`);
        assert.equal(h.server.connectionCount, 0);
        // The client sees its connection end (what was sent, then end of file).
        const sink = new Uint8Array(MiB);
        const deadline = setTimeout(() => stuck.close(), 5_000);
        let ended = false;
        try {
          while (await stuck.conn.read(sink) !== null);
          ended = true;
        } catch {
          // closed by the deadline
        } finally {
          clearTimeout(deadline);
        }
        assert.ok(ended, "the client's connection still open 5 s after disconnectExport");
      } finally {
        stuck.close();
      }
    }, { reply_stall_timeout_ms: 60_000, close_grace_ms: 300 });
  });
});

Deno.test({
  name: "nbd transmission: over TCP too, nbdcopy gets the file's bytes from sendfile replies",
  ignore: missingTools("nbdcopy", "qemu-img").length > 0,
  fn: async () => {
    const bytes = testSeed("nbd sendfile tcp").bytes(12 * MiB);
    await withSpanFile(bytes, fileSpanDriver, async (driver, dir) => {
      const nbdExport = { name: "d", driver, readOnly: false };
      const server = await startNbdServer({
        tcp: { port: 0 },
        lookup: (name) => name === "d" ? nbdExport : undefined,
        list: () => [nbdExport],
      });
      try {
        const uri = `nbd://127.0.0.1:${server.tcp!.port}/d`;
        await runOk("nbdcopy", ["--requests=8", "--request-size=1048576", uri, `${dir}/copy`]);
        await runOk("qemu-img", [
          "compare",
          "-f",
          "raw",
          "-F",
          "raw",
          `${dir}/disk`,
          `${dir}/copy`,
        ]);
        assert.ok(driver.sent > 0, "replies were sent from the file");
      } finally {
        await server.close();
      }
    });
  },
});
