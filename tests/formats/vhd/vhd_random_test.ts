/**
 * Seeded random operations against an in-memory model, on every kind of
 * VHD: dynamic (2 MiB and 4 KiB blocks, sizes not a multiple of the
 * block), differencing over a raw and over a VHD parent, and a dynamic
 * image whose blocks carry partial bitmaps over garbage (as other writers
 * leave them), and images opened `unordered` as convert opens its output
 * (metadata written at flush). Writes straddle sectors, 4 KiB units and blocks; some are
 * zeros; batches run concurrently with byte ranges that share sectors; the
 * image is reopened now and then. At the end our check is clean and QEMU
 * and libvhdi read what the model holds.
 */
import assert from "node:assert/strict";
import type { BlockDriver } from "../../../src/formats/driver.ts";
import { openImage } from "../../../src/formats/open_image.ts";
import { createVhd } from "../../../src/formats/vhd/create.ts";
import { checkVhd } from "../../../src/formats/vhd/check.ts";
import { DynamicVhdDriver } from "../../../src/formats/vhd/vhd.ts";
import { type Random, testSeed } from "../../_helpers/random.ts";
import { inTempDir } from "../qcow/_util.ts";
import {
  assertQemuReads,
  assertReads,
  assertVhdiReads,
  createChild,
  hasQemu,
  hasVhdiInfo,
  vhdData,
  vhdiInfo,
  vhdimountWorks,
  vhdWrite,
} from "./_vhd_util.ts";

const KiB = 1024;
const MiB = 1 << 20;
const operations = 500;

interface Setup {
  name: string;
  sizeBytes: number;
  blockBytes: number;
  parent?: "raw" | "vhd";
  partialBitmaps?: boolean;
  /** Opened as `convert` opens its output: no barriers, metadata written at flush. */
  unordered?: boolean;
}

const SETUPS: Setup[] = [
  { name: "dynamic", sizeBytes: 9 * MiB + 7 * 512, blockBytes: 2 * MiB },
  { name: "small-blocks", sizeBytes: 700 * KiB, blockBytes: 4 * KiB },
  { name: "diff-raw", sizeBytes: 5 * MiB + 512, blockBytes: 512 * KiB, parent: "raw" },
  { name: "diff-vhd", sizeBytes: 6 * MiB, blockBytes: 1 * MiB, parent: "vhd" },
  { name: "partial-bitmaps", sizeBytes: 8 * MiB, blockBytes: 2 * MiB, partialBitmaps: true },
  { name: "unordered", sizeBytes: 7 * MiB, blockBytes: 256 * KiB, unordered: true },
  {
    name: "diff-unordered",
    sizeBytes: 3 * MiB,
    blockBytes: 64 * KiB,
    parent: "vhd",
    unordered: true,
  },
];

/** A parent with random data (VHD parents get it through our driver). */
async function makeParent(dir: string, setup: Setup, rng: Random): Promise<Uint8Array> {
  const content = new Uint8Array(setup.sizeBytes);
  for (let i = 0; i < 12; i += 1) {
    const [offset, length] = vhdWrite(rng, setup.sizeBytes, setup.blockBytes);
    content.set(rng.bytes(length), offset);
  }
  if (setup.parent === "raw") {
    await Deno.writeFile(`${dir}/parent.raw`, content);
    return content;
  }
  await createVhd(`${dir}/parent.vhd`, {
    sizeBytes: setup.sizeBytes,
    subformat: "dynamic",
    forceSize: true,
  });
  const parent = await openImage(`${dir}/parent.vhd`);
  await parent.write(0, content);
  await parent.close();
  return content;
}

/** Fills two blocks, then clears random bits on disk: those sectors must read as zeros. */
async function makePartialBitmaps(
  path: string,
  rng: Random,
  model: Uint8Array,
  blockBytes: number,
) {
  const driver = await openImage(path);
  const blocks = [0, 2];
  for (const b of blocks) {
    const data = rng.bytes(blockBytes);
    await driver.write(b * blockBytes, data);
  }
  const bat = (driver as DynamicVhdDriver).image.header!.tableOffsetBytes;
  await driver.close();
  const bytes = await Deno.readFile(path);
  const view = new DataView(bytes.buffer);
  for (const b of blocks) {
    const start = view.getUint32(bat + b * 4) * 512;
    const bitmap = bytes.subarray(start, start + 512);
    const data = bytes.subarray(start + 512, start + 512 + blockBytes);
    for (let s = 0; s < blockBytes / 512; s += 1) {
      // Runs of present and absent sectors, some unit-aligned, some not.
      const present = Math.floor(s / rng.pick([1, 3, 8, 13])) % 2 === 0 || rng.next() < 0.3;
      if (!present) bitmap[s >>> 3] &= ~(0x80 >>> (s & 7));
      else model.set(data.subarray(s * 512, (s + 1) * 512), b * blockBytes + s * 512);
    }
  }
  await Deno.writeFile(path, bytes);
}

