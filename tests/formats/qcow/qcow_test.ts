import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { createQcow } from "../../../src/formats/qcow/create.ts";
import { QcowDriver } from "../../../src/formats/qcow/qcow.ts";
import { checkQcow } from "../../../src/formats/qcow/check.ts";
import { qcowInfo } from "../../../src/formats/qcow/format.ts";
import {
  decodeEntry,
  decodeHeader,
  encodeHeader,
  l1Checksum,
  QcowFormatError,
} from "../../../src/formats/qcow/header.ts";
import { testSeed } from "../../_helpers/random.ts";
import { blktap, runOk } from "../../_helpers/tools.ts";
import {
  assertQemuSees,
  firstDifference,
  inTempDir,
  noQemu,
  ourDataRanges,
  qemuConvertToQcow,
  qemuCreateOver,
  qemuDataRanges,
  randomWrite,
  readAll,
  writeData,
  writeRandomly,
} from "./_util.ts";

const disk_bytes = 24 << 20;

Deno.test("qcow header: encode/decode round trip and validation", () => {
  const head = new Uint8Array(4096);
  encodeHeader({
    sizeBytes: 10 * 2 ** 30,
    clusterBits: 12,
    l2Bits: 9,
    l1TableOffset: 4096,
    xen: { checksum: 0x12345678, minClusterAlloc: 512, flags: 3 },
  }, head);
  const h = decodeHeader("x", head, 1 << 20);
  assert.equal(h.sizeBytes, 10 * 2 ** 30);
  assert.equal(h.l1Entries, 5120);
  assert.deepEqual(h.xen, { checksum: 0x12345678, minClusterAlloc: 512, flags: 3 });
  const bad = (mutate: (v: DataView) => void, pattern: RegExp) => {
    const copy = head.slice();
    mutate(new DataView(copy.buffer));
    assert.throws(() => decodeHeader("x", copy, 1 << 20), (e) => {
      assert.ok(e instanceof QcowFormatError);
      assert.match(e.message, pattern);
      return true;
    });
  };
  bad((v) => v.setUint32(36, 1), /encrypted/);
  bad((v) => v.setUint8(32, 17), /cluster_bits/);
  bad((v) => v.setUint8(33, 14), /l2_bits/);
  bad((v) => v.setUint32(4, 2), /version 2/);
  bad((v) => v.setUint32(24, 0xffffffff), /too large|virtual size/);
  bad((v) => v.setUint32(44, 1 << 30), /past the end/);
  assert.throws(() => decodeHeader("x", head, 40), /too short/);
  // Compressed entries: offset and size as QEMU packs them.
  const size = 1234, offset = 987654;
  const value = (1n << 63n) | (BigInt(size) << 51n) | BigInt(offset);
  const e = decodeEntry(Number(value >> 32n), Number(value & 0xffffffffn), 12);
  assert.deepEqual(e, { offsetBytes: offset, compressed: true, compressedBytes: size });
});

Deno.test("qcow: blktap's L1 checksum is the 2006 tapdisk's gen_cksum (MD5, first four bytes as an x86 u32)", async () => {
  // Known MD5 digests: of 8 zero bytes 7dea362b..., of 32 zero bytes 70bc8f4b...
  assert.equal(l1Checksum(new Uint8Array(8)), 0x2b36ea7d);
  assert.equal(l1Checksum(new Uint8Array(32)), 0x4b8fbc70);
  // An image we create and write: the stored checksum is md5sum's digest of its L1 table.
  await inTempDir(async (dir) => {
    const image = `${dir}/c.qcow`;
    await createQcow(image, { sizeBytes: 64 << 20 });
    const driver = await openImage(image);
    await driver.write(5 << 20, new Uint8Array(4096).fill(1));
    await driver.write(40 << 20, new Uint8Array(4096).fill(2));
    await driver.close();
    const bytes = await Deno.readFile(image);
    const l1Bytes = bytes.subarray(4096, 4096 + 32 * 8);
    assert.ok(l1Bytes.some((b) => b !== 0), "the L1 table has entries");
    await Deno.writeFile(`${dir}/l1.bin`, l1Bytes);
    const digest = (await runOk("md5sum", [`${dir}/l1.bin`])).slice(0, 8);
    const littleEndian = digest.match(/../g)!.reverse().join("");
    const stored = new DataView(bytes.buffer).getUint32(52);
    assert.equal(stored.toString(16).padStart(8, "0"), littleEndian);
  });
});

