import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import type { BlockDriver } from "../../../src/formats/driver.ts";
import { testSeed } from "../../_helpers/random.ts";
import { hasTool, haveQemu, runOk, sha256File } from "../../_helpers/tools.ts";

const disk_bytes = 8 << 20;
const ENGINES = ["aio", "sync"] as const;
const CACHES = ["none", "writeback"] as const;

async function makeImage(dir: string, sizeBytes = disk_bytes): Promise<string> {
  const path = `${dir}/disk.raw`;
  await Deno.writeFile(path, new Uint8Array(0));
  await Deno.truncate(path, sizeBytes);
  return path;
}

async function withImage(fn: (path: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-raw-" });
  try {
    await fn(await makeImage(dir));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

// A random range: mostly unaligned, sometimes block-aligned, sometimes large.
function randomRange(rng: ReturnType<typeof testSeed>): [number, number] {
  const aligned = rng.next() < 0.4;
  const length = aligned ? rng.int(1, 64) * 4096 : rng.int(1, rng.pick([600, 9000, 200_000]));
  const offset = aligned
    ? rng.int(0, (disk_bytes - length) / 4096) * 4096
    : rng.int(0, disk_bytes - length);
  return [offset, length];
}

async function randomOps(driver: BlockDriver, model: Uint8Array, name: string, ops: number) {
  const rng = testSeed(name);
  for (let i = 0; i < ops; i += 1) {
    const kind = rng.int(0, 9);
    const [offset, length] = randomRange(rng);
    if (kind <= 3) {
      const data = rng.bytes(length);
      await driver.write(offset, data, { fua: rng.next() < 0.05 });
      model.set(data, offset);
    } else if (kind <= 6) {
      const got = new Uint8Array(length);
      await driver.read(offset, got);
      assert.deepEqual(
        got,
        model.subarray(offset, offset + length),
        `read ${offset}+${length} (op ${i})`,
      );
    } else if (kind === 7) {
      await driver.flush();
    } else if (kind === 8) {
      // Several writes in one turn, on disjoint ranges: exercises batching and the range lock.
      const base = rng.int(0, disk_bytes / 2 - 65536);
      const writes = Array.from({ length: rng.int(2, 16) }, (_, j) => {
        const at = base + j * 65536 + rng.int(0, 8192);
        const data = rng.bytes(rng.int(1, 40000));
        model.set(data, at);
        return driver.write(at, data);
      });
      await Promise.all(writes);
    } else {
      const zero = rng.next() < 0.5;
      if (zero) await driver.writeZeroes(offset, length, { mayTrim: rng.next() < 0.5 });
      else await driver.discard(offset, length);
      // Raw discard punches a hole: the range reads as zeros afterwards.
      model.fill(0, offset, offset + length);
    }
  }
}

for (const engine of ENGINES) {
  for (const cache of CACHES) {
    if (engine === "sync" && cache === "none") continue;
    Deno.test(`raw ${engine} cache=${cache}: seeded random operations match a model`, async () => {
      await withImage(async (path) => {
        const driver = await openImage(`${engine}:${path}`, { cache });
        const model = new Uint8Array(disk_bytes);
        try {
          assert.equal(driver.sizeBytes, disk_bytes);
          await randomOps(driver, model, `raw ${engine} ${cache}`, 600);
          await driver.flush();
        } finally {
          await driver.close();
        }
        const onDisk = await Deno.readFile(path);
        assert.equal(onDisk.byteLength, disk_bytes, "the file keeps its size");
        assert.ok(onDisk.every((b, i) => b === model[i]), "file contents equal the model");
      });
    });
  }
}

Deno.test({
  name: "raw aio: block status agrees with qemu-img map on where data is",
  ignore: !haveQemu,
  fn: async () => {
    await withImage(async (path) => {
      const driver = await openImage(`aio:${path}`);
      try {
        await driver.write(1 << 20, new Uint8Array(8192).fill(1));
        await driver.write(5 << 20, new Uint8Array(4096).fill(2));
        await driver.discard(1 << 20, 4096);
        await driver.flush();
        const extents = await driver.blockStatus(0, disk_bytes);
        assert.equal(extents.reduce((sum, e) => sum + e.lengthBytes, 0), disk_bytes);
        for (const extent of extents) assert.equal(extent.hole, extent.zero);
        const ours = extents.filter((e) => !e.hole).map((e) => [e.offsetBytes, e.lengthBytes]);
        const map = JSON.parse(
          await runOk("qemu-img", ["map", "--output=json", "-f", "raw", path]),
        );
        const theirs = map.filter((e: { data: boolean }) => e.data)
          .map((e: { start: number; length: number }) => [e.start, e.length]);
        assert.deepEqual(ours, theirs);
        assert.ok(
          ours.some(([start]) => start === (1 << 20) + 4096),
          "the punched block is a hole",
        );
      } finally {
        await driver.close();
      }
    });
  },
});

Deno.test({
  name: "raw aio: reads what qemu-io wrote, and qemu-io reads what we wrote",
  ignore: !haveQemu,
  fn: async () => {
    await withImage(async (path) => {
      await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0xab 12345 70000", path]);
      const driver = await openImage(`aio:${path}`);
      try {
        const got = new Uint8Array(70002);
        await driver.read(12344, got);
        assert.equal(got[0], 0);
        assert.ok(got.subarray(1, 70001).every((b) => b === 0xab));
        assert.equal(got[70001], 0);
        await driver.write(3 << 20, new Uint8Array(5000).fill(0xcd));
        await driver.flush();
      } finally {
        await driver.close();
      }
      const out = await runOk("qemu-io", ["-f", "raw", "-c", `read -P 0xcd ${3 << 20} 5000`, path]);
      assert.match(out, /read 5000\/5000 bytes/);
    });
  },
});

async function assertRejects(promise: Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (error: Error) => {
    assert.match(error.message, pattern);
    return true;
  });
}

Deno.test("raw: bad inputs give clear errors and leave the file unchanged", async () => {
  await withImage(async (path) => {
    const dir = path.slice(0, path.lastIndexOf("/"));
    await Deno.writeFile(path, new Uint8Array(disk_bytes).fill(0x5a));
    const before = await sha256File(path);
    await assertRejects(openImage(`aio:${dir}/missing.raw`), /missing\.raw.*ENOENT/);
    await assertRejects(openImage(`aio:${dir}`), /is a directory|EISDIR/);
    const driver = await openImage(`aio:${path}`);
    const readOnly = await openImage(`aio:${path}`, { readOnly: true });
    try {
      const buffer = new Uint8Array(4096);
      await assertRejects(driver.read(disk_bytes - 100, buffer), /outside the disk/);
      await assertRejects(driver.write(disk_bytes, buffer), /outside the disk/);
      await assertRejects(driver.write(-4096, buffer), /outside the disk/);
      await assertRejects(driver.write(0.5, buffer), /outside the disk/);
      await assertRejects(driver.discard(0, -1), /outside the disk/);
      await assertRejects(driver.writeZeroes(disk_bytes - 1, 2), /outside the disk/);
      await assertRejects(readOnly.write(0, buffer), /read-only/);
      await assertRejects(readOnly.discard(0, 4096), /read-only/);
      assert.equal(readOnly.capabilities.canWrite, false);
    } finally {
      await driver.close();
      await readOnly.close();
    }
    assert.equal(await sha256File(path), before);
  });
});

Deno.test({
  name: "raw: a read-only file opened for writing fails with EACCES naming the file",
  ignore: Deno.uid() === 0 && !hasTool("setpriv"),
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "blktap-ro-" });
    try {
      await Deno.chmod(dir, 0o777);
      const path = `${dir}/readonly.raw`;
      await Deno.writeFile(path, new Uint8Array(65536).fill(3), { mode: 0o444 });
      await Deno.chmod(path, 0o444);
      const script = `${dir}/open.ts`;
      const openImageUrl = new URL("../../../src/formats/open_image.ts", import.meta.url).href;
      await Deno.writeTextFile(
        script,
        `import { openImage } from "${openImageUrl}";\n` +
          `try { await openImage("aio:${path}"); console.log("opened"); }\n` +
          `catch (e) { console.log((e as Error).message); }\n`,
      );
      // Root ignores file modes, so the attempt runs as nobody.
      const asNobody = Deno.uid() === 0
        ? [
          "setpriv",
          "--reuid=65534",
          "--regid=65534",
          "--clear-groups",
          "env",
          `HOME=${dir}`,
          `DENO_DIR=${dir}/deno`,
        ]
        : ["env"];
      const out = await runOk(asNobody[0], [
        ...asNobody.slice(1),
        Deno.execPath(),
        "run",
        "-A",
        script,
      ]);
      assert.match(out, new RegExp(`open\\(${path}\\): EACCES`));
      assert.ok((await Deno.readFile(path)).every((b) => b === 3), "file unchanged");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("raw: vectored reads and writes over scattered pages match a model", async () => {
  const { NativeMemory } = await import("../../../ffi/memory.ts");
  for (const engine of ENGINES) {
    await withImage(async (path) => {
      const rng = testSeed(`raw ${engine} vectored`);
      const driver = await openImage(`${engine}:${path}`);
      const pool = NativeMemory.allocate(64 * 4096);
      const model = new Uint8Array(disk_bytes);
      try {
        for (let i = 0; i < 200; i += 1) {
          const aligned = rng.next() < 0.7;
          // Pages picked out of order from the pool, as a ring request's segments are.
          const buffers = Array.from({ length: rng.int(1, 11) }, () => {
            const page = pool.bytes.subarray(rng.int(0, 63) * 4096, 0);
            const start = page.byteOffset - pool.bytes.byteOffset;
            return aligned
              ? pool.bytes.subarray(start, start + 4096)
              : pool.bytes.subarray(start + rng.int(0, 511), start + 4096);
          });
          const pages = new Set(
            buffers.map((b) => Math.floor((b.byteOffset - pool.bytes.byteOffset) / 4096)),
          );
          // Distinct pages only: two buffers sharing memory cannot hold two values.
          if (pages.size !== buffers.length) continue;
          const total = buffers.reduce((sum, b) => sum + b.byteLength, 0);
          const offset = aligned
            ? rng.int(0, (disk_bytes - total) / 4096) * 4096
            : rng.int(0, disk_bytes - total);
          if (rng.next() < 0.5) {
            let at = offset;
            for (const b of buffers) {
              b.set(rng.bytes(b.byteLength));
              model.set(b, at);
              at += b.byteLength;
            }
            await driver.writev!(offset, buffers);
          } else {
            await driver.readv!(offset, buffers);
            let at = offset;
            for (const b of buffers) {
              assert.deepEqual(
                b,
                model.subarray(at, at + b.byteLength),
                `readv at ${at} (op ${i})`,
              );
              at += b.byteLength;
            }
          }
        }
        await driver.flush();
        assert.ok((await Deno.readFile(path)).every((b, i) => b === model[i]));
      } finally {
        await driver.close();
        pool.release();
      }
    });
  }
});
