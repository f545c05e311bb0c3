import assert from "node:assert/strict";
import { FlushBehind } from "../../../src/formats/raw/flush_behind.ts";
import { InFlightLimit } from "../../../src/formats/raw/in_flight_limit.ts";
import { openImageFile } from "../../../src/formats/raw/open_file.ts";
import { flush_behind_bytes } from "../../../src/formats/raw/aio_file.ts";
import { testSeed } from "../../_helpers/random.ts";

/** A sync the test completes by hand, counting calls. */
function manualSync() {
  const pending: { resolve: () => void; reject: (e: Error) => void }[] = [];
  return {
    pending,
    sync: () => new Promise<void>((resolve, reject) => pending.push({ resolve, reject })),
  };
}

Deno.test("filling, flush-behind: one background flush per threshold written, never two at once", async () => {
  const { pending, sync } = manualSync();
  const behind = new FlushBehind(sync, 100);
  behind.wrote(60);
  assert.equal(pending.length, 0, "below the threshold: no flush");
  behind.wrote(60);
  assert.equal(pending.length, 1, "past the threshold: a flush starts");
  behind.wrote(500);
  assert.equal(pending.length, 1, "a flush is running: no second one");
  pending[0].resolve();
  await behind.settle();
  behind.wrote(100);
  assert.equal(pending.length, 2, "the bytes written meanwhile start the next");
  pending[1].resolve();
  await behind.settle();
});

Deno.test("filling, flush-behind: a failed background flush fails every later settle", async () => {
  const { pending, sync } = manualSync();
  const behind = new FlushBehind(sync, 10);
  behind.wrote(10);
  pending[0].reject(new Error("EIO from writeback"));
  await assert.rejects(behind.settle(), /EIO from writeback/);
  behind.wrote(10);
  pending[1].resolve();
  // The kernel would not report it again: the file layer must keep doing so.
  await assert.rejects(behind.settle(), /EIO from writeback/);
  await behind.idle();
});

for (const cache of ["writeback", "none"] as const) {
  Deno.test(`filling: a file written past several thresholds (cache=${cache}) reads back`, async () => {
    const dir = await Deno.makeTempDir({ prefix: "blktap-flush-behind-" });
    try {
      const path = `${dir}/out.img`;
      const total = 3 * flush_behind_bytes + (1 << 20);
      const piece = 1 << 20;
      const rng = testSeed(`flush-behind-${cache}`);
      const data = rng.bytes(total);
      const file = await openImageFile(path, { createNew: true, cache, filling: true });
      try {
        // Eight writes in flight, as the tools issue them.
        let next = 0;
        const worker = async () => {
          while (next < total) {
            const at = next;
            next += piece;
            await file.write(at, data.subarray(at, at + piece));
          }
        };
        await Promise.all(Array.from({ length: 8 }, worker));
        await file.flush();
      } finally {
        await file.close();
      }
      assert.deepEqual(await Deno.readFile(path), data);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test("filling, in-flight limit: never more than max at once, started in arrival order", async () => {
  const limit = new InFlightLimit(2);
  const started: number[] = [];
  const finish: (() => void)[] = [];
  let peak = 0;
  const runs = Array.from({ length: 6 }, (_, i) =>
    limit.run(async () => {
      started.push(i);
      peak = Math.max(peak, limit.running);
      await new Promise<void>((resolve) => finish[i] = resolve);
      return i;
    }));
  await Promise.resolve();
  assert.deepEqual(started, [0, 1], "two start at once");
  for (let i = 0; i < 6; i += 1) {
    while (!finish[i]) await new Promise((r) => setTimeout(r, 0));
    finish[i]();
  }
  assert.deepEqual(await Promise.all(runs), [0, 1, 2, 3, 4, 5]);
  assert.deepEqual(started, [0, 1, 2, 3, 4, 5]);
  assert.equal(peak, 2);
  assert.equal(limit.running, 0);
  await assert.rejects(limit.run(() => Promise.reject(new Error("EIO"))), /EIO/);
  assert.equal(limit.running, 0, "a failed operation gives its slot back");
});