/** Random writes through our driver against a model; QEMU must agree. */
async function randomWritesAgainstModel(
  dir: string,
  image: string,
  model: Uint8Array,
  name: string,
  writes: number,
  withQemu: boolean,
) {
  const rng = testSeed(name);
  const driver = await openImage(image);
  try {
    for (let i = 0; i < writes;) {
      // Bursts of concurrent writes, as the disk process issues them.
      const burst = rng.int(1, 8);
      const tasks: Promise<void>[] = [];
      const taken: [number, number][] = [];
      for (let b = 0; b < burst && i < writes; b += 1, i += 1) {
        // Writes in flight together do not overlap: their order is not defined.
        let [offset, length] = randomWrite(rng, model.byteLength);
        while (taken.some(([s, e]) => offset < e && s < offset + length)) {
          [offset, length] = randomWrite(rng, model.byteLength);
        }
        taken.push([offset, offset + length]);
        const data = writeData(rng, length);
        model.set(data, offset);
        tasks.push(driver.write(offset, data));
      }
      await Promise.all(tasks);
      if (rng.next() < 0.05) await driver.flush();
      if (rng.next() < 0.01) {
        const [offset, length] = randomWrite(rng, model.byteLength);
        const got = new Uint8Array(length);
        await driver.read(offset, got);
        assert.equal(firstDifference(got, model.subarray(offset, offset + length)), -1);
      }
    }
    const got = await readAll(driver);
    assert.equal(firstDifference(got, model), -1, "driver reads back the model");
    if (withQemu) {
      await driver.flush();
      assert.deepEqual(await ourDataRanges(driver), await qemuDataRanges(image));
    }
  } finally {
    await driver.close();
  }
  const report = await checkQcow(image, { repair: false });
  assert.deepEqual(report.corruptions, []);
  if (withQemu) await assertQemuSees(dir, image, model);
}

for (const withQemu of [false, true]) {
  Deno.test({
    name: `qcow: 2000 random writes (blktap layout, 4 KiB clusters) match a model${
      withQemu ? "; QEMU reads and maps the same" : ""
    }`,
    ignore: withQemu && noQemu,
    fn: async () => {
      await inTempDir(async (dir) => {
        const image = `${dir}/a.qcow`;
        await createQcow(image, { sizeBytes: disk_bytes });
        const model = new Uint8Array(disk_bytes);
        await randomWritesAgainstModel(dir, image, model, "qcow-standalone", 2000, withQemu);
        const info = await qcowInfo(image);
        assert.equal(info.details?.l1_checksum_valid, true);
      });
    },
  });
}

Deno.test({
  name: "qcow: 2000 random writes over a raw backing file (512-byte clusters, COW)",
  ignore: noQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed("qcow-backed-base");
      const base = rng.bytes(disk_bytes);
      // Leave holes in the parent so "nothing beneath" is exercised too.
      base.fill(0, 3 << 20, 9 << 20);
      await Deno.writeFile(`${dir}/base.raw`, base);
      const image = `${dir}/overlay.qcow`;
      await createQcow(image, { sizeBytes: disk_bytes, backingName: "base.raw" });
      await randomWritesAgainstModel(dir, image, base.slice(), "qcow-backed", 2000, true);
      assert.deepEqual(await Deno.readFile(`${dir}/base.raw`), base, "backing file untouched");
    });
  },
});

Deno.test({
  name: "qcow: random writes into an image QEMU created (no Xen header)",
  ignore: noQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const image = `${dir}/q.qcow`;
      await runOk("qemu-img", ["create", "-q", "-f", "qcow", image, String(disk_bytes)]);
      await runOk("qemu-io", ["-c", "write -P 0x5a 1M 3M", image]);
      const model = new Uint8Array(disk_bytes);
      model.fill(0x5a, 1 << 20, 4 << 20);
      await randomWritesAgainstModel(dir, image, model, "qcow-qemu-made", 1000, true);
    });
  },
});

