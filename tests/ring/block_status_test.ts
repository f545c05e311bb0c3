import assert from "node:assert/strict";
import * as B from "../../src/ring/blkif.ts";
import {
  block_status_extent_bytes,
  block_status_extents_per_page_max,
  block_status_length_bytes_max,
  decodeBlockStatusReply,
  encodeBlockStatusReply,
  readBlockStatusQuery,
  writeBlockStatusQuery,
  writeBlockStatusRequest,
} from "../../src/ring/block_status.ts";
import type { Extent } from "../../src/formats/driver.ts";
import { testSeed } from "../_helpers/random.ts";

const KiB = 1024;

/** Consecutive extents from `start`, neighbours never equal (as merged). */
function randomExtents(rng: ReturnType<typeof testSeed>, start: number, count: number): Extent[] {
  const extents: Extent[] = [];
  let at = start;
  let last = -1;
  for (let i = 0; i < count; i += 1) {
    let flags = rng.int(0, 3);
    if (flags === last) flags = (flags + 1) % 4;
    last = flags;
    const lengthBytes = rng.int(1, 64) * rng.pick([1, 512, 4096, 65536]);
    extents.push({
      offsetBytes: at,
      lengthBytes,
      hole: (flags & 1) !== 0,
      zero: (flags & 2) !== 0,
    });
    at += lengthBytes;
  }
  return extents;
}

Deno.test("block status codec: the Xen operation numbers are left alone", () => {
  const xen = [
    B.BLKIF_OP_READ,
    B.BLKIF_OP_WRITE,
    B.BLKIF_OP_WRITE_BARRIER,
    B.BLKIF_OP_FLUSH_DISKCACHE,
    B.BLKIF_OP_RESERVED_1,
    B.BLKIF_OP_DISCARD,
    B.BLKIF_OP_INDIRECT,
  ];
  assert.ok(B.BLKTAP_OP_BLOCK_STATUS > Math.max(...xen));
  assert.ok(B.BLKTAP_OP_BLOCK_STATUS <= 0xff, "fits the u8 operation field");
  assert.equal(block_status_extents_per_page_max, 204);
  assert.ok(16 + block_status_extents_per_page_max * block_status_extent_bytes <= B.PAGE_BYTES);
});

Deno.test("block status codec: request entry and query at their offsets", () => {
  const view = new DataView(new ArrayBuffer(B.ENTRY_BYTES));
  writeBlockStatusRequest(view, 0, { id: 7n, sector: 40960, gref: 33 });
  assert.equal(view.getUint8(B.REQ_OPERATION), 0x80);
  assert.equal(view.getUint8(B.REQ_NR_SEGMENTS), 1);
  assert.equal(view.getBigUint64(B.REQ_ID, true), 7n);
  assert.equal(view.getBigUint64(B.REQ_SECTOR_NUMBER, true), 40960n);
  assert.equal(view.getUint32(B.REQ_SEG + B.SEG_GREF, true), 33);
  assert.equal(view.getUint8(B.REQ_SEG + B.SEG_FIRST_SECT), 0);
  assert.equal(view.getUint8(B.REQ_SEG + B.SEG_LAST_SECT), 7);
  const page = new Uint8Array(B.PAGE_BYTES);
  writeBlockStatusQuery(page, block_status_length_bytes_max);
  assert.equal(readBlockStatusQuery(page), 2n ** 32n);
  assert.throws(() => writeBlockStatusQuery(page, 0), RangeError);
  assert.throws(() => writeBlockStatusQuery(page, block_status_length_bytes_max + 1), RangeError);
  // The answer never overwrites the query: a re-issued request asks the same.
  writeBlockStatusQuery(page, 12345);
  encodeBlockStatusReply(page, randomExtents(testSeed("bs query kept"), 0, 500), 0, 1 << 30);
  assert.equal(readBlockStatusQuery(page), 12345n);
});

