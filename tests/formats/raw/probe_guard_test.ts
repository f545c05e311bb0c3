/**
 * The probe guard of a raw image attached without a format: writes that
 * would make its head probe as another format fail with EPERM and leave
 * the file as it was; every other write passes; a raw image named with its
 * format has no guard.
 */
import assert from "node:assert/strict";
import { type BlockDriver, BlockError } from "../../../src/formats/driver.ts";
import { openImage, probeFormat, probeHead } from "../../../src/formats/open_image.ts";
import { hostileHeads } from "../../_helpers/hostile_heads.ts";
import { FORMATS } from "../../../src/formats/formats.ts";
import type { FormatEntry } from "../../../src/formats/format_entry.ts";

const KiB = 1024;
const disk_bytes = 1 << 20;

async function withImage(
  probedRaw: boolean,
  body: (driver: BlockDriver, path: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-guard-" });
  const path = `${dir}/disk.raw`;
  await Deno.writeFile(path, new Uint8Array(disk_bytes));
  const driver = await openImage(`aio:${path}`, { probedRaw });
  try {
    await body(driver, path);
  } finally {
    await driver.close();
    await Deno.remove(dir, { recursive: true });
  }
}

async function fileHead(path: string, bytes = 4 * KiB): Promise<Uint8Array> {
  return (await Deno.readFile(path)).subarray(0, bytes);
}

function isEperm(error: unknown): boolean {
  return error instanceof BlockError && error.code === "EPERM" && /probe as/.test(error.message);
}

Deno.test("probe guard: each hostile head is refused exactly when a registered format probes it", async () => {
  await withImage(true, async (driver, path) => {
    for (const { name, head } of hostileHeads("/etc/shadow", disk_bytes)) {
      const claimed = probeHead(head);
      if (claimed === undefined) {
        console.log(`  ${name}: no registered format probes it today; written, stays raw`);
        await driver.write(0, head);
        assert.deepEqual(await fileHead(path), head, name);
        await driver.writeZeroes(0, 4 * KiB);
        continue;
      }
      await assert.rejects(driver.write(0, head), isEperm, name);
      await assert.rejects(driver.writev!(0, [head.subarray(0, 512), head.subarray(512)]), isEperm);
      assert.deepEqual(await fileHead(path), new Uint8Array(4 * KiB), `${name}: file unchanged`);
    }
    assert.equal(await probeFormat(path), "aio");
  });
});

Deno.test("probe guard: a header built from pieces, concurrently or by zeroing, is refused", async () => {
  await withImage(true, async (driver, path) => {
    const [qcow] = hostileHeads("/etc/shadow", disk_bytes);
    // All of the header but the version: nothing probes it.
    const almost = qcow.head.slice(0, 512);
    almost[7] = 0;
    await driver.write(0, almost);
    await assert.rejects(driver.write(7, new Uint8Array([1])), isEperm, "the missing byte");
    // The version as a wrong value, then zeroed into the right one.
    await driver.write(4, new Uint8Array([0xff, 0, 0, 1]));
    await assert.rejects(driver.writeZeroes(4, 1), isEperm, "zeroing completes it");
    // Two writes at once, each harmless alone: one of them must fail.
    await driver.write(0, new Uint8Array(8));
    const results = await Promise.allSettled([
      driver.write(0, qcow.head.subarray(0, 4)),
      driver.write(4, qcow.head.subarray(4, 8)),
    ]);
    assert.equal(results.filter((r) => r.status === "rejected").length, 1);
    assert.equal(await probeFormat(path), "aio");
  });
});

Deno.test("probe guard: ordinary writes anywhere pass, discard and zeroes of the head too", async () => {
  await withImage(true, async (driver, path) => {
    const data = new Uint8Array(64 * KiB).map((_, i) => (i * 7) & 0xff);
    await driver.write(0, data);
    await driver.write(1, data.subarray(0, 1000)); // unaligned over the head
    await driver.write(8 * KiB, data);
    await driver.discard(0, 4 * KiB);
    await driver.writeZeroes(512, 512);
    const bytes = await Deno.readFile(path);
    assert.deepEqual(bytes.subarray(8 * KiB, 72 * KiB), data);
    assert.deepEqual(bytes.subarray(0, 4 * KiB), new Uint8Array(4 * KiB));
  });
});

Deno.test("probe guard: none for a raw image named with its format (aio:PATH)", async () => {
  await withImage(false, async (driver, path) => {
    const [qcow] = hostileHeads("/etc/shadow", disk_bytes);
    await driver.write(0, qcow.head);
    assert.deepEqual(await fileHead(path), qcow.head);
    assert.equal(await probeFormat(path), "qcow", "the file now probes as qcow: why one names it");
  });
});

Deno.test("probe guard: asks every registered format, so formats added later are guarded too", async () => {
  // Stand-ins for the qcow2 and vhd drivers (QEMU's qcow2_probe and vpc_probe).
  const stand_ins: FormatEntry[] = [
    {
      name: "qcow2-stand-in",
      probe: (h) =>
        h.byteLength >= 8 && new DataView(h.buffer, h.byteOffset).getUint32(0) ===
          0x514649fb &&
        new DataView(h.buffer, h.byteOffset).getUint32(4) >= 2,
      open: () => Promise.reject(new Error("stand-in")),
    },
    {
      name: "vhd-stand-in",
      probe: (h) => new TextDecoder().decode(h.subarray(0, 8)) === "conectix",
      open: () => Promise.reject(new Error("stand-in")),
    },
  ];
  FORMATS.unshift(...stand_ins);
  try {
    await withImage(true, async (driver, path) => {
      for (const { name, head } of hostileHeads("/etc/shadow", disk_bytes)) {
        await assert.rejects(driver.write(0, head), isEperm, name);
      }
      assert.deepEqual(await fileHead(path), new Uint8Array(4 * KiB));
    });
  } finally {
    FORMATS.splice(0, stand_ins.length);
  }
});