Deno.test({
  name: "qcow: images QEMU wrote read identically (plain, backed chain, compressed)",
  ignore: noQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed("qcow-qemu-read");
      const raw = rng.bytes(6 << 20);
      raw.fill(0, 1 << 20, 2 << 20);
      // Compressible text, so that convert -c stores compressed clusters.
      const text = new TextEncoder().encode("blktap qcow compressed cluster ".repeat(40_000));
      raw.set(text.subarray(0, 1 << 20), 4 << 20);
      raw.fill(7, 3 << 20, (3 << 20) + 100_000);
      await Deno.writeFile(`${dir}/src.raw`, raw);
      await qemuConvertToQcow(`${dir}/src.raw`, `${dir}/p.qcow`);
      await qemuConvertToQcow(`${dir}/src.raw`, `${dir}/c.qcow`, true);
      await assertQemuSees(dir, `${dir}/c.qcow`, raw);
      const compressedMap = JSON.parse(
        await runOk("qemu-img", ["map", "--output=json", `${dir}/c.qcow`]),
      ) as { data: boolean; offset?: number }[];
      assert.ok(
        compressedMap.some((e) => e.data && e.offset === undefined),
        "has compressed clusters",
      );
      await qemuCreateOver("p.qcow", `${dir}/mid.qcow`);
      await runOk("qemu-io", ["-c", "write -P 0x33 100k 300k", `${dir}/mid.qcow`]);
      await qemuCreateOver("mid.qcow", `${dir}/top.qcow`);
      await runOk("qemu-io", ["-c", "write -P 0x44 5000k 10k", `${dir}/top.qcow`]);
      const expected = raw.slice();
      expected.fill(0x33, 100 << 10, 400 << 10);
      expected.fill(0x44, 5000 << 10, 5010 << 10);
      for (
        const [name, want] of [["p.qcow", raw], ["c.qcow", raw], ["top.qcow", expected]] as const
      ) {
        const driver = await openImage(`${dir}/${name}`, { readOnly: true });
        try {
          assert.equal(firstDifference(await readAll(driver), want), -1, name);
          assert.deepEqual(
            await ourDataRanges(driver),
            await qemuDataRanges(`${dir}/${name}`),
            name,
          );
        } finally {
          await driver.close();
        }
        assert.deepEqual((await checkQcow(`${dir}/${name}`, { repair: false })).corruptions, []);
        // `blktap map` (our mapRuns: host offsets too) prints what qemu-img map does.
        const ours = await blktap(["map", "--json", `${dir}/${name}`]);
        const theirs = await runOk("qemu-img", ["map", "--output=json", `${dir}/${name}`]);
        assert.deepEqual(JSON.parse(ours.stdout), JSON.parse(theirs), `${name}: map`);
      }
      // Writing over compressed clusters copies them out first.
      const driver = await openImage(`${dir}/c.qcow`);
      await driver.write(4097, new Uint8Array([1, 2, 3]));
      await driver.close();
      const want = raw.slice();
      want.set([1, 2, 3], 4097);
      await assertQemuSees(dir, `${dir}/c.qcow`, want);
    });
  },
});

Deno.test("qcow: concurrent writes to one unallocated cluster allocate it once", async () => {
  await inTempDir(async (dir) => {
    const image = `${dir}/a.qcow`;
    await createQcow(image, { sizeBytes: 8 << 20 });
    const driver = await openImage(image);
    const writes = Array.from(
      { length: 64 },
      (_, i) => driver.write(i * 64, new Uint8Array(64).fill(i + 1)),
    );
    await Promise.all(writes);
    await driver.close();
    const again = await openImage(image, { readOnly: true });
    const got = new Uint8Array(4096);
    await again.read(0, got);
    await again.close();
    for (let i = 0; i < 64; i += 1) assert.equal(got[i * 64], i + 1);
    const report = await checkQcow(image, { repair: false });
    assert.deepEqual(report.corruptions, []);
    assert.equal(report.leakedClusters, 0);
  });
});

Deno.test("qcow: zero writes to unallocated clusters are not allocated; backing loops and missing parents are refused", async () => {
  await inTempDir(async (dir) => {
    const image = `${dir}/a.qcow`;
    await createQcow(image, { sizeBytes: 8 << 20 });
    const driver = await openImage(image);
    await driver.write(0, new Uint8Array(1 << 20));
    await driver.writeZeroes(1 << 20, 1 << 20);
    assert.deepEqual(await driver.blockStatus(0, 8 << 20), [
      { offsetBytes: 0, lengthBytes: 8 << 20, hole: true, zero: true },
    ]);
    await driver.close();
    await createQcow(`${dir}/loop1.qcow`, { sizeBytes: 1 << 20, backingName: "loop2.qcow" });
    await createQcow(`${dir}/loop2.qcow`, { sizeBytes: 1 << 20, backingName: "loop1.qcow" });
    await assert.rejects(openImage(`${dir}/loop2.qcow`), /loop/);
    await createQcow(`${dir}/orphan.qcow`, { sizeBytes: 1 << 20, backingName: "gone.raw" });
    await assert.rejects(openImage(`${dir}/orphan.qcow`), /gone\.raw.*not found/);
  });
});