Deno.test("block status codec: seeded round trip against the clipped, merged model", () => {
  const rng = testSeed("block status round trip");
  const page = new Uint8Array(B.PAGE_BYTES);
  for (let i = 0; i < 2000; i += 1) {
    const extents = randomExtents(rng, rng.int(0, 1 << 20), rng.int(1, 400));
    const first = extents[0].offsetBytes;
    const last = extents[extents.length - 1];
    const span = last.offsetBytes + last.lengthBytes - first;
    const start = first + rng.int(0, Math.min(span - 1, 8 * KiB));
    const length = rng.int(1, first + span - start);
    const covered = encodeBlockStatusReply(page, extents, start, length);
    const decoded = decodeBlockStatusReply(page, start, length);
    assert.ok(covered > 0 && covered <= length);
    assert.ok(decoded.length <= block_status_extents_per_page_max);
    assert.equal(decoded[0].offsetBytes, start);
    const end = decoded[decoded.length - 1];
    assert.equal(end.offsetBytes + end.lengthBytes - start, covered);
    // Byte by byte (per extent edge), the answer agrees with the model.
    for (const d of decoded) {
      for (const at of [d.offsetBytes, d.offsetBytes + d.lengthBytes - 1]) {
        const m = extents.find((e) => e.offsetBytes <= at && at < e.offsetBytes + e.lengthBytes)!;
        assert.equal(d.hole, m.hole, `hole at ${at}`);
        assert.equal(d.zero, m.zero, `zero at ${at}`);
      }
    }
    if (covered < length) assert.equal(decoded.length, block_status_extents_per_page_max);
  }
});

Deno.test("block status codec: equal neighbours merge; a gap ends the answer", () => {
  const page = new Uint8Array(B.PAGE_BYTES);
  const data = { hole: false, zero: false };
  const extents = [
    { offsetBytes: 0, lengthBytes: 4096, ...data },
    { offsetBytes: 4096, lengthBytes: 4096, ...data },
    { offsetBytes: 8192, lengthBytes: 4096, hole: true, zero: true },
    { offsetBytes: 16384, lengthBytes: 4096, ...data }, // after a gap
  ];
  assert.equal(encodeBlockStatusReply(page, extents, 1000, 20000), 12288 - 1000);
  assert.deepEqual(decodeBlockStatusReply(page, 1000, 20000), [
    { offsetBytes: 1000, lengthBytes: 7192, ...data },
    { offsetBytes: 8192, lengthBytes: 4096, hole: true, zero: true },
  ]);
  assert.throws(() => encodeBlockStatusReply(page, extents.slice(3), 0, 4096), RangeError);
  assert.throws(() => encodeBlockStatusReply(page, [], 0, 4096), RangeError);
});

Deno.test("block status codec: the decoder refuses what a back end must not write", () => {
  const page = new Uint8Array(B.PAGE_BYTES);
  const view = new DataView(page.buffer);
  const reset = () => {
    encodeBlockStatusReply(
      page,
      [
        { offsetBytes: 0, lengthBytes: 4096, hole: false, zero: false },
        { offsetBytes: 4096, lengthBytes: 4096, hole: true, zero: true },
      ],
      0,
      8192,
    );
    assert.equal(decodeBlockStatusReply(page, 0, 8192).length, 2);
  };
  const bad: [string, () => void][] = [
    ["count 0", () => view.setUint32(8, 0, true)],
    ["count past the page", () => view.setUint32(8, block_status_extents_per_page_max + 1, true)],
    ["first not at the start", () => view.setBigUint64(16, 512n, true)],
    ["empty extent", () => view.setBigUint64(24, 0n, true)],
    ["gap between extents", () => view.setBigUint64(36, 4608n, true)],
    ["past the range", () => view.setBigUint64(44, 4097n, true)],
    ["unknown flag", () => view.setUint32(52, 4, true)],
    ["count over written extents", () => view.setUint32(8, 3, true)],
  ];
  for (const [what, corrupt] of bad) {
    reset();
    corrupt();
    assert.throws(() => decodeBlockStatusReply(page, 0, 8192), RangeError, what);
  }
});
