import assert from "node:assert/strict";
import type { DiskServer } from "../../src/disk/disk_server.ts";
import { TestFrontend } from "../../src/frontends/exercise/test_frontend.ts";
import { testSeed } from "../_helpers/random.ts";
import { MemoryDriver } from "../disk/_memory_driver.ts";
import { ringPair } from "../disk/_ring_pair.ts";

/**
 * A front end and a restartable in-process back end over one driver. The
 * driver outlives a "crash", as an image file outlives its disk process:
 * what it answered is kept, what was in flight is re-issued.
 */
function harness(sizeBytes: number, ringPages = 4) {
  const driver = new MemoryDriver(sizeBytes);
  const { disk, serve } = ringPair("t", driver, sizeBytes, { ringPages });
  let server: DiskServer;
  const start = () => {
    server = serve();
    disk.attach(() => server.kick(), sizeBytes);
  };
  start();
  // What ctrl does when a disk process dies: the old one is gone for good.
  const crash = () => {
    server.stop();
    disk.detach();
    disk.rearm();
    start();
  };
  return { disk, driver, crash };
}

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
