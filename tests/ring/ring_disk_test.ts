import assert from "node:assert/strict";
import * as B from "../../src/ring/blkif.ts";
import { TestFrontend } from "../../src/frontends/exercise/test_frontend.ts";
import { testSeed } from "../_helpers/random.ts";
import { MemoryDriver } from "../_helpers/memory_driver.ts";
import { servedRing } from "../_helpers/ring_pair.ts";

/** A disk with a volatile write cache: unflushed writes die with the "process". */
class VolatileDriver extends MemoryDriver {
  journal: { offset: number; data: Uint8Array }[] = [];
  /** Which "process" is running: a write of a crashed one never lands (its process is gone). */
  #epoch = 0;

  protected override async _read(offset: number, buffer: Uint8Array) {
    await super._read(offset, buffer);
    for (const j of this.journal) {
      const from = Math.max(offset, j.offset);
      const to = Math.min(offset + buffer.byteLength, j.offset + j.data.byteLength);
      if (from < to) buffer.set(j.data.subarray(from - j.offset, to - j.offset), from - offset);
    }
  }

  protected override async _write(offset: number, data: Uint8Array) {
    const epoch = this.#epoch;
    await new Promise((r) => setTimeout(r, Math.random() * this.delayMs));
    if (epoch !== this.#epoch) throw new Error("the process died before this write landed");
    this.journal.push({ offset, data: data.slice() });
  }

  protected override _flush() {
    for (const j of this.journal) this.store(j.offset, j.data);
    this.journal = [];
    return super._flush();
  }

  crash(): void {
    this.#epoch += 1;
    this.journal = [];
  }
}

/** A front end and a restartable in-process back end over one buffer. */
function harness(sizeBytes: number, volatileWrites: boolean, ringPages = 4) {
  const driver = new VolatileDriver(sizeBytes, { randomDelay: true });
  const { disk, restart } = servedRing(driver, { ringPages, volatileWrites });
  // What ctrl does when a disk process dies: the old one is gone for good.
  const crash = () => {
    driver.crash();
    restart();
  };
  return { disk, driver, crash };
}

Deno.test("ring disk: an acknowledged write lost with a crashed process is replayed", async () => {
  for (const volatileWrites of [false, true]) {
    const { disk, crash } = harness(1 << 20, volatileWrites);
    const page = disk.pages.allocate(1)!;
    const seg = [{ gref: page, firstSect: 0, lastSect: 7 }];
    disk.pool.fill(0xab, page * B.PAGE_BYTES, (page + 1) * B.PAGE_BYTES);
    assert.equal(await disk.producer.submitRw(B.BLKIF_OP_WRITE, 8, seg), B.BLKIF_RSP_OKAY);
    crash();
    disk.pool.fill(0, page * B.PAGE_BYTES, (page + 1) * B.PAGE_BYTES);
    assert.equal(await disk.producer.submitRw(B.BLKIF_OP_READ, 8, seg), B.BLKIF_RSP_OKAY);
    const expected = volatileWrites ? 0xab : 0; // without the log the write is gone
    assert.equal(
      disk.pool[page * B.PAGE_BYTES + 100],
      expected,
      `volatileWrites=${volatileWrites}`,
    );
  }
});

Deno.test("ring disk: flushed writes leave the replay log", async () => {
  const { disk, driver } = harness(1 << 20, true);
  const page = disk.pages.allocate(1)!;
  const seg = [{ gref: page, firstSect: 0, lastSect: 7 }];
  for (let i = 0; i < 10; i += 1) await disk.producer.submitRw(B.BLKIF_OP_WRITE, i * 8, seg);
  assert.equal(driver.journal.length, 10);
  assert.equal(await disk.producer.submitFlush(), B.BLKIF_RSP_OKAY);
  assert.equal(driver.journal.length, 0);
});

for (const [ringPages, depth] of [[4, 16], [1, 48]]) {
  Deno.test(`ring disk: crashes under verified load lose and repeat nothing (ring ${ringPages} pages, depth ${depth})`, async () => {
    const rng = testSeed("ring disk crashes");
    const { disk, driver, crash } = harness(8 << 20, true, ringPages);
    driver.delayMs = 2;
    const load = new TestFrontend(disk, {
      durationMs: 3000,
      depth,
      indirectFraction: 0.05,
      flushFraction: 0.01,
      seed: rng.int(0, 2 ** 31),
    }).run();
    let crashes = 0;
    let done = false;
    load.finally(() => done = true);
    while (!done) {
      await new Promise((r) => setTimeout(r, rng.int(20, 200)));
      if (!done) {
        crash();
        crashes += 1;
      }
    }
    const result = await load;
    console.log(
      `crashes: ${crashes}, requests: ${result.requests}, verified sectors: ${result.verifiedSectors}`,
    );
    assert.ok(crashes > 5);
    assert.equal(result.errors, 0, result.firstError);
    assert.equal(result.mismatches, 0, result.firstError);
    assert.ok(result.verifiedSectors > 0);
    assert.equal(disk.outstanding, 0);
  });
}
