import assert from "node:assert/strict";
import { ENTRY_BYTES, PAGE_BYTES, SRING_HEADER_BYTES } from "../../src/ring/blkif.ts";
import { BackRing, eventInWindow, FrontRing, SharedRing } from "../../src/ring/ring.ts";
import { testSeed } from "../_helpers/random.ts";

const noFence = () => {};

function ringAt(start: number, bytes = PAGE_BYTES) {
  const memory = new Uint8Array(bytes);
  const front = FrontRing.init(memory, noFence);
  // Start every index near the wrap point, as a long-running ring would be.
  const s = front.sring;
  s.reqProd = start;
  s.rspProd = start;
  s.reqEvent = (start + 1) >>> 0;
  s.rspEvent = (start + 1) >>> 0;
  front.reqProdPvt = start;
  front.rspCons = start;
  const back = new BackRing(memory, noFence);
  return { memory, front, back };
}

function produce(front: FrontRing, id: bigint): void {
  const offset = front.nextRequestOffset();
  front.sring.view.setBigUint64(offset + 8, id, true);
}

function consume(back: BackRing): bigint {
  const offset = back.takeRequestOffset();
  return back.sring.view.getBigUint64(offset + 8, true);
}

Deno.test("ring: SHARED_RING_INIT sets events to 1 and indexes to 0", () => {
  const memory = new Uint8Array(PAGE_BYTES).fill(0xaa);
  const front = FrontRing.init(memory, noFence);
  assert.deepEqual(
    [front.sring.reqProd, front.sring.reqEvent, front.sring.rspProd, front.sring.rspEvent],
    [0, 1, 0, 1],
  );
  assert.ok(memory.subarray(16, SRING_HEADER_BYTES).every((b) => b === 0));
  assert.equal(front.entries, 32);
  assert.equal(front.sring.entryOffset(33), SRING_HEADER_BYTES + ENTRY_BYTES);
});

Deno.test("ring: notification iff the event index lies in (old, new]", () => {
  assert.equal(eventInWindow(0, 1, 1), true);
  assert.equal(eventInWindow(1, 5, 1), false);
  assert.equal(eventInWindow(1, 5, 2), true);
  assert.equal(eventInWindow(1, 5, 5), true);
  assert.equal(eventInWindow(1, 5, 6), false);
  // Across the 2^32 wrap.
  assert.equal(eventInWindow(0xfffffffe, 2, 0xffffffff), true);
  assert.equal(eventInWindow(0xfffffffe, 2, 1), true);
  assert.equal(eventInWindow(0xfffffffe, 2, 3), false);
  assert.equal(eventInWindow(0xfffffffe, 2, 0xfffffffe), false);
});

Deno.test("ring: indexes wrap at 2^32 without losing a request", () => {
  const { front, back } = ringAt(0xffffffff - 40);
  let next = 0n;
  let expect = 0n;
  for (let round = 0; round < 10; round += 1) {
    while (front.freeRequests() > 0) produce(front, next++);
    assert.equal(front.pushRequestsAndCheckNotify(), true, "back end armed req_event");
    assert.equal(back.unconsumedRequests(), 32);
    while (back.unconsumedRequests() > 0) {
      const id = consume(back);
      assert.equal(id, expect++);
      back.putResponse(id, 0, 0);
    }
    back.pushResponsesAndCheckNotify();
    assert.equal(front.unconsumedResponses(), 32);
    while (front.unconsumedResponses() > 0) front.takeResponse();
    assert.equal(back.finalCheckForRequests(), false);
    assert.equal(front.finalCheckForResponses(), false);
  }
  assert.ok(front.reqProdPvt < 1000, "indexes wrapped");
});

Deno.test("ring: a back end refuses a front end claiming more requests than slots", () => {
  const { front, back } = ringAt(5);
  front.sring.reqProd = 5 + 33;
  assert.throws(() => back.unconsumedRequests(), /more than 32 ahead/);
});

Deno.test("ring: randomized interleaving loses, duplicates and double-answers nothing", () => {
  const rng = testSeed("ring randomized");
  const random = () => rng.next();
  for (const start of [0, 0xffffffff - 1000, 0x7fffffff]) {
    interleave(random, start, 20_000);
  }
});

Deno.test("ring: a front end asking for a batch of responses is kicked at the batch's last one", () => {
  const { front, back } = ringAt(0xffffffff - 3); // the batch spans the 2^32 wrap
  for (let id = 0n; id < 8n; id += 1n) produce(front, id);
  front.pushRequestsAndCheckNotify();
  assert.equal(front.awaitedResponses(), 8);
  assert.throws(() => front.finalCheckForResponses(9), /batch 9 of 8 awaited/);
  assert.equal(front.finalCheckForResponses(4), false);
  const kicks: boolean[] = [];
  while (back.unconsumedRequests() > 0) {
    back.putResponse(consume(back), 0, 0);
    kicks.push(back.pushResponsesAndCheckNotify());
  }
  assert.deepEqual(kicks, [false, false, false, true, false, false, false, false]);
});

Deno.test("ring: randomized interleaving with batched response kicks leaves nobody waiting", () => {
  const rng = testSeed("ring randomized batched");
  const random = () => rng.next();
  for (const start of [0, 0xffffffff - 1000]) interleave(random, start, 20_000, true);
});

