import assert from "node:assert/strict";
import type { Extent } from "../../src/formats/driver.ts";
import { KnownZeros, misses_per_retry, overtaking_ranges_max } from "../../src/ring/known_zeros.ts";
import { MemoryDriver } from "../_helpers/memory_driver.ts";
import { testSeed } from "../_helpers/random.ts";
import { servedRing } from "../_helpers/ring_pair.ts";

const hole = (offsetBytes: number, lengthBytes: number): Extent => ({
  offsetBytes,
  lengthBytes,
  hole: true,
  zero: true,
});
const data = (offsetBytes: number, lengthBytes: number): Extent => ({
  offsetBytes,
  lengthBytes,
  hole: false,
  zero: false,
});

Deno.test("known zeros: only whole granules of unallocated zero extents are learned", () => {
  const size = (1 << 20) + 512; // a short last granule
  const zeros = new KnownZeros(size);
  const query = zeros.missed(0)!;
  assert.deepEqual([query.offsetBytes, query.lengthBytes], [0, size]);
  zeros.learn(query, [
    data(0, 4096),
    hole(4096, 6144), // ends inside a granule
    { offsetBytes: 10240, lengthBytes: 10240, hole: false, zero: true }, // allocated zeros
    hole(20480, size - 20480), // reaches the short last granule
  ]);
  assert.equal(zeros.covers(0, 4096), false);
  assert.equal(zeros.covers(4096, 4096), true);
  assert.equal(zeros.covers(4096, 4097), false);
  assert.equal(zeros.covers(12288, 512), false);
  assert.equal(zeros.covers(24576, size - 24576), true);
  assert.equal(zeros.covers(size - 512, 512), true);
  assert.equal(zeros.missed(4096), undefined, "a window is asked once");
});

Deno.test("known zeros: a modification forgets its granules before it is issued", () => {
  const zeros = new KnownZeros(1 << 20);
  zeros.learn(zeros.missed(0)!, [hole(0, 1 << 20)]);
  const done = zeros.modify(5000, 100);
  assert.equal(zeros.covers(4096, 512), false);
  assert.equal(zeros.covers(0, 4096), true);
  assert.equal(zeros.covers(8192, 4096), true);
  done();
  zeros.modify(0, 1 << 20)();
  assert.equal(zeros.covers(8192, 4096), false);
});

Deno.test("known zeros: where a modification may have overtaken an answer, it is not learned", () => {
  const zeros = new KnownZeros(1 << 20);
  // In flight when asked, and issued before the answer came: those ranges stay unknown.
  const inFlight = zeros.modify(0, 4096);
  const query = zeros.missed(0)!;
  zeros.modify(8192, 4096)();
  inFlight();
  zeros.learn(query, [hole(0, 1 << 20)]);
  assert.equal(zeros.covers(0, 4096), false);
  assert.equal(zeros.covers(8192, 4096), false);
  assert.equal(zeros.covers(4096, 4096), true);
  assert.equal(zeros.covers(12288, 4096), true);
  // Too many to remember: dropped, and the next query waits for more misses.
  zeros.reset(1 << 20);
  const crowded = zeros.missed(0)!;
  for (let i = 0; i <= overtaking_ranges_max; i++) zeros.modify(i * 4096, 512)();
  zeros.learn(crowded, [hole(0, 1 << 20)]);
  assert.equal(zeros.covers(1 << 19, 4096), false);
  for (let i = 1; i < misses_per_retry; i++) assert.equal(zeros.missed(0), undefined);
  const again = zeros.missed(0)!;
  zeros.learn(again, [hole(0, 1 << 20)]);
  assert.equal(zeros.covers(1 << 19, 4096), true);
  // A reset (another disk process, maybe another image) drops what was known and asked.
  const stale = zeros.asking(0, 4096)!;
  zeros.reset(1 << 20);
  zeros.learn(stale, [hole(0, 4096)]);
  assert.equal(zeros.covers(0, 4096), false);
});

Deno.test("known zeros: the bitmap stays bounded on a huge disk", () => {
  const zeros = new KnownZeros(2 ** 50);
  assert.equal(zeros.granuleBytes, 2 ** 50 / 2 ** 24);
  zeros.learn(zeros.asking(0, 2 ** 40)!, [hole(0, 2 ** 40)]);
  assert.equal(zeros.covers(2 ** 39, 4096), true);
  assert.equal(zeros.covers(2 ** 40, 4096), false);
});

/** A memory disk counting the reads that reach it. */
class CountingDriver extends MemoryDriver {
  reads = 0;
  protected override _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    this.reads++;
    return super._read(offsetBytes, buffer);
  }
}

