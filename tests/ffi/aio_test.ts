import assert from "node:assert/strict";
import { AioQueue } from "../../ffi/aio.ts";
import { SysError } from "../../ffi/errno.ts";
import { File } from "../../ffi/file.ts";
import { NativeMemory } from "../../ffi/memory.ts";

async function withFile(sizeBytes: number, fn: (path: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-aio-" });
  const path = `${dir}/data`;
  const bytes = new Uint8Array(sizeBytes);
  for (let i = 0; i < sizeBytes; i += 4096) bytes[i] = (i / 4096) & 0xff;
  await Deno.writeFile(path, bytes);
  try {
    await fn(path);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("aio: many reads issued in one turn all complete with the right data", async () => {
  await withFile(1 << 20, async (path) => {
    const file = File.open(path, { direct: true });
    const queue = new AioQueue(32);
    const memory = NativeMemory.allocate(256 * 4096);
    try {
      // 256 requests through a 32-slot context: the queue must hold the rest back.
      const reads = Array.from(
        { length: 256 },
        (_, i) =>
          queue.readv(file.fd, i * 4096, [{
            address: memory.address + i * 4096,
            lengthBytes: 4096,
          }]),
      );
      assert.deepEqual(await Promise.all(reads), new Array(256).fill(4096));
      for (let i = 0; i < 256; i += 1) assert.equal(memory.bytes[i * 4096], i & 0xff);
      assert.equal(queue.inflight, 0);
    } finally {
      queue.close();
      memory.release();
      file.close();
    }
  });
});

Deno.test("aio: a failed request rejects with the errno name and the path", async () => {
  await withFile(65536, async (path) => {
    const file = File.open(path, { direct: true });
    const queue = new AioQueue(4);
    const memory = NativeMemory.allocate(8192);
    try {
      // O_DIRECT refuses a misaligned offset with EINVAL.
      const misaligned = queue.readv(
        file.fd,
        1,
        [{ address: memory.address, lengthBytes: 4096 }],
        path,
      );
      await assert.rejects(misaligned, (error: SysError) => {
        assert.equal(error.code, "EINVAL");
        assert.match(error.message, new RegExp(`preadv\\(${path}\\): EINVAL`));
        return true;
      });
      const good = await queue.readv(file.fd, 4096, [{
        address: memory.address,
        lengthBytes: 4096,
      }]);
      assert.equal(good, 4096, "the queue keeps working after an error");
    } finally {
      queue.close();
      memory.release();
      file.close();
    }
  });
});

Deno.test("file: holes, punch and zero range are visible through SEEK_DATA/SEEK_HOLE", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-file-" });
  try {
    const file = File.open(`${dir}/sparse`, { write: true, createNew: true });
    file.truncate(1 << 20);
    assert.equal(file.seekData(0), null, "an empty sparse file has no data");
    file.pwriteAll(new Uint8Array(8192).fill(9), 65536);
    assert.equal(file.seekData(0), 65536);
    assert.equal(file.seekHole(65536), 65536 + 8192);
    file.punchHole(65536, 4096);
    assert.equal(file.seekData(0), 65536 + 4096);
    const back = new Uint8Array(8192);
    file.preadFull(back, 65536);
    assert.ok(back.subarray(0, 4096).every((b) => b === 0));
    assert.ok(back.subarray(4096).every((b) => b === 9));
    assert.deepEqual(file.stat(), { sizeBytes: 1 << 20, kind: "file" });
    file.close();
    assert.throws(() => File.open(`${dir}/sparse`, { createNew: true, write: true }), /EEXIST/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
