import assert from "node:assert/strict";
import { type ByteSink, ReplyWriter } from "../../../src/frontends/nbd/reply_writer.ts";

/** A sink whose writes complete when the test says so. */
class ManualSink implements ByteSink {
  writes: Uint8Array[] = [];
  #pending: { resolve: (n: number) => void; reject: (e: Error) => void; length: number }[] = [];
  write(bytes: Uint8Array): Promise<number> {
    this.writes.push(bytes);
    return new Promise((resolve, reject) =>
      this.#pending.push({ resolve, reject, length: bytes.byteLength })
    );
  }
  /** Completes the oldest write (partially when `count` is given). */
  complete(count?: number): void {
    const next = this.#pending.shift()!;
    next.resolve(count ?? next.length);
  }
  fail(): void {
    this.#pending.shift()!.reject(new Error("EPIPE"));
  }
  get pending(): number {
    return this.#pending.length;
  }
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 0));

Deno.test("reply writer: small replies of one turn leave in one write, in order", async () => {
  const sink = new ManualSink();
  const writer = new ReplyWriter(sink);
  for (let i = 0; i < 100; i++) writer.pushCopy(new Uint8Array([i, i]));
  await tick();
  assert.equal(sink.writes.length, 1);
  assert.deepEqual([...sink.writes[0]], Array.from({ length: 100 }, (_, i) => [i, i]).flat());
  sink.complete();
  await writer.idle();
  assert.equal(writer.pendingBytes, 0);
});

Deno.test("reply writer: large payloads are written uncopied and released after the write", async () => {
  const sink = new ManualSink();
  const writer = new ReplyWriter(sink);
  const big = new Uint8Array(1 << 20).fill(7);
  let released = 0;
  writer.pushCopy(new Uint8Array([1, 2, 3]));
  writer.pushOwned(big, () => released++);
  writer.pushRelease(() => released++);
  await tick();
  assert.deepEqual([...sink.writes[0]], [1, 2, 3]);
  sink.complete();
  await tick();
  assert.equal(sink.writes[1], big, "the payload's own buffer went to the socket");
  assert.equal(released, 0, "nothing released while the payload is being written");
  sink.complete(1000); // a short write: the rest follows from the same buffer
  await tick();
  assert.equal(sink.writes[2].byteLength, big.byteLength - 1000);
  assert.equal(sink.writes[2].buffer, big.buffer);
  assert.equal(released, 0);
  sink.complete();
  await writer.idle();
  assert.equal(released, 2);
});

Deno.test("reply writer: a failed socket drops queued replies and releases their buffers", async () => {
  const sink = new ManualSink();
  const writer = new ReplyWriter(sink);
  let released = 0;
  writer.pushCopy(new Uint8Array(10));
  writer.pushOwned(new Uint8Array(1 << 20), () => released++);
  await tick();
  sink.fail();
  await writer.idle();
  assert.ok(writer.failed);
  assert.equal(released, 1);
  writer.pushOwned(new Uint8Array(1 << 20), () => released++);
  writer.pushRelease(() => released++);
  assert.equal(released, 3);
  assert.equal(sink.pending, 0);
});

Deno.test("reply writer: a reply sent by other means runs in its turn, never beside a write", async () => {
  const sink = new ManualSink();
  const writer = new ReplyWriter(sink);
  const events: string[] = [];
  let finishSend!: () => void;
  writer.pushCopy(new Uint8Array([1]));
  writer.pushSend(100, () => {
    events.push(`send after ${sink.writes.length} writes, ${sink.pending} pending`);
    return new Promise<void>((resolve) => finishSend = resolve);
  }, () => events.push("released"));
  writer.pushCopy(new Uint8Array([2]));
  assert.equal(writer.pendingBytes, 102);
  assert.equal(writer.pendingCopiedBytes, 2, "a sent reply holds none of our memory");
  await tick();
  assert.deepEqual(events, []);
  sink.complete();
  await tick();
  assert.deepEqual(events, ["send after 1 writes, 0 pending"]);
  assert.equal(sink.writes.length, 1, "what follows waits for the send");
  finishSend();
  await tick();
  assert.deepEqual(events, ["send after 1 writes, 0 pending", "released"]);
  assert.deepEqual([...sink.writes[1]], [2]);
  sink.complete();
  await writer.idle();
  assert.deepEqual([writer.pendingBytes, writer.pendingCopiedBytes], [0, 0]);
});

Deno.test("reply writer: a failed send fails the writer; queued sends are released unsent", async () => {
  const writer = new ReplyWriter(new ManualSink()); // nothing is written but by the sends
  const released: number[] = [];
  let sends = 0;
  writer.pushSend(10, () => {
    sends++;
    return Promise.reject(new Error("EPIPE"));
  }, () => released.push(1));
  writer.pushSend(10, () => {
    sends++;
    return Promise.resolve();
  }, () => released.push(2));
  await writer.idle();
  assert.equal(writer.failed, true);
  assert.equal(sends, 1);
  assert.deepEqual(released.sort(), [1, 2]);
  writer.pushSend(10, () => {
    sends++;
    return Promise.resolve();
  }, () => released.push(3));
  assert.equal(sends, 1, "nothing is sent once the writer failed");
  assert.deepEqual(released, [1, 2, 3]);
});
