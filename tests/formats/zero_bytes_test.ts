/**
 * Zero detection (`isZeroBytes`, used to keep zeros unallocated by
 * img2qcow, convert and the write paths): seeded buffers of every length
 * and alignment, zero or with one non-zero byte anywhere, the first and
 * last bytes included.
 */
import assert from "node:assert/strict";
import { isZeroBytes } from "../../src/formats/zero_bytes.ts";
import { testSeed } from "../_helpers/random.ts";

Deno.test("isZeroBytes: one non-zero byte anywhere is found, at any length and alignment", () => {
  const rng = testSeed("zero-bytes");
  for (let i = 0; i < 5000; i += 1) {
    const length = rng.int(0, (3 << 20) >> rng.int(0, 12));
    const offset = rng.int(0, 7);
    const bytes = new Uint8Array(length + offset + 3).subarray(offset, offset + length);
    assert.equal(isZeroBytes(bytes), true, `zeros, ${length} bytes at ${offset}`);
    if (length === 0) continue;
    const at = rng.pick([0, length - 1, rng.int(0, length - 1)]);
    bytes[at] = rng.int(1, 255);
    assert.equal(isZeroBytes(bytes), false, `byte ${at} of ${length} set`);
  }
});
