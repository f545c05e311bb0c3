import assert from "node:assert/strict";
import { RangeLock } from "../../../src/formats/raw/range_lock.ts";

Deno.test("RangeLock: a free range is held at once, an overlapping one waits for its release", async () => {
  const lock = new RangeLock();
  const first = lock.tryAcquire(0, 8192);
  assert.ok(first, "a free range is taken without waiting");
  assert.equal(lock.tryAcquire(4096, 12288), undefined, "an overlapping range is refused");
  const beside = lock.tryAcquire(8192, 12288);
  assert.ok(beside, "an adjacent range does not overlap");
  let granted = false;
  const waiting = lock.acquire(0, 4096).then((release) => (granted = true, release));
  await null;
  assert.equal(granted, false, "acquire waits while the range is held");
  first();
  const release = await waiting;
  assert.equal(granted, true);
  release();
  beside();
  assert.ok(lock.tryAcquire(0, 12288), "everything released");
});