Deno.test("qcow: the L2 cache stays bounded; entries written through survive eviction", async () => {
  const saved = QcowDriver.l2CacheBytesMax;
  QcowDriver.l2CacheBytesMax = 16 * 4096; // 16 tables: 32 MiB of guest space
  try {
    await inTempDir(async (dir) => {
      const image = `${dir}/big.qcow`;
      const size = 1 * 2 ** 30;
      await createQcow(image, { sizeBytes: size });
      const driver = await openImage(image) as QcowDriver;
      const span = 2 << 20;
      for (let i = 0; i < size / span; i += 1) {
        await driver.write(i * span + 4096, new Uint8Array([i & 0xff, 1]));
      }
      await driver.close();
      const again = await openImage(image, { readOnly: true });
      const got = new Uint8Array(2);
      for (let i = 0; i < size / span; i += 7) {
        await again.read(i * span + 4096, got);
        assert.deepEqual([...got], [i & 0xff, 1]);
      }
      await again.close();
      assert.deepEqual((await checkQcow(image, { repair: false })).corruptions, []);
    });
  } finally {
    QcowDriver.l2CacheBytesMax = saved;
  }
});

Deno.test("qcow: concurrent allocating writes while tables are evicted (tiny cache, backed image)", async () => {
  const saved = QcowDriver.l2CacheBytesMax;
  QcowDriver.l2CacheBytesMax = 4 * 32768; // 4 tables of 512-byte-cluster images
  try {
    await inTempDir(async (dir) => {
      const rng = testSeed("qcow-evict-race");
      const size = 64 << 20;
      await Deno.writeFile(`${dir}/base.raw`, new Uint8Array(0));
      await Deno.truncate(`${dir}/base.raw`, size);
      const image = `${dir}/o.qcow`;
      await createQcow(image, { sizeBytes: size, backingName: "base.raw" });
      const model = new Uint8Array(size);
      const driver = await openImage(image);
      const pages = size / 4096;
      const used = new Set<number>();
      // 32 writers keep requests in flight, as the disk process does.
      let issued = 0;
      const writer = async () => {
        while (issued < 3000) {
          issued += 1;
          let page = rng.int(0, pages - 1);
          while (used.has(page)) page = rng.int(0, pages - 1);
          used.add(page);
          const data = rng.bytes(4096);
          model.set(data, page * 4096);
          await driver.write(page * 4096, data);
        }
      };
      await Promise.all(Array.from({ length: 32 }, writer));
      assert.equal(firstDifference(await readAll(driver), model), -1);
      await driver.close();
      const again = await openImage(image, { readOnly: true });
      assert.equal(firstDifference(await readAll(again), model), -1, "after reopen");
      await again.close();
      assert.deepEqual((await checkQcow(image, { repair: false })).corruptions, []);
    });
  } finally {
    QcowDriver.l2CacheBytesMax = saved;
  }
});

Deno.test("qcow: legacy blktap images (Xen header without flag 0x02: little-endian L1) read and write", async () => {
  await inTempDir(async (dir) => {
    const image = `${dir}/legacy.qcow`;
    await createQcow(image, { sizeBytes: 8 << 20 });
    const rng = testSeed("qcow-legacy");
    const model = new Uint8Array(8 << 20);
    let driver = await openImage(image);
    await writeRandomly(driver, model, rng, 50);
    await driver.close();
    // Rewrite as the 2006 tapdisk left it: L1 in host (little-endian) order.
    const bytes = await Deno.readFile(image);
    const view = new DataView(bytes.buffer);
    const l1Entries = 4;
    for (let i = 0; i < l1Entries; i += 1) {
      const at = 4096 + i * 8;
      const value = view.getBigUint64(at);
      view.setBigUint64(at, value, true);
    }
    view.setUint32(60, view.getUint32(60) & ~0x02);
    view.setUint32(52, l1Checksum(bytes.subarray(4096, 4096 + l1Entries * 8)));
    await Deno.writeFile(image, bytes);
    const info = await qcowInfo(image);
    assert.equal(info.details?.l1_big_endian, false);
    assert.equal(info.details?.l1_checksum_valid, true);
    driver = await openImage(image);
    assert.equal(firstDifference(await readAll(driver), model), -1, "legacy image reads");
    await writeRandomly(driver, model, rng, 50);
    await driver.close();
    driver = await openImage(image, { readOnly: true });
    assert.equal(firstDifference(await readAll(driver), model), -1, "legacy image after writes");
    await driver.close();
    assert.deepEqual((await checkQcow(image, { repair: false })).corruptions, []);
    assert.equal((await qcowInfo(image)).details?.l1_big_endian, false, "byte order kept");
  });
});

