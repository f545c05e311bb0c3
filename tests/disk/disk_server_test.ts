import assert from "node:assert/strict";
import * as B from "../../src/ring/blkif.ts";
import { TestFrontend } from "../../src/frontends/exercise/test_frontend.ts";
import { testSeed } from "../_helpers/random.ts";
import { DiskModel } from "../_helpers/load_model.ts";
import { MemoryDriver } from "../_helpers/memory_driver.ts";
import { ringPair, servedRing } from "../_helpers/ring_pair.ts";
import { busy_requests_min, submit_chunk_requests } from "../../src/disk/disk_server.ts";

/** Front end and back end over one ArrayBuffer, kicks as function calls. */
function pair(sizeBytes: number, ringPages = 4, poolPages = 4096) {
  const driver = new MemoryDriver(sizeBytes, { randomDelay: true });
  const { disk, server, ring, pool } = servedRing(driver, { ringPages, poolPages });
  return { disk, server: server(), driver, ring, pool };
}

Deno.test("disk server: verified random load, direct and indirect, depths 1..64, then the whole disk", async () => {
  const rng = testSeed("disk server load");
  const size = 16 << 20;
  const { disk, driver } = pair(size);
  const model = new DiskModel(size);
  let total = 0;
  for (const [i, depth] of [1, 7, 64].entries()) {
    driver.delayMs = depth === 1 ? 0 : 1;
    const result = await new TestFrontend(disk, {
      requests: 3000,
      depth,
      indirectFraction: 0.1,
      discardFraction: 0.02,
      initialZero: i === 0,
      returnModel: true,
      seed: rng.int(0, 2 ** 31),
    }).run();
    assert.equal(result.errors, 0, result.firstError);
    assert.equal(result.mismatches, 0, result.firstError);
    assert.ok(result.verifiedSectors > 0);
    assert.ok(result.indirect > 0);
    assert.ok(result.discards > 0);
    model.apply(result.model!);
    total += result.requests;
  }
  assert.equal(total, 9000);
  assert.equal(disk.outstanding, 0);
  // Every sector, written or not, as the driver holds it (not as the front end reads it).
  model.assertMatches(driver.contents(), "memory driver after three runs");
});

Deno.test("disk server: RingDisk as a BlockDriver (unaligned, large, pool and heap buffers)", async () => {
  const rng = testSeed("ring disk driver");
  const size = 8 << 20;
  const { disk, driver } = pair(size);
  const model = new Uint8Array(size);
  for (let i = 0; i < 300; i += 1) {
    const length = rng.int(1, 3 << 20);
    const offset = rng.int(0, size - length);
    if (rng.next() < 0.5) {
      const data = rng.bytes(length);
      const borrowed = rng.next() < 0.5 ? disk.borrowBuffer(length) : undefined;
      if (borrowed) borrowed.set(data);
      await disk.write(offset, borrowed ?? data);
      if (borrowed) disk.returnBuffer(borrowed);
      model.set(data, offset);
    } else {
      const out = new Uint8Array(length);
      await disk.read(offset, out);
      assert.deepEqual(out, model.subarray(offset, offset + length), `read ${offset}+${length}`);
    }
  }
  await disk.flush();
  assert.ok(driver.flushCount >= 1);
  assert.deepEqual(driver.contents(), model);
  assert.equal(disk.pages.freePages, disk.pages.pages);
});

