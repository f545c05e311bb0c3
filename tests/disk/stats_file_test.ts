/**
 * The stats file: counts made through one mapping are seen through another
 * (the disk process counts, ctrl reads), they stay after the counting side
 * is gone, a reset starts a new generation from zero, and a file that is
 * not a stats file is refused.
 */
import assert from "node:assert/strict";
import { addTotals, emptyTotals, quantileUs } from "../../src/disk/counters.ts";
import { stats_file_bytes, StatsFile } from "../../src/disk/stats_file.ts";

Deno.test("stats file: counts cross mappings, outlive the counter, reset by generation", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-stats-" });
  try {
    const path = `${dir}/minor.stats`;
    const ctrlSide = StatsFile.create(path, 1);
    assert.equal((await Deno.stat(path)).mode! & 0o777, 0o600);
    const diskSide = StatsFile.open(path);
    diskSide.pid = 4242;
    for (let i = 0; i < 10; i += 1) diskSide.counters.complete("read", 4096, 100, true);
    diskSide.counters.complete("write", 512, 3, false);
    diskSide.counters.rejected();
    diskSide.counters.inflight = 3;
    diskSide.close(); // the disk process is gone

    const seen = ctrlSide.counters.totals();
    assert.equal(seen.ops.read, 10);
    assert.equal(seen.ops.write, 1);
    assert.equal(seen.bytesRead, 40960);
    assert.equal(seen.bytesWritten, 0, "a failed write moved nothing");
    assert.deepEqual([seen.errors, seen.invalid], [2, 1]);
    assert.equal(seen.latencyHistogram.reduce((a, b) => a + b, 0), 11);
    assert.deepEqual([ctrlSide.pid, ctrlSide.generation, ctrlSide.counters.inflight], [4242, 1, 3]);

    const sum = addTotals(seen, seen);
    assert.deepEqual([sum.ops.read, sum.errors, sum.invalid], [20, 4, 2]);
    assert.equal(quantileUs(sum.latencyHistogram, 0.5), 128);
    assert.deepEqual(addTotals(emptyTotals(), seen), seen);

    ctrlSide.reset(2);
    const again = StatsFile.open(path);
    assert.deepEqual(again.counters.totals(), emptyTotals());
    assert.deepEqual([again.generation, again.pid], [2, 0]);
    again.close();
    ctrlSide.close();

    const stranger = `${dir}/other`;
    await Deno.writeFile(stranger, new Uint8Array(stats_file_bytes).fill(7), { mode: 0o600 });
    assert.throws(() => StatsFile.open(stranger), /stats file/);
    await Deno.writeFile(stranger, new Uint8Array(100));
    assert.throws(() => StatsFile.open(stranger), /stats file/);
    const replaced = StatsFile.openOrCreate(stranger, 5);
    assert.equal(replaced.generation, 5);
    replaced.close();
    // A file others may read or write is not ours to replace: refused, left as it is.
    await Deno.chmod(stranger, 0o644);
    assert.throws(() => StatsFile.openOrCreate(stranger, 6), /stats file .* has mode 0644/);
    assert.equal((await Deno.stat(stranger)).mode! & 0o777, 0o644);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