for (const withQemu of [false, true]) {
  Deno.test({
    name: `qcow: a backing file shorter than the overlay reads as zeros past its end${
      withQemu ? " (QEMU agrees)" : ""
    }`,
    ignore: withQemu && noQemu,
    fn: async () => {
      await inTempDir(async (dir) => {
        await Deno.writeFile(`${dir}/short.raw`, new Uint8Array(1 << 20).fill(0xee));
        const image = `${dir}/long.qcow`;
        await createQcow(image, { sizeBytes: 3 << 20, backingName: "short.raw" });
        const driver = await openImage(image);
        await driver.write((1 << 20) - 100, new Uint8Array(300).fill(1));
        const got = new Uint8Array(3 << 20);
        await driver.read(0, got);
        await driver.close();
        const want = new Uint8Array(3 << 20);
        want.fill(0xee, 0, 1 << 20);
        want.fill(1, (1 << 20) - 100, (1 << 20) + 200);
        assert.equal(firstDifference(got, want), -1);
        if (withQemu) await assertQemuSees(dir, image, want);
      });
    },
  });
}

Deno.test({
  name: "qcow check --repair: restores a stale Xen checksum only when the extents are verified",
  ignore: noQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const image = `${dir}/a.qcow`;
      await createQcow(image, { sizeBytes: 16 << 20 });
      const driver = await openImage(image);
      await driver.write(4096 * 3, new Uint8Array(10_000).fill(4));
      await driver.write(9 << 20, new Uint8Array(5000).fill(5));
      await driver.close();
      // A crash between the L1 write and the checksum write leaves it stale.
      const file = await Deno.open(image, { write: true });
      await file.seek(52, Deno.SeekMode.Start);
      await file.write(new Uint8Array([1, 2, 3, 4]));
      file.close();
      assert.equal((await qcowInfo(image)).details?.l1_checksum_valid, false);
      const stale = await openImage(image, { readOnly: true }) as QcowDriver;
      assert.equal(stale.extentMode, false, "a stale checksum turns the extent layout off");
      await stale.close();
      const report = await checkQcow(image, { repair: true });
      assert.deepEqual(report.corruptions, []);
      assert.match((report.repaired ?? []).join(), /checksum/);
      assert.equal((await qcowInfo(image)).details?.l1_checksum_valid, true);
      // QEMU adds a table without an extent: the checksum must stay stale.
      await runOk("qemu-io", ["-c", "write -P 6 14M 4k", image]);
      await checkQcow(image, { repair: true });
      assert.equal((await qcowInfo(image)).details?.l1_checksum_valid, false);
      const want = new Uint8Array(16 << 20);
      want.fill(4, 4096 * 3, 4096 * 3 + 10_000);
      want.fill(5, 9 << 20, (9 << 20) + 5000);
      want.fill(6, 14 << 20, (14 << 20) + 4096);
      const d = await openImage(image);
      await d.write(15 << 20, new Uint8Array(100).fill(7));
      await d.close();
      want.fill(7, 15 << 20, (15 << 20) + 100);
      await assertQemuSees(dir, image, want);
      assert.deepEqual((await checkQcow(image, { repair: false })).corruptions, []);
    });
  },
});

