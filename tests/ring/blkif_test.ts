import assert from "node:assert/strict";
import * as B from "../../src/ring/blkif.ts";
import {
  writeDiscardRequest,
  writeIndirectRequest,
  writeRwRequest,
} from "../../src/ring/request.ts";

const fixture = JSON.parse(
  Deno.readTextFileSync(new URL("./fixtures/blkif_layout.json", import.meta.url)),
);

Deno.test("blkif: sizes, offsets and constants match the Xen headers", () => {
  const o = fixture.offsetof;
  assert.equal(B.SRING_HEADER_BYTES, o.blkif_sring.ring);
  assert.equal(B.SRING_REQ_PROD, o.blkif_sring.req_prod);
  assert.equal(B.SRING_REQ_EVENT, o.blkif_sring.req_event);
  assert.equal(B.SRING_RSP_PROD, o.blkif_sring.rsp_prod);
  assert.equal(B.SRING_RSP_EVENT, o.blkif_sring.rsp_event);
  assert.equal(B.ENTRY_BYTES, fixture.sizeof.blkif_sring_entry);
  assert.equal(B.RESPONSE_BYTES, fixture.sizeof.blkif_response);
  assert.equal(B.SEGMENT_BYTES, fixture.sizeof.blkif_request_segment);
  assert.deepEqual(
    [B.REQ_OPERATION, B.REQ_NR_SEGMENTS, B.REQ_HANDLE, B.REQ_ID, B.REQ_SECTOR_NUMBER, B.REQ_SEG],
    Object.values(o.blkif_request),
  );
  assert.deepEqual(
    [B.SEG_GREF, B.SEG_FIRST_SECT, B.SEG_LAST_SECT],
    Object.values(o.blkif_request_segment),
  );
  assert.deepEqual(
    [
      0,
      B.DISCARD_FLAG,
      B.DISCARD_HANDLE,
      B.DISCARD_ID,
      B.DISCARD_SECTOR_NUMBER,
      B.DISCARD_NR_SECTORS,
    ],
    Object.values(o.blkif_request_discard),
  );
  assert.deepEqual(
    [
      0,
      B.INDIRECT_OP,
      B.INDIRECT_NR_SEGMENTS,
      B.INDIRECT_ID,
      B.INDIRECT_SECTOR_NUMBER,
      B.INDIRECT_HANDLE,
      B.INDIRECT_GREFS,
    ],
    Object.values(o.blkif_request_indirect),
  );
  assert.deepEqual([B.RSP_ID, B.RSP_OPERATION, B.RSP_STATUS], Object.values(o.blkif_response));
  // The last request field ends exactly at the entry size; indirect and discard fit in it.
  assert.equal(
    B.REQ_SEG + B.SEGMENTS_PER_REQUEST_MAX * B.SEGMENT_BYTES,
    fixture.sizeof.blkif_request,
  );
  assert.ok(
    B.INDIRECT_GREFS + 4 * B.INDIRECT_PAGES_PER_REQUEST_MAX <=
      fixture.sizeof.blkif_request_indirect,
  );
  assert.ok(fixture.sizeof.blkif_request_indirect <= B.ENTRY_BYTES);
  const c = fixture.constants;
  assert.deepEqual(
    [B.BLKIF_OP_READ, B.BLKIF_OP_WRITE, B.BLKIF_OP_WRITE_BARRIER, B.BLKIF_OP_FLUSH_DISKCACHE],
    [c.BLKIF_OP_READ, c.BLKIF_OP_WRITE, c.BLKIF_OP_WRITE_BARRIER, c.BLKIF_OP_FLUSH_DISKCACHE],
  );
  assert.deepEqual(
    [B.BLKIF_OP_RESERVED_1, B.BLKIF_OP_DISCARD, B.BLKIF_OP_INDIRECT],
    [c.BLKIF_OP_RESERVED_1, c.BLKIF_OP_DISCARD, c.BLKIF_OP_INDIRECT],
  );
  assert.deepEqual(
    [B.BLKIF_RSP_OKAY, B.BLKIF_RSP_ERROR, B.BLKIF_RSP_EOPNOTSUPP],
    [c.BLKIF_RSP_OKAY, c.BLKIF_RSP_ERROR, c.BLKIF_RSP_EOPNOTSUPP],
  );
  assert.equal(B.SEGMENTS_PER_REQUEST_MAX, c.BLKIF_MAX_SEGMENTS_PER_REQUEST);
  assert.equal(B.INDIRECT_PAGES_PER_REQUEST_MAX, c.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
  assert.equal(B.SEGMENTS_PER_INDIRECT_PAGE, c.SEGS_PER_INDIRECT_FRAME);
  assert.equal(B.BLKIF_DISCARD_SECURE, c.BLKIF_DISCARD_SECURE);
});

Deno.test("blkif: ring entries per ring-page-order (__RING_SIZE)", () => {
  for (const [order, entries] of Object.entries(fixture.ring_entries_by_order)) {
    assert.equal(B.ringEntries(B.ringBytesForOrder(Number(order))), entries);
  }
  assert.throws(() => B.ringBytesForOrder(5));
});

Deno.test("blkif: request encoders put each field at its ABI offset", () => {
  const view = new DataView(new ArrayBuffer(B.ENTRY_BYTES));
  writeRwRequest(view, 0, {
    operation: B.BLKIF_OP_WRITE,
    id: 0x1122334455667788n,
    sector: 0x0102030405,
    handle: 0xbeef,
    segments: [{ gref: 7, firstSect: 1, lastSect: 6 }, {
      gref: 0xdeadbeef,
      firstSect: 0,
      lastSect: 7,
    }],
  });
  const b = new Uint8Array(view.buffer);
  assert.deepEqual([...b.subarray(0, 4)], [1, 2, 0xef, 0xbe]);
  assert.deepEqual([...b.subarray(8, 16)], [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
  assert.deepEqual([...b.subarray(16, 24)], [5, 4, 3, 2, 1, 0, 0, 0]);
  assert.deepEqual([...b.subarray(24, 40)], [
    7,
    0,
    0,
    0,
    1,
    6,
    0,
    0,
    0xef,
    0xbe,
    0xad,
    0xde,
    0,
    7,
    0,
    0,
  ]);
  assert.ok(b.subarray(40).every((x) => x === 0));

  writeDiscardRequest(view, 0, { id: 9n, sector: 3, nrSectors: 0x10000, flag: 1, handle: 2 });
  assert.deepEqual([...b.subarray(0, 4)], [5, 1, 2, 0]);
  assert.equal(view.getBigUint64(24, true), 0x10000n);

  writeIndirectRequest(view, 0, {
    indirectOp: B.BLKIF_OP_READ,
    id: 10n,
    sector: 4,
    nrSegments: 300,
    indirectGrefs: [100, 101],
    handle: 3,
  });
  assert.deepEqual([...b.subarray(0, 4)], [6, 0, 300 & 0xff, 300 >> 8]);
  assert.equal(view.getUint16(24, true), 3);
  assert.deepEqual([view.getUint32(28, true), view.getUint32(32, true), view.getUint32(36, true)], [
    100,
    101,
    0,
  ]);
});