Deno.test("disk server: a flush starts after earlier writes complete and before later ones", async () => {
  const { disk, driver } = pair(1 << 20);
  driver.delayMs = 5;
  const events: string[] = [];
  const flush = driver.flush.bind(driver);
  driver.flush = () => {
    events.push("flush");
    return flush();
  };
  const write = driver.write.bind(driver);
  driver.write = async (offset, data, options) => {
    events.push(`start ${offset}`);
    await write(offset, data, options);
    events.push(`end ${offset}`);
  };
  const page = disk.pages.allocate(1)!;
  const seg = [{ gref: page, firstSect: 0, lastSect: 7 }];
  const done = [
    disk.producer.submitRw(B.BLKIF_OP_WRITE, 0, seg),
    disk.producer.submitRw(B.BLKIF_OP_WRITE, 8, seg),
    disk.producer.submitFlush(),
    disk.producer.submitRw(B.BLKIF_OP_WRITE, 16, seg),
  ];
  assert.deepEqual(await Promise.all(done), [0, 0, 0, 0]);
  const flushAt = events.indexOf("flush");
  assert.ok(
    events.indexOf("end 0") < flushAt && events.indexOf("end 4096") < flushAt,
    events.join(","),
  );
  assert.ok(events.indexOf("start 8192") > flushAt, events.join(","));
});

Deno.test("disk server: QoS holds IOPS to the limit after the burst", async () => {
  const sizeBytes = 1 << 20;
  const driver = new MemoryDriver(sizeBytes);
  const { disk, serve } = ringPair("qos", driver, sizeBytes, {
    poolPages: 64,
    qos: { maxIops: 200, maxBps: 0, burstMs: 100 },
  });
  const server = serve();
  disk.attach(() => server.kick(), {
    sizeBytes,
    capabilities: driver.capabilities,
  });
  const started = performance.now();
  const result = await new TestFrontend(disk, {
    requests: 120,
    depth: 8,
    seed: 1,
    flushFraction: 0,
    discardFraction: 0,
  })
    .run();
  const elapsed = performance.now() - started;
  assert.equal(result.errors, 0);
  // 20 from the burst, then 100 at 200/s: about 500 ms.
  assert.ok(elapsed > 400 && elapsed < 2000, `elapsed ${elapsed} ms`);
});

Deno.test("disk server: busy, it takes new requests without kicks; idle, it asks for kicks again", async () => {
  const size = 1 << 20;
  // No block status: every read crosses the ring, none is answered as known zeros.
  const driver = new MemoryDriver(size, { extents: false });
  driver.delayMs = 20;
  const { disk, serve } = ringPair("kicks", driver, size);
  const server = serve();
  let kicks = 0;
  disk.attach(() => (kicks += 1, server.kick()), {
    sizeBytes: size,
    capabilities: driver.capabilities,
  });
  const read = (i: number) => disk.read(i * 4096, new Uint8Array(4096));
  const first = Array.from({ length: busy_requests_min * 2 }, (_, i) => read(i));
  await new Promise((resolve) => setTimeout(resolve, 5)); // the server is busy with them
  assert.ok(server.inflight >= busy_requests_min);
  const second = Array.from({ length: 4 }, (_, i) => read(100 + i));
  await Promise.all([...first, ...second]);
  assert.equal(kicks, 1, "requests pushed while busy were found by completions, not by kicks");
  await read(200);
  assert.equal(kicks, 2, "after going idle the server asks to be kicked again");
  assert.equal(disk.outstanding, 0);
});

Deno.test("disk server: under load the front end is kicked once per batch of responses, not per response", async () => {
  const size = 1 << 20;
  // No block status: every read crosses the ring, none is answered as known zeros.
  const driver = new MemoryDriver(size, { delayMs: 8, randomDelay: true, extents: false });
  const { disk, serve } = ringPair("batch", driver, size);
  const server = serve();
  let kicks = 0;
  // Count the kicks the server sends by wrapping the front end's onKick.
  const onKick = disk.onKick.bind(disk);
  disk.onKick = () => (kicks += 1, onKick());
  disk.attach(() => server.kick(), { sizeBytes: size, capabilities: driver.capabilities });
  let answered = 0;
  const lane = async (first: number) => {
    for (let i = first; i < 1024; i += 32) {
      await disk.read((i % 256) * 4096, new Uint8Array(4096));
      answered += 1;
    }
  };
  await Promise.all(Array.from({ length: 32 }, (_, i) => lane(i)));
  assert.equal(answered, 1024);
  assert.equal(disk.outstanding, 0);
  // 32 awaited: a kick per 8 responses while the ring is full (more as it drains).
  assert.ok(kicks <= 1024 / 4, `${kicks} kicks for 1024 responses`);
});

