/**
 * BLOCK_STATUS over the ring, in process: RingDisk (ctrl's front end) asks
 * a DiskServer, which answers from its driver. The driver itself and
 * `qemu-img map` are the oracles.
 */
import assert from "node:assert/strict";
import { block_status_requests_per_call_max } from "../../src/ring/ring_disk.ts";
import type { BlockDriver, DriverCapabilities, Extent } from "../../src/formats/driver.ts";
import { openImage } from "../../src/formats/open_image.ts";
import { createQcow } from "../../src/formats/qcow/create.ts";
import { block_status_extents_per_page_max } from "../../src/ring/block_status.ts";
import { missingTools } from "../_helpers/tools.ts";
import { qemuMap } from "../_helpers/qemu.ts";
import { MemoryDriver } from "../_helpers/memory_driver.ts";
import { servedRing } from "../_helpers/ring_pair.ts";

const KiB = 1024;
const MiB = 1 << 20;
const data = { hole: false, zero: false };
const hole = { hole: true, zero: true };

/** Front end and a restartable back end over one buffer, kicks as calls. */
function pair(driver: BlockDriver, readOnly = false) {
  return servedRing(driver, { readOnly, poolPages: 1024 });
}

/** Extents every `stepBytes`, alternating data and hole (worst case for a page). */
class StripedDriver extends MemoryDriver {
  override readonly capabilities: DriverCapabilities = {
    canWrite: true,
    canFlush: true,
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

/** A fresh 32 MiB qcow image in a temporary folder, served over a ring pair. */
async function withQcowRing(
  body: (path: string, driver: BlockDriver, ring: ReturnType<typeof pair>) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-bs-" });
  try {
    const path = `${dir}/disk.qcow`;
    await createQcow(path, { sizeBytes: 32 * MiB });
    const driver = await openImage(`qcow:${path}`, { cache: "writeback" });
    try {
      const ring = pair(driver);
      await ring.disk.write(0, new Uint8Array(64 * KiB).fill(0x11));
      await ring.disk.write(20 * MiB, new Uint8Array(MiB).fill(0x22));
      await body(path, driver, ring);
    } finally {
      await driver.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("ring block status: a qcow image before its flush, answered by the disk process", async () => {
  await withQcowRing(async (_path, driver, { disk, server }) => {
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
  });
});

Deno.test({
  name: "ring block status: a flushed qcow image's extents over the ring are qemu-img map's",
  ignore: missingTools("qemu-img").length > 0,
  async fn() {
    await withQcowRing(async (path, _driver, { disk }) => {
      await disk.write(30 * MiB + 4 * KiB, new Uint8Array(4 * KiB).fill(0x33));
      await disk.flush();
      const qemu = (await qemuMap(path, "qcow")).map((m) => ({
        offsetBytes: m.start,
        lengthBytes: m.length,
        hole: !m.data,
        zero: m.zero,
      }));
      assert.equal(qemu.filter((e) => !e.hole).length, 3, JSON.stringify(qemu));
      assert.deepEqual(await disk.blockStatus(0, 32 * MiB), qemu, "qemu-img map agrees");
    });
  },
});

Deno.test("ring block status: a driver without extents says so when served; all data, never asked", async () => {
  const { disk, server } = pair(new MemoryDriver(4 * MiB, { extents: false }));
  assert.equal(disk.capabilities.canExtents, false, "front ends do not ask");
  const whole = [{ offsetBytes: 512, lengthBytes: 3 * MiB, ...data }];
  assert.deepEqual(await disk.blockStatus(512, 3 * MiB), whole);
  assert.equal(server().stats().ops["block-status"] ?? 0, 0, "the disk process was not asked");
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
