/**
 * Behaviours of the qcow2 driver a user relies on beyond plain writes:
 * compressed writes (`convert -c`), zero clusters and discard (space
 * given back and reused), concurrent writers on one cluster and one new
 * table, QEMU and blktap writing the same image in turns, unknown header
 * extensions kept, and the metadata cache bounded by configuration.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { createQcow2 } from "../../../src/formats/qcow2/create.ts";
import { Qcow2Driver } from "../../../src/formats/qcow2/qcow2.ts";
import { frees_queued_max } from "../../../src/formats/qcow2/allocator.ts";
import { checkQcow2 } from "../../../src/formats/qcow2/check.ts";
import { testSeed } from "../../_helpers/random.ts";
import { hasTool, runOk } from "../../_helpers/tools.ts";
import { withNbdServer } from "../../_helpers/nbd_harness.ts";
import {
  assertQemuClean,
  assertQemuReads,
  assertReads,
  hasQemu,
  inTempDir,
  qemuCheck,
  qemuCreate,
  randomOps,
  readAll,
} from "./_util.ts";

Deno.test({
  name: "qcow2 writeCompressed: clusters QEMU reads back, compressed where it saves space",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed("qcow2 compressed writes");
      const layouts: Record<string, string>[] = [{}, { cluster_size: "4K", refcount_bits: "1" }, {
        compat: "0.10",
      }];
      for (const options of layouts) {
        const path = `${dir}/c.qcow2`;
        const size = (3 << 20) + 4096 * 3; // the last cluster is partial
        await createQcow2(path, { sizeBytes: size, options });
        const driver = await openImage(path) as Qcow2Driver;
        const c = driver.clusterBytes;
        const model = new Uint8Array(size);
        const text = new TextEncoder().encode(
          "compressible text for qcow2 ".repeat(Math.ceil(c / 10)),
        );
        const pending: Promise<void>[] = [];
        for (let at = 0; at < size; at += c) {
          const n = Math.min(c, size - at);
          const kind = rng.int(0, 3);
          const data = kind === 0
            ? rng.bytes(n)
            : kind === 1
            ? new Uint8Array(n)
            : text.slice(at % 7, at % 7 + n);
          model.set(data, at);
          pending.push(driver.writeCompressed!(at, data));
          if (pending.length >= 8) await Promise.all(pending.splice(0));
        }
        await Promise.all(pending);
        await assert.rejects(
          () => driver.writeCompressed!(100, new Uint8Array(c)),
          /whole aligned cluster/,
        );
        await assertReads(driver, model, "compressed");
        await driver.close();
        const check = await assertQemuClean(path);
        assert.ok(check.compressed > 0, `${JSON.stringify(options)}: compressed clusters`);
        await assertQemuReads(dir, path, model);
        await Deno.remove(path);
      }
    });
  },
});

Deno.test({
  name: "qcow2 zeroes and discard: zero clusters, space given back and reused",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const path = `${dir}/z.qcow2`;
      await createQcow2(path, { sizeBytes: 64 << 20, options: {} });
      const driver = await openImage(path);
      assert.ok(driver.capabilities.canDiscard && driver.capabilities.canZero);
      await driver.write(0, new Uint8Array(32 << 20).fill(3));
      await driver.flush();
      const full = (await Deno.stat(path)).blocks!;
      await driver.discard(0, 24 << 20);
      await driver.writeZeroes(24 << 20, 4 << 20, { mayTrim: false });
      await driver.writeZeroes(100, 5000, { fast: true }); // reads zero already: nothing to do
      await assert.rejects(
        () => driver.writeZeroes((30 << 20) + 100, 5000, { fast: true }),
        /fast/,
      );
      const status = await driver.blockStatus(0, 32 << 20);
      assert.deepEqual(status.map((e) => [e.lengthBytes, e.zero]), [[28 << 20, true], [
        4 << 20,
        false,
      ]]);
      await driver.flush();
      await driver.close(); // frees are applied behind the close's barrier
      assert.ok((await Deno.stat(path)).blocks! < full * 0.4, "discarded space is punched out");
      await assertQemuClean(path);
      const map = JSON.parse(await runOk("qemu-img", ["map", "--output=json", path])) as {
        start: number;
        zero: boolean;
        data: boolean;
      }[];
      assert.ok(map.some((e) => e.start === 0 && e.zero && !e.data), "zero clusters");
      const sizeBefore = (await Deno.stat(path)).size;
      const again = await openImage(path);
      await again.write(0, new Uint8Array(20 << 20).fill(4));
      await again.close();
      assert.ok(
        (await Deno.stat(path)).size <= sizeBefore + (1 << 20),
        "freed clusters are reused",
      );
      const model = new Uint8Array(64 << 20);
      model.fill(4, 0, 20 << 20);
      model.fill(3, 28 << 20, 32 << 20);
      await assertQemuReads(dir, path, model);
      await assertQemuClean(path);
    });
  },
});

Deno.test({
  name:
    "qcow2 discard without a flush: queued frees stay bounded, space comes back before the guest flushes",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const path = `${dir}/d.qcow2`;
      const clusters = 3 * frees_queued_max;
      await createQcow2(path, { sizeBytes: clusters * 4096, options: { cluster_size: "4K" } });
      const driver = await openImage(path);
      await driver.write(0, new Uint8Array(clusters * 4096).fill(7));
      await driver.flush();
      const full = (await Deno.stat(path)).blocks! * 512;
      await driver.discard(0, clusters * 4096); // one free per cluster, no flush after
      const freed = full - (await Deno.stat(path)).blocks! * 512;
      assert.ok(
        freed >= (clusters - 2 * frees_queued_max) * 4096,
        `discard waited for queued frees past the bound (${freed} bytes given back)`,
      );
      await driver.close();
      await assertQemuClean(path);
      await assertQemuReads(dir, path, new Uint8Array(clusters * 4096));
    });
  },
});

Deno.test({
  name: "qcow2 v2 over a backing file: discard is not offered, write-zeroes writes zeros",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      await Deno.writeFile(`${dir}/base.raw`, new Uint8Array(4 << 20).fill(9));
      await createQcow2(`${dir}/v2.qcow2`, {
        sizeBytes: 4 << 20,
        backingName: "base.raw",
        backingFormat: "raw",
        options: { compat: "0.10" },
      });
      const driver = await openImage(`${dir}/v2.qcow2`);
      assert.equal(driver.capabilities.canDiscard, false);
      assert.equal(driver.capabilities.canZero, false);
      await assert.rejects(() => driver.discard(0, 1 << 20), /no discard/); // not offered
      await driver.writeZeroes(1 << 20, 1 << 20);
      const model = new Uint8Array(4 << 20).fill(9);
      model.fill(0, 1 << 20, 2 << 20);
      await assertReads(driver, model, "v2 over raw");
      await driver.close();
      await assertQemuClean(`${dir}/v2.qcow2`);
      await assertQemuReads(dir, `${dir}/v2.qcow2`, model);
    });
  },
});

Deno.test({
  name: "qcow2 concurrency: writers on one cluster and on one new table allocate once",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const path = `${dir}/cc.qcow2`;
      await createQcow2(path, { sizeBytes: 1 << 30, options: { cluster_size: "4K" } });
      const driver = await openImage(path);
      const model = new Uint8Array(1 << 30);
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 64; i += 1) {
        const data = new Uint8Array(64).fill(i + 1);
        model.set(data, i * 64);
        writes.push(driver.write(i * 64, data)); // one cluster
        const far = (512 << 20) + i * 8192; // one new L2 table, many clusters
        model.set(data, far);
        writes.push(driver.write(far, data));
      }
      await Promise.all(writes);
      const got = new Uint8Array(4096);
      await driver.read(0, got);
      assert.deepEqual(got, model.subarray(0, 4096));
      const far = new Uint8Array(64 * 8192);
      await driver.read(512 << 20, far);
      assert.deepEqual(far, model.subarray(512 << 20, (512 << 20) + 64 * 8192));
      await driver.close();
      const check = await assertQemuClean(path);
      assert.equal(check.allocated, 65, "one cluster and 64 in the far table");
    });
  },
});

Deno.test({
  name: "qcow2: QEMU and blktap take turns writing one image",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed("qcow2 turns");
      const path = `${dir}/t.qcow2`;
      const size = 16 << 20;
      await qemuCreate(path, size, { cluster_size: "16K" });
      const model = new Uint8Array(size);
      for (let turn = 0; turn < 6; turn += 1) {
        const driver = await openImage(path);
        await randomOps(driver, model, rng, 120, 16384);
        await driver.close();
        await assertQemuClean(path);
        const cmds: string[] = [];
        for (let i = 0; i < 20; i += 1) {
          const at = rng.int(0, size / 512 - 200) * 512;
          const n = rng.int(1, 199) * 512;
          const p = rng.int(1, 255);
          if (rng.next() < 0.8) {
            cmds.push("-c", `write -P ${p} ${at} ${n}`);
            model.fill(p, at, at + n);
          } else {
            cmds.push("-c", `write -z ${at} ${n}`);
            model.fill(0, at, at + n);
          }
        }
        await runOk("qemu-io", ["-f", "qcow2", ...cmds, path]);
        await assertQemuClean(path);
        const ours = await checkQcow2(path, { repair: false });
        assert.deepEqual(ours.corruptions, [], `turn ${turn}`);
        assert.equal(ours.leakedClusters, 0);
      }
      await assertQemuReads(dir, path, model);
      const driver = await openImage(path, { readOnly: true });
      await assertReads(driver, model, "after turns");
      await driver.close();
    });
  },
});

Deno.test({
  name: "qcow2: unknown header extensions and fields are kept when the header changes",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const path = `${dir}/u.qcow2`;
      await qemuCreate(path, "4M", { cluster_size: "4K" }, undefined);
      const bytes = await Deno.readFile(path);
      const view = new DataView(bytes.buffer);
      // Insert an unknown extension before the end marker.
      let at = view.getUint32(100);
      while (view.getUint32(at) !== 0) at += 8 + Math.ceil(view.getUint32(at + 4) / 8) * 8;
      const ext = new TextEncoder().encode("kept by blktap");
      view.setUint32(at, 0x0b1e55ed);
      view.setUint32(at + 4, ext.byteLength);
      bytes.set(ext, at + 8);
      view.setBigUint64(at + 8 + 16, 0n);
      await Deno.writeFile(path, bytes);
      const area = bytes.slice(104, at + 32);
      const driver = await openImage(path);
      await driver.write(0, new Uint8Array(100_000).fill(1)); // sets and clears the dirty bit
      await driver.close();
      const after = await Deno.readFile(path);
      assert.deepEqual(after.slice(104, at + 32), area, "header fields and extensions unchanged");
      await assertQemuClean(path);
      const info = JSON.parse(await runOk("qemu-img", ["info", "--output=json", path]));
      assert.equal(info["virtual-size"], 4 << 20);
    });
  },
});

Deno.test({
  name:
    "qcow2 opened unordered (convert's output): no fdatasync until flush; ordered opens keep their barriers",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const size = 96 << 20;
      const rng = testSeed("qcow2 unordered barriers");
      // Plain data over many L2 tables and refcount blocks (4 KiB clusters), overwrites
      // in place, zeroed ranges and compressed clusters: every allocating path.
      const plan: { offset: number; data: Uint8Array; compressed: boolean }[] = [];
      for (let i = 0; i < 120; i += 1) {
        const offset = rng.int(0, size / 4096 - 64) * 4096;
        plan.push({ offset, data: rng.bytes(rng.int(1, 64) * 4096), compressed: false });
      }
      const text = new TextEncoder().encode("compress me ".repeat(400)).subarray(0, 4096);
      for (let i = 0; i < 16; i += 1) {
        plan.push({ offset: (size - (i + 1) * 4096) & ~4095, data: text, compressed: true });
      }
      for (const unordered of [true, false]) {
        const path = `${dir}/${unordered ? "unordered" : "ordered"}.qcow2`;
        await createQcow2(path, { sizeBytes: size, options: { cluster_size: "4K" } });
        const driver = await openImage(path, { unordered }) as Qcow2Driver;
        const model = new Uint8Array(size);
        for (const op of plan) {
          model.set(op.data, op.offset);
          if (op.compressed) await driver.writeCompressed!(op.offset, op.data);
          else await driver.write(op.offset, op.data);
        }
        await driver.writeZeroes(8 << 20, 1 << 20, { mayTrim: true });
        model.fill(0, 8 << 20, 9 << 20);
        const before = driver.barriers;
        const tableWrites = driver.metadataWrites;
        if (unordered) {
          assert.equal(before, 0, "unordered: no barrier before the flush");
          assert.equal(tableWrites, 0, "unordered: table changes wait for the flush");
        } else {
          assert.ok(before > 0, "ordered: allocations are ordered by barriers");
          assert.ok(tableWrites > 100, `ordered: tables written through (${tableWrites})`);
        }
        await driver.flush();
        assert.equal(driver.barriers, before + 1, "a flush is one fdatasync");
        // Unordered: the deferred slices go out joined (adjacent slices of a table in one write).
        if (unordered) assert.ok(driver.metadataWrites < 60, `${driver.metadataWrites} writes`);
        await assertReads(driver, model, unordered ? "unordered" : "ordered");
        await driver.close();
        await assertQemuClean(path);
        await assertQemuReads(dir, path, model);
      }
    });
  },
});

for (const unordered of [false, true]) {
  Deno.test({
    name: `qcow2: metadata caches stay within their configured bounds on a large image${
      unordered ? " (unordered: dirty slices written back when the cache is full)" : ""
    }`,
    ignore: !hasQemu,
    fn: async () => {
      await inTempDir(async (dir) => {
        const path = `${dir}/big.qcow2`;
        await createQcow2(path, { sizeBytes: 2 ** 40, options: { cluster_size: "4K" } });
        const limits = [Qcow2Driver.l2CacheBytesMax, Qcow2Driver.refcountCacheBytesMax];
        [Qcow2Driver.l2CacheBytesMax, Qcow2Driver.refcountCacheBytesMax] = [64 << 10, 32 << 10];
        try {
          const driver = await openImage(path, { unordered }) as Qcow2Driver;
          const rng = testSeed("qcow2 cache bound");
          const buf = new Uint8Array(4096).fill(7);
          for (let i = 0; i < 300; i += 1) {
            await driver.write(rng.int(0, 2 ** 28 - 1) * 4096, buf); // one table slice per 2 MiB
            assert.ok(
              driver.cachedBytes.l2 <= (64 << 10) + 8 * 4096,
              `L2 cache ${driver.cachedBytes.l2}`,
            );
            assert.ok(driver.cachedBytes.refcounts <= (32 << 10) + 8 * 4096);
          }
          const all = new Uint8Array(4096);
          for (let i = 0; i < 300; i += 1) await driver.read(rng.int(0, 2 ** 28 - 1) * 4096, all);
          assert.ok(driver.cachedBytes.l2 <= (64 << 10) + 8 * 4096);
          await driver.close();
        } finally {
          [Qcow2Driver.l2CacheBytesMax, Qcow2Driver.refcountCacheBytesMax] = limits;
        }
        const c = await qemuCheck(path);
        assert.equal(c.corruptions + c.leaks, 0, JSON.stringify(c));
        assert.equal(c.allocated, 300);
        void readAll;
      });
    },
  });
}

Deno.test({
  name: "qcow2 over NBD: qemu-io writes, zeroes and trims through blktap, QEMU checks the image",
  ignore: !hasQemu || !hasTool("nbdinfo"),
  fn: async () => {
    await inTempDir(async (dir) => {
      const path = `${dir}/n.qcow2`;
      await createQcow2(path, { sizeBytes: 8 << 20, options: {} });
      const driver = await openImage(path);
      await withNbdServer([{ name: "q", driver }], async (h) => {
        const io = (...cmds: string[]) =>
          runOk("qemu-io", ["-f", "raw", ...cmds.flatMap((c) => ["-c", c]), h.uri("q")]);
        await io(
          "write -P 0x61 0 3M",
          "write -z 1M 512k",
          "discard 2M 1M",
          "write -P 0x62 5000 3000",
        );
        await io(
          "read -P 0x61 0 5000",
          "read -P 0x62 5000 3000",
          "read -P 0 1M 512k",
          "read -P 0x61 1536k 512k",
        );
        const map = JSON.parse(await runOk("nbdinfo", ["--map", "--json", h.uri("q")])) as {
          offset: number;
          type: number;
        }[];
        // 1M..1.5M and 2M..3M are zero clusters: reported zero (type bit 2), not holes.
        assert.ok(map.some((e) => e.offset === 1 << 20 && (e.type & 2) === 2), JSON.stringify(map));
      });
      await driver.close();
      const model = new Uint8Array(8 << 20);
      model.fill(0x61, 0, 2 << 20);
      model.fill(0, 1 << 20, (1 << 20) + (512 << 10));
      model.fill(0x62, 5000, 8000);
      await assertQemuClean(path);
      await assertQemuReads(dir, path, model);
    });
  },
});

Deno.test({
  name:
    "qcow2: a chain 12 layers deep, layers made by QEMU and by us in turns, reads as QEMU reads it",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed("qcow2 deep chain");
      const size = 4 << 20;
      await Deno.writeFile(`${dir}/l0.raw`, rng.bytes(size));
      let below = { name: "l0.raw", format: "raw" };
      for (let i = 1; i <= 12; i += 1) {
        const path = `${dir}/l${i}.qcow2`;
        const at = rng.int(0, size - 70_000);
        if (i % 2) {
          await qemuCreate(path, size, { cluster_size: "16K" }, below);
          await runOk("qemu-io", ["-f", "qcow2", "-c", `write -P ${i} ${at} 65536`, path]);
        } else {
          await createQcow2(path, {
            sizeBytes: size,
            backingName: below.name,
            backingFormat: below.format,
            options: { cluster_size: "4K" },
          });
          const d = await openImage(path);
          await d.write(at + 3, new Uint8Array(65536).fill(i));
          await d.close();
        }
        below = { name: `l${i}.qcow2`, format: "qcow2" };
      }
      await runOk("qemu-img", ["convert", "-O", "raw", `${dir}/l12.qcow2`, `${dir}/ref.raw`]);
      const driver = await openImage(`${dir}/l12.qcow2`, { readOnly: true });
      await assertReads(driver, await Deno.readFile(`${dir}/ref.raw`), "deep chain");
      await driver.close();
    });
  },
});

Deno.test("qcow2: a refcount table offset far past the end fails a write with ENOSPC naming it, and close returns", async () => {
  await inTempDir(async (dir) => {
    // Found by the fuzz test (SEED=622763803): the allocation frontier
    // followed the table to 2^52, planning a 1.5 TB refcount table overflowed
    // the stack, and the allocator's lock then kept close waiting forever.
    const path = `${dir}/far.qcow2`;
    await createQcow2(path, {
      sizeBytes: 1 << 20,
      options: { cluster_size: "512", refcount_bits: "64" },
    });
    const header = 48; // refcount_table_offset
    const file = await Deno.open(path, { read: true, write: true });
    const offset = new Uint8Array(8);
    new DataView(offset.buffer).setBigUint64(0, 0x0017000000000200n);
    await file.seek(header, Deno.SeekMode.Start);
    await file.write(offset);
    file.close();
    const driver = await openImage(`qcow2:${path}`);
    await assert.rejects(
      () => driver.write(0, new Uint8Array(4096).fill(1)),
      (e: Error & { code?: string }) =>
        e.name === "BlockError" && e.code === "ENOSPC" && e.message.includes(path) &&
        /refcount table of \d+ bytes \(at most 8388608\)/.test(e.message),
    );
    let timer: ReturnType<typeof setTimeout> | undefined;
    const closed = await Promise.race([
      driver.close().then(() => true),
      new Promise((r) => timer = setTimeout(() => r(false), 10_000)),
    ]);
    clearTimeout(timer);
    assert.ok(closed, "close did not return");
  });
});
