/**
 * The qcow2 driver against a model: seeded random writes, write-zeroes and
 * discards issued concurrently, on images of every layout we write (v2,
 * v3, cluster sizes 512 B to 2 MiB, every refcount width, backed or not,
 * caches small enough to evict, opened `unordered` as convert opens its
 * output: no ordering barriers); afterwards the driver reads the model,
 * `qemu-img check` finds nothing (no leak either) and `qemu-img compare`
 * reads the model too.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { createQcow2 } from "../../../src/formats/qcow2/create.ts";
import { checkQcow2 } from "../../../src/formats/qcow2/check.ts";
import { Qcow2Driver } from "../../../src/formats/qcow2/qcow2.ts";
import { testSeed } from "../../_helpers/random.ts";
import {
  assertQemuClean,
  assertQemuReads,
  assertReads,
  hasQemu,
  inTempDir,
  randomOps,
} from "./_util.ts";

interface Case {
  name: string;
  size: number;
  options: Record<string, string>;
  ops: number;
  backed?: boolean;
  smallCaches?: boolean;
  /** Opened as `convert` opens its output (no ordering barriers, durable at flush and close). */
  unordered?: boolean;
}

const CASES: Case[] = [
  { name: "v3 64K", size: 48 << 20, options: {}, ops: 600 },
  { name: "v2 4K", size: 24 << 20, options: { compat: "0.10", cluster_size: "4K" }, ops: 600 },
  {
    name: "512-byte clusters, 64-bit refcounts (tables grow)",
    size: 6 << 20,
    options: { cluster_size: "512", refcount_bits: "64" },
    ops: 800,
  },
  { name: "2M clusters", size: 64 << 20, options: { cluster_size: "2M" }, ops: 300 },
  {
    name: "refcount_bits=1",
    size: 8 << 20,
    options: { cluster_size: "4K", refcount_bits: "1" },
    ops: 400,
  },
  {
    name: "refcount_bits=2",
    size: 8 << 20,
    options: { cluster_size: "1K", refcount_bits: "2" },
    ops: 400,
  },
  {
    name: "refcount_bits=4",
    size: 8 << 20,
    options: { cluster_size: "2K", refcount_bits: "4" },
    ops: 400,
  },
  {
    name: "refcount_bits=8",
    size: 8 << 20,
    options: { cluster_size: "8K", refcount_bits: "8" },
    ops: 400,
  },
  {
    name: "refcount_bits=32",
    size: 8 << 20,
    options: { cluster_size: "16K", refcount_bits: "32" },
    ops: 400,
  },
  {
    name: "v3 backed by raw",
    size: 16 << 20,
    options: { cluster_size: "16K" },
    ops: 500,
    backed: true,
  },
  {
    name: "v2 backed by raw",
    size: 16 << 20,
    options: { compat: "0.10", cluster_size: "8K" },
    ops: 600,
    backed: true,
  },
  {
    name: "tiny caches (eviction)",
    size: 32 << 20,
    options: { cluster_size: "4K" },
    ops: 500,
    smallCaches: true,
  },
  {
    name: "preallocation=metadata",
    size: 12 << 20,
    options: { preallocation: "metadata" },
    ops: 500,
  },
  {
    name: "unordered, 512-byte clusters (tables grow), tiny caches",
    size: 6 << 20,
    options: { cluster_size: "512" },
    ops: 600,
    smallCaches: true,
    unordered: true,
  },
  {
    name: "unordered, v2 backed by raw",
    size: 16 << 20,
    options: { compat: "0.10", cluster_size: "8K" },
    ops: 500,
    backed: true,
    unordered: true,
  },
];

for (const c of CASES) {
  Deno.test({
    name: `qcow2 random ops: ${c.name}`,
    ignore: !hasQemu,
    fn: async () => {
      await inTempDir(async (dir) => {
        const rng = testSeed(`qcow2 ${c.name}`);
        const image = `${dir}/a.qcow2`;
        let model: Uint8Array = new Uint8Array(c.size);
        if (c.backed) {
          model = rng.bytes(c.size);
          model.fill(0, c.size / 4, c.size / 2); // holes in the parent too
          await Deno.writeFile(`${dir}/base.raw`, model);
        }
        await createQcow2(image, {
          sizeBytes: c.size,
          options: c.options,
          backingName: c.backed ? "base.raw" : undefined,
          backingFormat: c.backed ? "raw" : undefined,
        });
        const limits = [Qcow2Driver.l2CacheBytesMax, Qcow2Driver.refcountCacheBytesMax];
        if (c.smallCaches) {
          [Qcow2Driver.l2CacheBytesMax, Qcow2Driver.refcountCacheBytesMax] = [8192, 8192];
        }
        try {
          const driver = await openImage(image, { unordered: c.unordered });
          try {
            const clusterBytes = (driver as Qcow2Driver).clusterBytes;
            await randomOps(driver, model, rng, c.ops, clusterBytes);
            await assertReads(driver, model, c.name);
          } finally {
            await driver.close();
          }
        } finally {
          [Qcow2Driver.l2CacheBytesMax, Qcow2Driver.refcountCacheBytesMax] = limits;
        }
        const ours = await checkQcow2(image, { repair: false });
        assert.deepEqual(ours.corruptions, [], "our check");
        assert.equal(ours.leakedClusters, 0, "our check: leaks");
        await assertQemuClean(image);
        await assertQemuReads(dir, image, model);
        const again = await openImage(image, { readOnly: true });
        try {
          await assertReads(again, model, `${c.name} reopened`);
        } finally {
          await again.close();
        }
      });
    },
  });
}
