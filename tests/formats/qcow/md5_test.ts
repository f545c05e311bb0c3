/**
 * The MD5 behind blktap's qcow L1 checksum: RFC 1321's test suite, and
 * seeded messages of every length around the block and padding edges, fed
 * in random pieces, against node:crypto.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { Md5 } from "../../../src/formats/qcow/md5.ts";
import { testSeed } from "../../_helpers/random.ts";

const hex = (bytes: Uint8Array) =>
  Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

Deno.test("Md5: RFC 1321 test suite", () => {
  const suite: [string, string][] = [
    ["", "d41d8cd98f00b204e9800998ecf8427e"],
    ["a", "0cc175b9c0f1b6a831c399e269772661"],
    ["abc", "900150983cd24fb0d6963f7d28e17f72"],
    ["message digest", "f96b697d7cb7938d525a2f31aaf161d0"],
    ["abcdefghijklmnopqrstuvwxyz", "c3fcd3d76192e4007dfb496cca67e13b"],
    [
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
      "d174ab98d277d9f5a5611c2c9f419d9f",
    ],
    [
      "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
      "57edf4a22be3c955ac49da2e2107b67a",
    ],
  ];
  for (const [message, digest] of suite) {
    assert.equal(
      hex(new Md5().update(new TextEncoder().encode(message)).digest()),
      digest,
      message,
    );
  }
});

Deno.test("Md5: equals node:crypto for any length, fed in any pieces", () => {
  const rng = testSeed("md5");
  for (let i = 0; i < 600; i += 1) {
    const length = i < 300 ? i : rng.int(0, 70_000);
    const message = new Uint8Array(length).map(() => rng.int(0, 255));
    const md5 = new Md5();
    for (let at = 0; at < length;) {
      const n = rng.int(0, Math.min(200, length - at));
      md5.update(message.subarray(at, at + n));
      at += n;
    }
    const want = createHash("md5").update(message).digest("hex");
    assert.equal(hex(md5.digest()), want, `${length} bytes`);
  }
});

Deno.test("Md5: no input after the digest", () => {
  const md5 = new Md5();
  md5.digest();
  assert.throws(() => md5.update(new Uint8Array(1)), /after digest/);
  assert.throws(() => md5.digest(), /twice/);
});
