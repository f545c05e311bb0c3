/**
 * BLOCK_STATUS over the ring, in process: RingDisk (ctrl's front end) asks
 * a DiskServer, which answers from its driver. The driver itself and
 * `qemu-img map` are the oracles.
 */
import assert from "node:assert/strict";
import * as B from "../../src/ring/blkif.ts";
import { DiskServer } from "../../src/disk/disk_server.ts";
import { block_status_requests_per_call_max, RingDisk } from "../../src/ring/ring_disk.ts";
import type { BlockDriver, DriverCapabilities, Extent } from "../../src/formats/driver.ts";
import { openImage } from "../../src/formats/open_image.ts";
import { createQcow } from "../../src/formats/qcow/create.ts";
import { block_status_extents_per_page_max } from "../../src/ring/block_status.ts";
import { hasTool, runOk } from "../_helpers/tools.ts";
import { MemoryDriver } from "./_memory_driver.ts";

const KiB = 1024;
const MiB = 1 << 20;
const noFence = () => {};
const data = { hole: false, zero: false };
const hole = { hole: true, zero: true };

/** Front end and a restartable back end over one buffer, kicks as calls. */
function pair(driver: BlockDriver, readOnly = false) {
  const ringPages = 4;
  const memory = new Uint8Array((ringPages + 1024) * B.PAGE_BYTES);
  const ring = memory.subarray(0, ringPages * B.PAGE_BYTES);
  const pool = memory.subarray(ringPages * B.PAGE_BYTES);
  const sizeBytes = driver.sizeBytes;
  const disk = new RingDisk("bs", { ring, pool }, { fence: noFence, readOnly, sizeBytes });
  const start = (serving: BlockDriver) => {
    const server = new DiskServer({
      ring,
      pool,
      fence: noFence,
      driver: serving,
      readOnly,
      notify: () => disk.onKick(),
    });
    disk.attach(() => server.kick(), sizeBytes);
    return server;
  };
  let server = start(driver);
  // What ctrl does when a disk process dies; `serving` is the new process's driver.
  const restart = (serving: BlockDriver) => {
    server.stop();
    disk.detach();
    disk.rearm();
    server = start(serving);
  };
  return { disk, server: () => server, restart };
}

/** Extents every `stepBytes`, alternating data and hole (worst case for a page). */
class StripedDriver extends MemoryDriver {
  override readonly capabilities: DriverCapabilities = {
    canWrite: true,
    canFlush: true,
    canFua: false,
    canDiscard: true,
    canZero: false,
    canExtents: true,
    canMultiConn: true,
  };
  calls = 0;
  /** While set, block status waits for it (a disk process that never answers). */
  stall: Promise<void> | undefined;

  constructor(sizeBytes: number, readonly stepBytes: number) {
    super(sizeBytes);
  }

  protected override async _blockStatus(offsetBytes: number, lengthBytes: number) {
    this.calls += 1;
    if (this.stall) await this.stall;
    const extents: Extent[] = [];
    const end = offsetBytes + lengthBytes;
    for (let at = offsetBytes; at < end;) {
      const index = Math.floor(at / this.stepBytes);
      const stop = Math.min(end, (index + 1) * this.stepBytes);
      extents.push({ offsetBytes: at, lengthBytes: stop - at, ...(index % 2 ? hole : data) });
      at = stop;
    }
    return extents;
  }
}

function assertConsecutive(extents: Extent[], offsetBytes: number): number {
  let at = offsetBytes;
  for (const e of extents) {
    assert.equal(e.offsetBytes, at);
    assert.ok(e.lengthBytes > 0);
    at += e.lengthBytes;
  }
  return at;
}

