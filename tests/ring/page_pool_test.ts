import assert from "node:assert/strict";
import { PagePool } from "../../src/ring/page_pool.ts";
import { testSeed } from "../_helpers/random.ts";

Deno.test("page pool: random allocations never overlap and free pages are counted exactly", () => {
  const rng = testSeed("page pool");
  const pool = new PagePool(256);
  const owner = new Int32Array(256).fill(-1);
  const live: [number, number][] = [];
  for (let step = 0; step < 20_000; step += 1) {
    if (live.length > 0 && rng.next() < 0.5) {
      const [first, count] = live.splice(rng.int(0, live.length - 1), 1)[0];
      owner.fill(-1, first, first + count);
      pool.release(first, count);
    } else {
      const count = rng.int(1, 40);
      const first = pool.allocate(count);
      if (first === undefined) continue;
      assert.ok(first + count <= 256);
      assert.ok(owner.subarray(first, first + count).every((o) => o === -1), "overlap");
      owner.fill(step, first, first + count);
      live.push([first, count]);
    }
    assert.equal(pool.freePages, owner.filter((o) => o === -1).length);
  }
  assert.throws(() => pool.release(0, 256 + 1));
});

Deno.test("page pool: allocateWait resumes when pages come back", async () => {
  const pool = new PagePool(4);
  const first = pool.allocate(4)!;
  let got: number | undefined;
  const waiting = pool.allocateWait(2).then((p) => got = p);
  await Promise.resolve();
  assert.equal(got, undefined);
  pool.release(first, 4);
  await waiting;
  assert.equal(got, 0);
});