async function makeImage(
  dir: string,
  setup: Setup,
  rng: Random,
): Promise<{ path: string; model: Uint8Array }> {
  const path = `${dir}/${setup.name}.vhd`;
  let model: Uint8Array = new Uint8Array(setup.sizeBytes);
  if (setup.parent) {
    model = await makeParent(dir, setup, rng);
    const parentPath = `${dir}/parent.${setup.parent}`;
    await createChild(path, parentPath.slice(dir.length + 1), setup.parent, setup.blockBytes);
  } else {
    await createVhd(path, {
      sizeBytes: setup.sizeBytes,
      subformat: "dynamic",
      blockBytes: setup.blockBytes,
      forceSize: true,
    });
    if (setup.partialBitmaps) await makePartialBitmaps(path, rng, model, setup.blockBytes);
  }
  return { path, model };
}

/** Writes with disjoint byte ranges that often share sectors and units, all in flight at once. */
function concurrentBatch(rng: Random, size: number, block: number): [number, Uint8Array][] {
  const writes: [number, Uint8Array][] = [];
  const anchor = rng.int(0, size - 1);
  for (let tries = 0; writes.length < rng.int(4, 16) && tries < 200; tries += 1) {
    let [offset, length] = vhdWrite(rng, size, block);
    if (rng.next() < 0.6) {
      length = rng.int(1, 1500);
      offset = Math.max(0, Math.min(size - length, anchor + rng.int(-6000, 6000)));
    }
    if (writes.some(([o, d]) => offset < o + d.byteLength && o < offset + length)) continue;
    writes.push([offset, vhdData(rng, length)]);
  }
  return writes;
}

async function step(
  driver: BlockDriver,
  model: Uint8Array,
  rng: Random,
  setup: Setup,
): Promise<void> {
  const op = rng.next();
  if (op < 0.55) {
    const [offset, length] = vhdWrite(rng, model.byteLength, setup.blockBytes);
    const data = vhdData(rng, length);
    model.set(data, offset);
    await driver.write(offset, data);
  } else if (op < 0.62) {
    const [offset, length] = vhdWrite(rng, model.byteLength, setup.blockBytes);
    model.fill(0, offset, offset + length);
    await driver.writeZeroes(offset, length);
  } else if (op < 0.8) {
    const [offset, length] = vhdWrite(rng, model.byteLength, setup.blockBytes);
    const got = new Uint8Array(length);
    await driver.read(offset, got);
    const bad = got.findIndex((b, i) => b !== model[offset + i]);
    assert.equal(bad, -1, `${setup.name}: read ${offset}+${length} wrong at ${offset + bad}`);
  } else if (op < 0.85) {
    await driver.flush();
  } else {
    const writes = concurrentBatch(rng, model.byteLength, setup.blockBytes);
    for (const [offset, data] of writes) model.set(data, offset);
    await Promise.all(writes.map(([offset, data]) => driver.write(offset, data)));
  }
}

for (const setup of SETUPS) {
  Deno.test(`vhd random operations against a model: ${setup.name}`, async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed(`vhd-random-${setup.name}`);
      const { path, model } = await makeImage(dir, setup, rng);
      const options = { unordered: setup.unordered };
      let driver = await openImage(path, options);
      assert.equal(driver.sizeBytes, setup.sizeBytes);
      try {
        for (let i = 0; i < operations; i += 1) {
          await step(driver, model, rng, setup);
          if (rng.next() < 0.02) {
            await driver.close();
            driver = await openImage(path, options);
            await assertReads(driver, model, `${setup.name} after reopen ${i}`);
          }
        }
        await assertReads(driver, model, setup.name);
      } finally {
        await driver.close();
      }
      const report = await checkVhd(path, { repair: false });
      assert.deepEqual(report, { corruptions: [], leakedClusters: 0 }, setup.name);
      if (hasQemu && !setup.parent && !setup.partialBitmaps) {
        await assertQemuReads(dir, path, model);
      }
      if (hasVhdiInfo) {
        const info = await vhdiInfo(path);
        assert.match(info["Media size"], new RegExp(`\\(${setup.sizeBytes} bytes\\)`));
        assert.equal(info["Disk type"], setup.parent ? "Differential" : "Dynamic");
      }
      // libvhdi reads a 4 KiB unit from one layer (sector-sized runs of other writers defeat
      // it) and opens only VHD parents.
      const vhdiCan = !setup.partialBitmaps && setup.parent !== "raw";
      if (vhdiCan && await vhdimountWorks()) await assertVhdiReads(path, model);
    });
  });
}
