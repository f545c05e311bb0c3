import assert from "node:assert/strict";
import { FlushBehind } from "../../../src/formats/raw/flush_behind.ts";
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

Deno.test("flush-behind: one background flush per threshold written, never two at once", async () => {
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

Deno.test("flush-behind: a failed background flush fails every later settle", async () => {
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
  Deno.test(`flush-behind: a file written past several thresholds (cache=${cache}) reads back`, async () => {
    const dir = await Deno.makeTempDir({ prefix: "blktap-flush-behind-" });
    try {
      const path = `${dir}/out.img`;
      const total = 3 * flush_behind_bytes + (1 << 20);
      const piece = 1 << 20;
      const rng = testSeed(`flush-behind-${cache}`);
      const data = rng.bytes(total);
      const file = await openImageFile(path, { createNew: true, cache, flushBehind: true });
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
