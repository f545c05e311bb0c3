/**
 * The `create` hook: images QEMU accepts with the options asked for
 * (`qemu-img info` and `qemu-img check` are the oracles), backing files
 * recorded with their format, preallocation, and bad options refused with
 * a message naming them.
 */
import assert from "node:assert/strict";
import { formatEntry } from "../../../src/formats/open_image.ts";
import { openImage } from "../../../src/formats/open_image.ts";
import { runOk } from "../../_helpers/tools.ts";
import { assertQemuClean, hasQemu, inTempDir } from "./_util.ts";

const create = formatEntry("qcow2")!.create!;

interface QemuInfo {
  "virtual-size": number;
  "cluster-size": number;
  "backing-filename"?: string;
  "backing-filename-format"?: string;
  "format-specific": {
    data: { compat: string; "refcount-bits": number; "lazy-refcounts"?: boolean };
  };
}

async function qemuInfo(path: string): Promise<QemuInfo> {
  return JSON.parse(await runOk("qemu-img", ["info", "--output=json", path]));
}

Deno.test({
  name: "qcow2 create: every option QEMU reads back, clean images",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const cases: Record<string, string>[] = [
        {},
        { compat: "0.10" },
        { compat: "v3", cluster_size: "512" },
        { cluster_size: "2M" },
        { cluster_size: "4K", refcount_bits: "1" },
        { cluster_size: "8K", refcount_bits: "64" },
        { lazy_refcounts: "on" },
        { preallocation: "metadata", cluster_size: "16K" },
        { preallocation: "falloc", cluster_size: "64K" },
        { extended_l2: "off", compression_type: "zlib" },
      ];
      for (const [i, options] of cases.entries()) {
        const path = `${dir}/c${i}.qcow2`;
        const size = 40 * 1024 * 1024 + 512 * 3;
        await create(path, { sizeBytes: size, options });
        const info = await qemuInfo(path);
        const what = JSON.stringify(options);
        assert.equal(info["virtual-size"], size, what);
        assert.equal(
          info["cluster-size"],
          options.cluster_size === "512"
            ? 512
            : options.cluster_size === "2M"
            ? 2 << 20
            : (parseInt(options.cluster_size ?? "64") * 1024),
          what,
        );
        const data = info["format-specific"].data;
        assert.equal(data.compat, options.compat === "0.10" ? "0.10" : "1.1", what);
        assert.equal(data["refcount-bits"], Number(options.refcount_bits ?? 16), what);
        if (options.lazy_refcounts) assert.equal(data["lazy-refcounts"], true, what);
        await assertQemuClean(path);
        if (options.preallocation) {
          const map = JSON.parse(await runOk("qemu-img", ["map", "--output=json", path])) as {
            data: boolean;
            length: number;
          }[];
          assert.ok(map.every((e) => e.data), `${what}: every cluster allocated`);
        }
        const driver = await openImage(path);
        await driver.write(size - 1000, new Uint8Array(1000).fill(1));
        await driver.close();
        await assertQemuClean(path);
      }
    });
  },
});

Deno.test({
  name: "qcow2 create: backing file and format recorded; size 0 takes the backing file's",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      await runOk("qemu-img", ["create", "-q", "-f", "vmdk", `${dir}/base.vmdk`, "3M"]);
      await create(`${dir}/top.qcow2`, {
        sizeBytes: 0,
        backingName: "base.vmdk",
        backingFormat: "vmdk",
        options: {},
      });
      const info = await qemuInfo(`${dir}/top.qcow2`);
      assert.equal(info["virtual-size"], 3 << 20);
      assert.equal(info["backing-filename"], "base.vmdk");
      assert.equal(info["backing-filename-format"], "vmdk");
      await assertQemuClean(`${dir}/top.qcow2`);
      // 512-byte clusters leave little room: QEMU drops the feature table, so do we.
      await create(`${dir}/small.qcow2`, {
        sizeBytes: 1 << 20,
        backingName: "base.vmdk",
        backingFormat: "vmdk",
        options: { cluster_size: "512" },
      });
      assert.equal((await qemuInfo(`${dir}/small.qcow2`))["backing-filename"], "base.vmdk");
      await assert.rejects(
        () =>
          create(`${dir}/long.qcow2`, {
            sizeBytes: 1 << 20,
            backingName: "x".repeat(600),
            options: { cluster_size: "512" },
          }),
        /does not fit/,
      );
    });
  },
});

Deno.test("qcow2 create: bad options are refused naming them; existing files are not overwritten", async () => {
  await inTempDir(async (dir) => {
    const bad: [Record<string, string>, RegExp][] = [
      [{ colour: "blue" }, /unknown qcow2 option 'colour'/],
      [{ compat: "2.0" }, /compat/],
      [{ cluster_size: "3000" }, /cluster_size/],
      [{ cluster_size: "4M" }, /cluster_size/],
      [{ refcount_bits: "3" }, /refcount_bits/],
      [{ compat: "0.10", refcount_bits: "8" }, /refcount_bits/],
      [{ compat: "0.10", lazy_refcounts: "on" }, /lazy_refcounts/],
      [{ preallocation: "sometimes" }, /preallocation/],
      [{ extended_l2: "on" }, /extended_l2/],
      [{ compression_type: "zstd" }, /compression_type/],
    ];
    for (const [options, pattern] of bad) {
      await assert.rejects(
        () => create(`${dir}/bad.qcow2`, { sizeBytes: 1 << 20, options }),
        (e) => {
          assert.ok(e instanceof RangeError, `${JSON.stringify(options)}: ${e}`);
          assert.match((e as Error).message, pattern);
          return true;
        },
      );
      await assert.rejects(() => Deno.stat(`${dir}/bad.qcow2`));
    }
    await Deno.writeFile(`${dir}/exists.qcow2`, new Uint8Array([1, 2, 3]));
    await assert.rejects(() => create(`${dir}/exists.qcow2`, { sizeBytes: 1 << 20, options: {} }));
    assert.deepEqual(await Deno.readFile(`${dir}/exists.qcow2`), new Uint8Array([1, 2, 3]));
  });
});

Deno.test({
  name:
    "qcow2 create: the largest virtual sizes QEMU allows open, and their last bytes are writable",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      // 2 MiB clusters: an L1 table of 32 MiB covers 2 EiB; offsets past 2^53 are out of reach here.
      for (
        const [size, cluster] of [[2 ** 60, "2M"], [2 ** 51, "64K"], [2 ** 36, "512"]] as const
      ) {
        const path = `${dir}/big-${cluster}.qcow2`;
        await create(path, { sizeBytes: size, options: { cluster_size: cluster } });
        const driver = await openImage(path);
        assert.equal(driver.sizeBytes, size);
        const at = Math.min(size, 2 ** 53) - 4096;
        await driver.write(at, new Uint8Array(4096).fill(0x5a));
        const back = new Uint8Array(4096);
        await driver.read(at, back);
        assert.ok(back.every((b) => b === 0x5a));
        await driver.close();
        await assertQemuClean(path);
        await runOk("qemu-io", ["-f", "qcow2", "-c", `read -P 0x5a ${at} 4096`, path]);
      }
    });
  },
});
