import assert from "node:assert/strict";
import * as B from "../../src/ring/blkif.ts";
import { TestFrontend } from "../../src/frontends/exercise/test_frontend.ts";
import { testSeed } from "../_helpers/random.ts";
import { MemoryDriver } from "../_helpers/memory_driver.ts";
import { servedRing } from "../_helpers/ring_pair.ts";

/**
 * A disk whose answered writes outlive its "process", as an image file
 * outlives a killed disk process (every driver's crash contract): a write
 * still in flight when the process dies never lands; ctrl re-issues it.
 */
class ProcessDriver extends MemoryDriver {
  /** Which "process" is running. */
  #epoch = 0;

  protected override async _write(offset: number, data: Uint8Array) {
    const epoch = this.#epoch;
    await new Promise((r) => setTimeout(r, Math.random() * this.delayMs));
    if (epoch !== this.#epoch) throw new Error("the process died before this write landed");
    this.store(offset, data);
  }

  crash(): void {
    this.#epoch += 1;
  }
}

/** A front end and a restartable in-process back end over one driver. */
function harness(sizeBytes: number, ringPages = 4) {
  const driver = new ProcessDriver(sizeBytes, { randomDelay: true });
  const { disk, restart } = servedRing(driver, { ringPages });
  // What ctrl does when a disk process dies: the old one is gone for good.
  const crash = () => {
    driver.crash();
    restart();
  };
  return { disk, driver, crash };
}

Deno.test("ring disk: an answered write outlives its disk process; nothing is kept or replayed", async () => {
  const { disk, crash } = harness(1 << 20);
  const page = disk.pages.allocate(1)!;
  const seg = [{ gref: page, firstSect: 0, lastSect: 7 }];
  disk.pool.fill(0xab, page * B.PAGE_BYTES, (page + 1) * B.PAGE_BYTES);
  assert.equal(await disk.producer.submitRw(B.BLKIF_OP_WRITE, 8, seg), B.BLKIF_RSP_OKAY);
  crash();
  disk.pool.fill(0, page * B.PAGE_BYTES, (page + 1) * B.PAGE_BYTES);
  assert.equal(await disk.producer.submitRw(B.BLKIF_OP_READ, 8, seg), B.BLKIF_RSP_OKAY);
  assert.equal(disk.pool[page * B.PAGE_BYTES + 100], 0xab);
  assert.equal(disk.outstanding, 0);
});

for (const [ringPages, depth] of [[4, 16], [1, 48]]) {
  Deno.test(`ring disk: crashes under verified load lose and repeat nothing (ring ${ringPages} pages, depth ${depth})`, async () => {
    const rng = testSeed("ring disk crashes");
    const { disk, driver, crash } = harness(8 << 20, ringPages);
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
