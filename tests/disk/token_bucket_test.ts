import assert from "node:assert/strict";
import { TokenBucket } from "../../src/disk/token_bucket.ts";

Deno.test("token bucket: burst first, then the rate; oversize costs pass on a full bucket", () => {
  let now = 0;
  const bucket = new TokenBucket(100, 10, () => now);
  for (let i = 0; i < 10; i += 1) {
    assert.equal(bucket.waitMs(1), 0);
    bucket.take(1);
  }
  assert.equal(bucket.waitMs(1), 10); // 1 token at 100/s
  now += 10;
  assert.equal(bucket.waitMs(1), 0);
  bucket.take(1);
  now += 1000;
  assert.equal(bucket.waitMs(50), 0, "a cost over the burst needs only a full bucket");
  bucket.take(50);
  assert.equal(bucket.waitMs(1), 410); // balance -40, need +1
  assert.equal(new TokenBucket(0, 0).waitMs(1e9), 0, "rate 0 is unlimited");
});