Deno.test({
  name: "qcow: QEMU and blktap take turns writing one image (extent layout kept safe)",
  ignore: noQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const image = `${dir}/shared.qcow`;
      const size = 8 << 20;
      await createQcow(image, { sizeBytes: size });
      const rng = testSeed("qcow-take-turns");
      const model = new Uint8Array(size);
      for (let turn = 0; turn < 6; turn += 1) {
        if (turn % 2 === 0) {
          const driver = await openImage(image);
          await writeRandomly(driver, model, rng, 40);
          await driver.close();
        } else {
          const commands: string[] = [];
          for (let i = 0; i < 10; i += 1) {
            const length = rng.int(1, 16) * 512;
            const offset = rng.int(0, (size - length) / 512) * 512;
            const pattern = rng.int(1, 255);
            model.fill(pattern, offset, offset + length);
            commands.push("-c", `write -P ${pattern} ${offset} ${length}`);
          }
          await runOk("qemu-io", [...commands, image]);
        }
        assert.deepEqual(
          (await checkQcow(image, { repair: false })).corruptions,
          [],
          `turn ${turn}`,
        );
        await assertQemuSees(dir, image, model);
      }
    });
  },
});

Deno.test("qcow: blktap layout allocates a whole 2 MiB extent per L2 table, contiguous, sparse on disk", async () => {
  await inTempDir(async (dir) => {
    const image = `${dir}/x.qcow`;
    await createQcow(image, { sizeBytes: 16 << 20 });
    let driver = await openImage(image) as QcowDriver;
    assert.equal(driver.extentMode, true);
    await driver.write(5 << 20, new Uint8Array(4096).fill(1));
    await driver.close();
    const lengthAfterFirst = (await Deno.stat(image)).size;
    // Table page + 512 clusters right behind it, at the end of the file.
    assert.equal(lengthAfterFirst, 8192 + 4096 + (2 << 20));
    // The rest of that extent needs no new space, no metadata and no fdatasync.
    driver = await openImage(image) as QcowDriver;
    const syncs = driver.syncs;
    for (let i = 0; i < 512; i += 37) {
      await driver.write((4 << 20) + i * 4096, new Uint8Array(4096).fill(2));
    }
    assert.equal(driver.syncs, syncs, "writes into an extent need no barrier");
    assert.deepEqual(await driver.blockStatus(0, 16 << 20), [
      { offsetBytes: 0, lengthBytes: 4 << 20, hole: true, zero: true },
      { offsetBytes: 4 << 20, lengthBytes: 2 << 20, hole: false, zero: false },
      { offsetBytes: 6 << 20, lengthBytes: 10 << 20, hole: true, zero: true },
    ]);
    await driver.close();
    assert.equal((await Deno.stat(image)).size, lengthAfterFirst);
    assert.ok(((await Deno.stat(image)).blocks ?? 0) * 512 < 200_000, "unwritten slots stay holes");
  });
});

/** An image whose size field is 1000001 bytes: not a whole number of sectors. */
async function oddSizedImage(dir: string): Promise<string> {
  const image = `${dir}/odd.qcow`;
  await createQcow(image, { sizeBytes: 1_000_001 });
  const driver = await openImage(image);
  await driver.write(999_936 - 4096, new Uint8Array(4096).fill(9));
  await driver.close();
  return image;
}

Deno.test("qcow: a size that is not a whole number of sectors is served rounded down (driver, info, map)", async () => {
  await inTempDir(async (dir) => {
    const image = await oddSizedImage(dir);
    const driver = await openImage(image, { readOnly: true });
    assert.equal(driver.sizeBytes, 999_936, "QEMU serves size / 512 sectors");
    await driver.close();
    const info = JSON.parse((await blktap(["info", "--json", image])).stdout);
    assert.equal(info.virtualSizeBytes, 999_936);
    const map = JSON.parse((await blktap(["map", "--json", image])).stdout) as {
      start: number;
      length: number;
    }[];
    const last = map[map.length - 1];
    assert.equal(last.start + last.length, 999_936);
  });
});

Deno.test({
  name: "qcow: a size that is not a whole number of sectors: info and map agree with QEMU's",
  ignore: noQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const image = await oddSizedImage(dir);
      const theirs = JSON.parse(await runOk("qemu-img", ["info", "--output=json", image]));
      const ours = JSON.parse((await blktap(["info", "--json", image])).stdout);
      assert.equal(ours.virtualSizeBytes, theirs["virtual-size"]);
      const qemuMap = JSON.parse(await runOk("qemu-img", ["map", "--output=json", image]));
      assert.deepEqual(JSON.parse((await blktap(["map", "--json", image])).stdout), qemuMap);
      const driver = await openImage(image, { readOnly: true });
      await assertQemuSees(dir, image, await readAll(driver));
      await driver.close();
    });
  },
});
