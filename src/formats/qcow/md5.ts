/**
 * MD5 (RFC 1321), incremental, for blktap's qcow L1 checksum. Here rather
 * than node:crypto: loading that module costs every process about 30 ms of
 * start-up (measured with perf stat), and the checksum hashes a few KiB.
 * @module
 */

/** Left rotations, four per round (RFC 1321 §3.4). */
const SHIFTS = [[7, 12, 17, 22], [5, 9, 14, 20], [4, 11, 16, 23], [6, 10, 15, 21]];
/** floor(2^32 * |sin(i + 1)|). */
const SINES = Array.from({ length: 64 }, (_, i) => Math.floor(2 ** 32 * Math.abs(Math.sin(i + 1))));
const BLOCK_BYTES = 64;

/** An MD5 digest fed in pieces. */
export class Md5 {
  #state = new Int32Array([0x67452301, 0xefcdab89 | 0, 0x98badcfe | 0, 0x10325476]);
  #block = new Uint8Array(BLOCK_BYTES);
  #blockView = new DataView(this.#block.buffer);
  #pending = 0;
  #lengthBytes = 0;
  #done = false;

  /** Adds `bytes` to the message. */
  update(bytes: Uint8Array): this {
    if (this.#done) throw new Error("Md5.update after digest");
    this.#lengthBytes += bytes.byteLength;
    let at = 0;
    while (at < bytes.byteLength) {
      const n = Math.min(BLOCK_BYTES - this.#pending, bytes.byteLength - at);
      this.#block.set(bytes.subarray(at, at + n), this.#pending);
      this.#pending += n;
      at += n;
      if (this.#pending === BLOCK_BYTES) {
        this.#compress();
        this.#pending = 0;
      }
    }
    return this;
  }

  /** The 16-byte digest; the hash takes no more input. */
  digest(): Uint8Array {
    if (this.#done) throw new Error("Md5.digest called twice");
    const bits = this.#lengthBytes * 8;
    const padding = new Uint8Array(((55 - this.#lengthBytes) & 63) + 1 + 8);
    padding[0] = 0x80;
    const view = new DataView(padding.buffer);
    view.setUint32(padding.byteLength - 8, bits % 2 ** 32, true);
    view.setUint32(padding.byteLength - 4, Math.floor(bits / 2 ** 32), true);
    this.update(padding);
    this.#done = true;
    const out = new Uint8Array(16);
    const outView = new DataView(out.buffer);
    for (let i = 0; i < 4; i += 1) outView.setInt32(i * 4, this.#state[i], true);
    return out;
  }

  #compress(): void {
    const s = this.#state;
    const v = this.#blockView;
    let [a, b, c, d] = s;
    for (let i = 0; i < 64; i += 1) {
      let f: number;
      let g: number;
      if (i < 16) {
        f = (b & c) | (~b & d);
        g = i;
      } else if (i < 32) {
        f = (d & b) | (~d & c);
        g = (5 * i + 1) & 15;
      } else if (i < 48) {
        f = b ^ c ^ d;
        g = (3 * i + 5) & 15;
      } else {
        f = c ^ (b | ~d);
        g = (7 * i) & 15;
      }
      const sum = (a + f + SINES[i] + v.getInt32(g * 4, true)) | 0;
      a = d;
      d = c;
      c = b;
      const shift = SHIFTS[i >> 4][i & 3];
      b = (b + ((sum << shift) | (sum >>> (32 - shift)))) | 0;
    }
    s[0] = (s[0] + a) | 0;
    s[1] = (s[1] + b) | 0;
    s[2] = (s[2] + c) | 0;
    s[3] = (s[3] + d) | 0;
  }
}
