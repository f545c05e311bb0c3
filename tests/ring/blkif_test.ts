import assert from "node:assert/strict";
import * as B from "../../src/ring/blkif.ts";
import {
  writeDiscardRequest,
  writeIndirectRequest,
  writeRwRequest,
} from "../../src/ring/request.ts";

// The layout against Xen's headers: tests/kernel/abi_test.ts.

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
