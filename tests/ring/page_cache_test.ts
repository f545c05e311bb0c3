/**
 * ctrl's reads and writes of a raw image's page cache: only the image the
 * minor names is opened, what is read is the file's bytes, what is written
 * is what the disk process reads, only a writable opening writes, and
 * block status is what the raw driver itself reports.
 */
import assert from "node:assert/strict";
import { PageCache } from "../../src/ring/page_cache.ts";
import { openImage } from "../../src/formats/open_image.ts";
import { blktap, inTempDir } from "../_helpers/tools.ts";

const MiB = 1 << 20;

function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  return inTempDir(fn, "blktap-cached-");
}

Deno.test("cached reads: a descriptor that is not the minor's image is refused", async () => {
  await withDir(async (dir) => {
    await Deno.writeFile(`${dir}/image.raw`, new Uint8Array(MiB));
    await Deno.writeFile(`${dir}/secret`, new TextEncoder().encode("not the guest's"));
    const secret = await Deno.open(`${dir}/secret`);
    try {
      // As a disk process naming another of its files would.
      const named = `/proc/self/fd/${fdOf(`${dir}/secret`)}`;
      assert.throws(() => PageCache.open(named, `${dir}/image.raw`), /is not/);
    } finally {
      secret.close();
    }
  });
});

Deno.test("page cache writes: the disk process's driver reads them; a read-only opening refuses them", async () => {
  await withDir(async (dir) => {
    const path = `${dir}/image.raw`;
    await Deno.writeFile(path, new Uint8Array(4 * MiB).fill(0x11));
    const driver = await openImage(`aio:${path}`, { cache: "writeback" });
    const served = `/proc/self/fd/${driver.pageCacheFd}`;
    const writable = PageCache.open(served, path, true);
    const readOnly = PageCache.open(served, path);
    try {
      const data = new Uint8Array(MiB + 512).map((_, i) => (i * 13) & 0xff);
      await writable.writeBeside(MiB + 512, data);
      const got = new Uint8Array(data.byteLength + 1024);
      await driver.read(MiB, got);
      assert.ok(got.subarray(0, 512).every((b) => b === 0x11), "before the write");
      assert.deepEqual(got.subarray(512, 512 + data.byteLength), data);
      assert.ok(got.subarray(512 + data.byteLength).every((b) => b === 0x11), "after it");

      assert.equal(readOnly.writable, false);
      await assert.rejects(readOnly.writeBeside(0, data), /pwrite.*EBADF|Bad file descriptor/);
      const first = new Uint8Array(4096);
      await driver.read(0, first);
      assert.ok(first.every((b) => b === 0x11), "a refused write changed nothing");
    } finally {
      writable.close();
      readOnly.close();
      await driver.close();
    }
  });
});

Deno.test("cached reads: cached bytes are the file's; block status is the raw driver's", async () => {
  await withDir(async (dir) => {
    const path = `${dir}/image.raw`;
    const file = await Deno.open(path, { write: true, create: true });
    await file.truncate(8 * MiB);
    const pattern = new Uint8Array(MiB).map((_, i) => (i * 7) & 0xff);
    await file.write(pattern); // 0..1 MiB
    await file.seek(5 * MiB, Deno.SeekMode.Start);
    await file.write(pattern); // 5..6 MiB
    file.close();

    const driver = await openImage(`aio:${path}`, { cache: "writeback" });
    const fd = driver.pageCacheFd;
    assert.ok(fd !== undefined, "a raw image through the page cache names its descriptor");
    const cached = PageCache.open(`/proc/self/fd/${fd}`, path);
    try {
      const buffer = new Uint8Array(256 << 10);
      // Written through the page cache a moment ago: there without I/O.
      assert.equal(cached.read(5 * MiB + 4096, buffer), true);
      assert.deepEqual(buffer, pattern.subarray(4096, 4096 + buffer.byteLength));
      assert.equal(await cached.readBeside(0, buffer), true);
      assert.deepEqual(buffer, pattern.subarray(0, buffer.byteLength));
      for (const [offset, length] of [[0, 8 * MiB], [MiB - 4096, 5 * MiB], [6 * MiB, 2 * MiB]]) {
        assert.deepEqual(
          cached.blockStatus(offset, length),
          await driver.blockStatus(offset, length),
          `block status of [${offset}, +${length})`,
        );
      }
    } finally {
      cached.close();
      await driver.close();
    }
  });
});

Deno.test("cached reads: formats that map the disk onto the file name no descriptor", async () => {
  await withDir(async (dir) => {
    const path = `${dir}/image.qcow2`;
    const created = await blktap(["create", "-f", "qcow2", path, "1M"]);
    assert.equal(created.code, 0, created.stderr);
    const qcow2 = await openImage(`qcow2:${path}`, { cache: "writeback" });
    try {
      assert.equal(qcow2.pageCacheFd, undefined);
    } finally {
      await qcow2.close();
    }
  });
});

// The descriptor number of an open file, found through /proc (Deno hides it).
function fdOf(path: string): number {
  for (const entry of Deno.readDirSync("/proc/self/fd")) {
    try {
      if (Deno.readLinkSync(`/proc/self/fd/${entry.name}`) === path) return Number(entry.name);
    } catch {
      // closed meanwhile
    }
  }
  throw new Error(`${path} is not open`);
}