Deno.test("ring disk: reads of space the disk process called zeros do not cross the ring", async () => {
  const driver = new CountingDriver(8 << 20);
  const { disk } = servedRing(driver);
  await disk.write(1 << 20, new Uint8Array(4096).fill(7));
  const buffer = new Uint8Array(4096);
  await disk.read(4 << 20, buffer); // misses and learns
  const before = driver.reads;
  for (let i = 0; i < 10; i++) await disk.read((2 << 20) + i * 8192, buffer.fill(1));
  assert.deepEqual(buffer, new Uint8Array(4096));
  assert.equal(driver.reads, before);
  await disk.read(1 << 20, buffer);
  assert.equal(buffer[0], 7);
  assert.equal(driver.reads, before + 1);
  // A client's block status of known zeros is answered here too.
  assert.deepEqual(await disk.blockStatus(2 << 20, 4096), [hole(2 << 20, 4096)]);
});

Deno.test("ring disk: another image behind the ring is read, not what was known of the last", async () => {
  const first = new MemoryDriver(1 << 20);
  const { disk, restart } = servedRing(first);
  const buffer = new Uint8Array(4096);
  await disk.read(0, buffer);
  await disk.read(0, buffer);
  const second = new MemoryDriver(1 << 20);
  second.store(0, new Uint8Array(1 << 20).fill(9));
  restart(second);
  await disk.read(8192, buffer);
  assert.equal(buffer[0], 9);
});

for (const writeFirst of [false, true]) {
  Deno.test(`ring disk: an answer racing a slow write does not hide it (write issued ${writeFirst ? "before" : "after"} the asking read)`, async () => {
    const driver = new MemoryDriver(4 << 20, { delayMs: 20 });
    const { disk } = servedRing(driver);
    const buffer = new Uint8Array(4096);
    const write = () => disk.write(1 << 20, new Uint8Array(4096).fill(5));
    const requests = writeFirst ? [write(), disk.read(0, buffer)] : [disk.read(0, buffer), write()];
    await Promise.all(requests);
    await disk.read(1 << 20, buffer);
    assert.equal(buffer[0], 5);
  });
}

// Concurrent reads, writes, discards and block status against a model; each
// round's requests use disjoint ranges so the model is exact, and slow
// writes let answers race them (learning across a write must not happen).
// Disk-process restarts mid-round make the whole disk be asked again.
Deno.test("ring disk: known zeros agree with the disk under random concurrent requests", async () => {
  const rng = testSeed("known zeros");
  const size = 4 << 20;
  const driver = new CountingDriver(size, { delayMs: 3, randomDelay: true });
  const { disk, restart } = servedRing(driver);
  const model = new Uint8Array(size);
  let reads = 0;
  for (let round = 0; round < 150; round++) {
    const slots = rng.int(1, 8);
    const slotBytes = size / 8;
    const order = [0, 1, 2, 3, 4, 5, 6, 7].sort(() => rng.next() - 0.5).slice(0, slots);
    const checks: Promise<void>[] = [];
    for (const slot of order) {
      const length = rng.pick([512, 4096, 12288, 65536]);
      // Few distinct places, so later requests meet earlier ones.
      const place = rng.int(0, 7) * (64 << 10) + rng.pick([0, 512, 4096]);
      const offset = slot * slotBytes + Math.min(place, slotBytes - length);
      const op = rng.pick(["read", "read", "read", "write", "zeroes", "trim", "status"]);
      if (op === "write") {
        const bytes = rng.bytes(length);
        model.set(bytes, offset);
        checks.push(disk.write(offset, bytes));
      } else if (op === "zeroes") {
        model.fill(0, offset, offset + length);
        checks.push(disk.writeZeroes(offset, length, { mayTrim: true }));
      } else if (op === "trim") {
        model.fill(0, offset, offset + length); // the memory disk's discard zeroes
        checks.push(disk.discard(offset, length));
      } else if (op === "status") {
        checks.push(
          disk.blockStatus(offset, length).then((extents) => {
            for (const e of extents) {
              if (!e.zero) continue;
              const bytes = model.subarray(e.offsetBytes, e.offsetBytes + e.lengthBytes);
              assert.ok(bytes.every((b) => b === 0), `zero extent at ${e.offsetBytes} has data`);
            }
          }),
        );
      } else {
        const expected = model.slice(offset, offset + length);
        reads++;
        checks.push((async () => {
          const buffer = new Uint8Array(length).fill(0xee);
          await disk.read(offset, buffer);
          assert.deepEqual(buffer, expected, `read ${offset}+${length} in round ${round}`);
        })());
      }
    }
    if (rng.next() < 0.1) restart();
    await Promise.all(checks);
  }
  assert.ok(driver.reads < reads, `${driver.reads} of ${reads} reads reached the disk`);
});
