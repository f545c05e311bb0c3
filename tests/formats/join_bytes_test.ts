import assert from "node:assert/strict";
import { joinBytes } from "../../src/formats/join_bytes.ts";

Deno.test("joinBytes: one part is returned as is", () => {
  const only = new Uint8Array([1, 2, 3]);
  assert.equal(joinBytes([only]), only);
});

Deno.test("joinBytes: consecutive slices of one buffer become a view, not a copy", () => {
  const whole = new Uint8Array([1, 2, 3, 4, 5, 6]);
  const joined = joinBytes([whole.subarray(1, 3), whole.subarray(3, 5)]);
  assert.deepEqual(joined, new Uint8Array([2, 3, 4, 5]));
  whole[2] = 9;
  assert.equal(joined[1], 9, "shares the caller's memory");
});

Deno.test("joinBytes: separate or out-of-order parts are copied in order", () => {
  const whole = new Uint8Array([1, 2, 3, 4]);
  assert.deepEqual(
    joinBytes([whole.subarray(2, 4), whole.subarray(0, 2)]),
    new Uint8Array([3, 4, 1, 2]),
  );
  const joined = joinBytes([new Uint8Array([7]), new Uint8Array([8, 9])]);
  assert.deepEqual(joined, new Uint8Array([7, 8, 9]));
  assert.deepEqual(joinBytes([]), new Uint8Array(0));
});