// `batched`: the front end asks for a random batch of the responses it awaits.
function interleave(random: () => number, start: number, total: number, batched = false): void {
  const { front, back } = ringAt(start, 2 * PAGE_BYTES);
  const outstanding = new Set<bigint>();
  const backQueue: bigint[] = [];
  let produced = 0n;
  let answered = 0;
  let backKicked = true;
  let frontKicked = false;
  let steps = 0;
  while (answered < total) {
    assert.ok(steps++ < total * 200, "no progress");
    const action = Math.floor(random() * (batched ? 7 : 6));
    if (action === 0 && produced < BigInt(total)) {
      const n = Math.floor(random() * 8);
      for (let i = 0; i < n && front.freeRequests() > 0 && produced < BigInt(total); i += 1) {
        outstanding.add(produced);
        produce(front, produced++);
      }
    } else if (action === 1) {
      if (front.pushRequestsAndCheckNotify()) backKicked = true;
    } else if (action === 2 && backKicked) {
      // A back end woken by a kick consumes some, then maybe finishes with a final check.
      let n = Math.floor(random() * 10);
      while (n-- > 0 && back.unconsumedRequests() > 0) backQueue.push(consume(back));
      if (random() < 0.5) backKicked = back.finalCheckForRequests();
    } else if (action === 3 && backQueue.length > 0) {
      const n = 1 + Math.floor(random() * backQueue.length);
      for (let i = 0; i < n; i += 1) {
        const pick = Math.floor(random() * backQueue.length);
        const id = backQueue.splice(pick, 1)[0];
        back.putResponse(id, 0, 0);
      }
    } else if (action === 4) {
      if (back.pushResponsesAndCheckNotify()) frontKicked = true;
    } else if (action === 5 && frontKicked) {
      let n = Math.floor(random() * 10);
      while (n-- > 0 && front.unconsumedResponses() > 0) {
        const { id } = front.takeResponse();
        assert.ok(outstanding.delete(id), `response ${id} not outstanding (duplicate or unknown)`);
        answered += 1;
      }
      if (random() < 0.5) {
        const awaited = front.awaitedResponses();
        const batch = batched && awaited > 1 ? 1 + Math.floor(random() * awaited) : 1;
        frontKicked = front.finalCheckForResponses(batch);
      }
    } else if (action === 6 && backQueue.length === 0 && back.unconsumedRequests() === 0) {
      // A back end with nothing left running notifies whatever it pushed (disk_server.ts).
      if (back.pushResponsesAndCheckNotify() || front.unconsumedResponses() > 0) frontKicked = true;
    }
    checkNoLostWakeup(front, back, backKicked, frontKicked || batched);
    if (batched && !frontKicked) checkKickStillComing(front);
  }
  assert.equal(outstanding.size, 0);
}

// A front end that asked for a batch may have responses waiting unseen, but
// only while its rsp_event lies among responses still to come.
function checkKickStillComing(front: FrontRing): void {
  const s = front.sring;
  const published = (s.rspProd - front.rspCons) >>> 0;
  if (published === 0) return;
  const ahead = (s.rspEvent - s.rspProd) >>> 0;
  const toCome = (s.reqProd - s.rspProd) >>> 0;
  assert.ok(ahead >= 1 && ahead <= toCome, `rsp_event ${ahead} ahead, ${toCome} to come`);
}

// Suppression must never leave work pending with nobody woken: if the back
// end went to sleep (final check said no work) but requests are published,
// a kick must have been sent; same for responses.
function checkNoLostWakeup(
  front: FrontRing,
  back: BackRing,
  backKicked: boolean,
  frontKicked: boolean,
): void {
  const s: SharedRing = front.sring;
  if (!backKicked) {
    assert.equal(
      (s.reqProd - back.reqCons) >>> 0,
      0,
      "requests published, back end asleep, no kick",
    );
  }
  if (!frontKicked) {
    assert.equal(
      (s.rspProd - front.rspCons) >>> 0,
      0,
      "responses published, front asleep, no kick",
    );
  }
}

Deno.test("ring: an index written by another thread is never read torn", async () => {
  // A byte-wise write or read lets 255 -> 256 be seen as 511 (or 0): the
  // peer then finds req_prod racing ahead, or going back.
  const buffer = new SharedArrayBuffer(4096 + 64);
  const ring = new SharedRing(new Uint8Array(buffer).subarray(0, 4096), noFence);
  const stop = new Int32Array(buffer, 4096, 1);
  const worker = new Worker(new URL("./_index_writer.ts", import.meta.url), { type: "module" });
  const started = Promise.withResolvers<void>();
  const finished = Promise.withResolvers<number>();
  worker.onmessage = (e) => e.data === "started" ? started.resolve() : finished.resolve(e.data);
  worker.onerror = (e) => {
    started.reject(e);
    finished.reject(e);
  };
  worker.postMessage({ buffer });
  let last = 0;
  let backwards = 0;
  let reads = 0;
  try {
    await started.promise;
    const endMs = performance.now() + 1500;
    while (performance.now() < endMs) {
      for (let i = 0; i < 10_000; i++) {
        const seen = ring.reqProd;
        // Monotonic writer, no wrap within the test: a smaller value is torn.
        if (seen < last) backwards++;
        last = seen;
      }
      reads += 10_000;
    }
  } finally {
    Atomics.store(stop, 0, 1);
    const written = await finished.promise;
    worker.terminate();
    assert.ok(written > 1000, `the writer published only ${written} indexes`);
  }
  assert.equal(backwards, 0, `${backwards} of ${reads} reads of req_prod went backwards`);
});