// Reads the driver is given per JavaScript turn (each turn's go to the kernel in one submit).
async function burstTurns(passRequestsMax: number | undefined): Promise<number[]> {
  const size = 1 << 20;
  // No block status: every read crosses the ring, none is answered as known zeros.
  const driver = new MemoryDriver(size, { delayMs: 5, extents: false });
  await Promise.all(
    Array.from({ length: 32 }, (_, i) => driver.write(i * 4096, new Uint8Array(4096).fill(i))),
  );
  const turns: number[] = [];
  let turnOpen = false;
  const read = driver.read.bind(driver);
  driver.read = (offsetBytes: number, buffer: Uint8Array) => {
    if (!turnOpen) {
      turnOpen = true;
      turns.push(0);
      queueMicrotask(() => turnOpen = false);
    }
    turns[turns.length - 1] += 1;
    return read(offsetBytes, buffer);
  };
  const { disk, serve } = ringPair("chunks", driver, size, { passRequestsMax });
  const server = serve();
  disk.attach(() => server.kick(), { sizeBytes: size, capabilities: driver.capabilities });
  const buffers = Array.from({ length: 32 }, () => new Uint8Array(4096));
  await Promise.all(buffers.map((b, i) => disk.read(i * 4096, b)));
  buffers.forEach((b, i) => assert.ok(b.every((x) => x === i), `read ${i}`));
  assert.equal(disk.outstanding, 0);
  return turns;
}

Deno.test("disk server: with a per-pass bound (O_DIRECT) a burst reaches the driver in chunks, each submitted before the next is taken", async () => {
  const turns = await burstTurns(submit_chunk_requests);
  assert.equal(turns.reduce((a, b) => a + b, 0), 32);
  assert.ok(turns.every((n) => n <= submit_chunk_requests), `turns ${turns}`);
  assert.ok(turns.includes(submit_chunk_requests), `turns ${turns}: a burst still batches`);
});

Deno.test("disk server: without a per-pass bound (page cache) a burst reaches the driver in one turn", async () => {
  assert.deepEqual(await burstTurns(undefined), [32]);
});

Deno.test("disk server: a per-pass bound below 1 is refused", () => {
  const { serve } = ringPair("bound", new MemoryDriver(1 << 20), 1 << 20, { passRequestsMax: 0 });
  assert.throws(() => serve(), RangeError);
});

Deno.test("disk server: a response is delivered at once when the server holds the rest back (QoS)", async () => {
  const size = 1 << 20;
  // No block status: every read crosses the ring, none is answered as known zeros.
  const driver = new MemoryDriver(size, { extents: false });
  // A burst of 4, then 2 per second: the front end awaits 28 when it last looked.
  const { disk, serve } = ringPair("held", driver, size, {
    qos: { maxIops: 2, maxBps: 0, burstMs: 2000 },
  });
  const server = serve();
  disk.attach(() => server.kick(), { sizeBytes: size, capabilities: driver.capabilities });
  const started = performance.now();
  const answeredAt: number[] = [];
  const reads = Array.from(
    { length: 32 },
    (_, i) =>
      disk.read(i * 4096, new Uint8Array(4096)).then(
        () => answeredAt.push(performance.now() - started),
        () => {},
      ),
  );
  while (answeredAt.length < 5 && performance.now() - started < 3000) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  server.stop();
  disk.fail();
  await Promise.all(reads);
  // The 5th waits for a token (500 ms), not for a batch of 7 more (3.5 s).
  assert.ok(answeredAt.length >= 5, `answered ${answeredAt.length} in 3 s`);
  assert.ok(answeredAt[4] < 1500, `5th answered after ${answeredAt[4]} ms`);
});