Deno.test("ring block status: a raw file's holes, as its driver sees them", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-bs-" });
  try {
    const path = `${dir}/disk.raw`;
    const file = await Deno.open(path, { create: true, write: true });
    await file.truncate(8 * MiB);
    await file.write(new Uint8Array(64 * KiB).fill(1));
    await file.seek(4 * MiB, Deno.SeekMode.Start);
    await file.write(new Uint8Array(MiB).fill(2));
    file.close();
    const driver = await openImage(`sync:${path}`, { cache: "writeback" });
    try {
      const { disk } = pair(driver);
      assert.equal(disk.capabilities.canExtents, true);
      for (const [offset, length] of [[0, 8 * MiB], [1000, 5 * MiB], [4 * MiB + 512, 700]]) {
        const ring = await disk.blockStatus(offset, length);
        assert.deepEqual(ring, await driver.blockStatus(offset, length), `${offset}+${length}`);
      }
      const all = await disk.blockStatus(0, 8 * MiB);
      assert.deepEqual(all.filter((e) => !e.hole).map((e) => [e.offsetBytes, e.lengthBytes]), [
        [0, 64 * KiB],
        [4 * MiB, MiB],
      ]);
      assert.equal(disk.pages.freePages, disk.pages.pages, "the query page went back");
    } finally {
      await driver.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("ring block status: a qcow image before its flush, then as qemu-img maps it", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-bs-" });
  try {
    const path = `${dir}/disk.qcow`;
    await createQcow(path, { sizeBytes: 32 * MiB });
    const driver = await openImage(`qcow:${path}`, { cache: "writeback" });
    try {
      const { disk, server } = pair(driver);
      await disk.write(0, new Uint8Array(64 * KiB).fill(0x11));
      await disk.write(20 * MiB, new Uint8Array(MiB).fill(0x22));
      // L2 tables are still only in the disk process's cache: only it can
      // answer. Where a write lands beyond its own clusters is the layout's
      // business (whole 2 MiB extents or single clusters): bound it by both.
      const before = await disk.blockStatus(0, 32 * MiB);
      assert.deepEqual(before, await driver.blockStatus(0, 32 * MiB));
      const dataRuns = before.filter((e) => !e.hole).map((e) => [e.offsetBytes, e.lengthBytes]);
      const outer = [[0, 2 * MiB], [20 * MiB, 2 * MiB]];
      assert.equal(dataRuns.length, 2, JSON.stringify(before));
      for (const [i, [at, length]] of dataRuns.entries()) {
        assert.equal(at, outer[i][0], "data starts where written");
        assert.ok(length >= [64 * KiB, MiB][i] && length <= outer[i][1], JSON.stringify(before));
      }
      assert.equal(server().stats().ops["block-status"], 1);
      await disk.flush();
      if (hasTool("qemu-img")) {
        const map = JSON.parse(await runOk("qemu-img", ["map", "-U", "--output=json", path])) as {
          start: number;
          length: number;
          data: boolean;
          zero: boolean;
        }[];
        const qemu = map.map((m) => ({
          offsetBytes: m.start,
          lengthBytes: m.length,
          hole: !m.data,
          zero: m.zero,
        }));
        assert.deepEqual(await disk.blockStatus(0, 32 * MiB), qemu, "qemu-img map agrees");
      } else console.log("qemu-img missing: the QEMU comparison is skipped");
    } finally {
      await driver.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("ring block status: a driver without extents answers EOPNOTSUPP once; all data", async () => {
  const { disk, server } = pair(new MemoryDriver(4 * MiB));
  assert.equal(disk.capabilities.canExtents, true);
  const whole = [{ offsetBytes: 512, lengthBytes: 3 * MiB, ...data }];
  assert.deepEqual(await disk.blockStatus(512, 3 * MiB), whole);
  assert.equal(disk.capabilities.canExtents, false, "front ends stop asking");
  assert.deepEqual(await disk.blockStatus(512, 3 * MiB), whole);
  assert.equal(server().stats().ops["block-status"], 1, "asked the disk process once");
});

Deno.test("ring block status: more extents than a page loops, then answers short", async () => {
  const driver = new StripedDriver(64 * MiB, 4 * KiB);
  const { disk } = pair(driver, true);
  const perPage = block_status_extents_per_page_max;
  // 300 extents: two requests, full coverage, from an unaligned start.
  const some = await disk.blockStatus(1000, 300 * 4 * KiB - 1000);
  assert.equal(assertConsecutive(some, 1000), 300 * 4 * KiB);
  assert.equal(some.length, 300);
  assert.equal(driver.calls, 2);
  // The whole disk: the bound on requests per call stops it, short but true.
  const many = await disk.blockStatus(0, 64 * MiB);
  const reached = assertConsecutive(many, 0);
  assert.equal(many.length, block_status_requests_per_call_max * perPage);
  assert.equal(reached, many.length * 4 * KiB);
  many.forEach((e, i) => assert.equal(e.hole, i % 2 === 1, `extent ${i}`));
  // Inside one sector: still from the byte asked about.
  assert.deepEqual(await disk.blockStatus(4 * KiB + 7, 9), [
    { offsetBytes: 4 * KiB + 7, lengthBytes: 9, ...hole },
  ]);
});

Deno.test("ring block status: a request in flight when the disk process dies is re-issued", async () => {
  const dead = new StripedDriver(8 * MiB, 64 * KiB);
  dead.stall = new Promise(() => {}); // the dying process never answers
  const { disk, restart } = pair(dead);
  const answer = disk.blockStatus(0, 256 * KiB);
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(dead.calls, 1);
  assert.equal(disk.outstanding, 1);
  const successor = new StripedDriver(8 * MiB, 64 * KiB);
  restart(successor);
  assert.deepEqual(await answer, [
    { offsetBytes: 0, lengthBytes: 64 * KiB, ...data },
    { offsetBytes: 64 * KiB, lengthBytes: 64 * KiB, ...hole },
    { offsetBytes: 128 * KiB, lengthBytes: 64 * KiB, ...data },
    { offsetBytes: 192 * KiB, lengthBytes: 64 * KiB, ...hole },
  ]);
  assert.equal(successor.calls, 1, "the same query, asked again");
  assert.equal(disk.outstanding, 0);
});

Deno.test("ring block status: a failed disk answers EIO", async () => {
  const { disk } = pair(new StripedDriver(MiB, 4 * KiB));
  disk.fail();
  await assert.rejects(() => disk.blockStatus(0, MiB), /block status failed/);
});
