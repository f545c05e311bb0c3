import assert from "node:assert/strict";
import * as B from "../../src/ring/blkif.ts";
import { fuzzRing, MALFORMATIONS } from "../../src/frontends/exercise/malformed.ts";
import { TestFrontend } from "../../src/frontends/exercise/test_frontend.ts";
import { testSeed } from "../_helpers/random.ts";
import { MemoryDriver } from "../_helpers/memory_driver.ts";
import { servedRing } from "../_helpers/ring_pair.ts";

function pair(sizeBytes: number, readOnly = false) {
  const driver = new MemoryDriver(sizeBytes);
  const { disk, server } = servedRing(driver, { readOnly, poolPages: 2048 });
  return { disk, server: server(), driver };
}

Deno.test("disk validation: 100,000 malformed entries are refused while valid load keeps verifying", async () => {
  const rng = testSeed("malformed fuzz");
  const { disk, server, driver } = pair(8 << 20);
  const before = driver.contents();
  const fuzz = await fuzzRing(disk, 100_000, 32, () => rng.next());
  assert.equal(fuzz.entries, 100_000);
  assert.equal(fuzz.acceptedMalformed, 0, fuzz.firstWrong);
  assert.equal(fuzz.wrongStatus, 0, fuzz.firstWrong);
  for (const kind of MALFORMATIONS) assert.ok(fuzz.byKind[kind] > 1000, `${kind} exercised`);
  assert.deepEqual(driver.contents(), before, "no malformed request touched the disk");
  assert.equal(server.stats().invalid, 100_000);
  // Interleaved: fuzz and a verified load at the same time.
  const [load, again] = await Promise.all([
    new TestFrontend(disk, {
      requests: 5000,
      depth: 16,
      indirectFraction: 0.1,
      seed: rng.int(0, 2 ** 31),
    }).run(),
    fuzzRing(disk, 20_000, 16, () => rng.next()),
  ]);
  assert.equal(again.wrongStatus, 0, again.firstWrong);
  assert.equal(load.errors, 0, load.firstError);
  assert.equal(load.mismatches, 0, load.firstError);
});

Deno.test("disk validation: writes and discards on a read-only disk are refused, reads served", async () => {
  const { disk } = pair(1 << 20, true);
  const page = disk.pages.allocate(1)!;
  const segment = [{ gref: page, firstSect: 0, lastSect: 7 }];
  assert.equal(await disk.producer.submitRw(B.BLKIF_OP_WRITE, 0, segment), B.BLKIF_RSP_ERROR);
  assert.equal(await disk.producer.submitDiscard(0, 8), B.BLKIF_RSP_ERROR);
  assert.equal(await disk.producer.submitRw(B.BLKIF_OP_READ, 0, segment), B.BLKIF_RSP_OKAY);
  assert.equal(await disk.producer.submitFlush(), B.BLKIF_RSP_OKAY);
});

Deno.test("disk validation: a fuzz run fails, naming the entry, when a disk stops answering", async () => {
  const rng = testSeed("fuzz watchdog");
  const { disk, server } = pair(1 << 20);
  await server.pause(); // a disk process that takes requests and never answers
  await assert.rejects(
    () => fuzzRing(disk, 100, 4, () => rng.next(), 200),
    /malformed entry \d+ \([a-z0-9-]+\) unanswered after 200 ms/,
  );
});
