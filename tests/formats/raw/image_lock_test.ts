/**
 * Image locks compatible with QEMU's (block/file-posix.c), QEMU as the
 * oracle: what blktap serves read-write QEMU cannot write nor read without
 * -U (for a format with metadata), what QEMU writes blktap refuses,
 * read-only users share, backing files are read-locked.
 */
import assert from "node:assert/strict";
import { type BlockDriver, BlockError } from "../../../src/formats/driver.ts";
import { openImage } from "../../../src/formats/open_image.ts";
import { File } from "../../../ffi/file.ts";
import { NativeMemory } from "../../../ffi/memory.ts";
import { openImageFile } from "../../../src/formats/raw/open_file.ts";
import { lock_conflict_wait_ms, lockImage } from "../../../src/formats/raw/image_lock.ts";
import { blktap, missingTools, run } from "../../_helpers/tools.ts";
import { qemuHolding } from "../../_helpers/qemu_hold.ts";

const ignore = missingTools("qemu-img", "qemu-io", "qemu-nbd").length > 0;

const MiB = 1 << 20;

async function withImages(body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-lock-" });
  try {
    await Deno.writeFile(`${dir}/disk.raw`, new Uint8Array(4 * MiB));
    const created = await blktap(["qcow-create", "4", `${dir}/disk.qcow`]);
    assert.equal(created.code, 0, created.stderr);
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function withDriver(
  spec: string,
  options: { readOnly?: boolean; lock?: boolean },
  body: (driver: BlockDriver) => Promise<void>,
): Promise<void> {
  const driver = await openImage(spec, options);
  try {
    await body(driver);
  } finally {
    await driver.close();
  }
}

async function qemu(tool: string, ...args: string[]) {
  const result = await run(tool, args);
  return { ...result, ok: result.code === 0, text: result.stdout + result.stderr };
}

function inUse(pattern: RegExp) {
  return (error: unknown) => {
    assert.ok(error instanceof BlockError && error.code === "EPERM", String(error));
    assert.match(error.message, pattern);
    assert.match(error.message, /in use by another process/);
    return true;
  };
}

Deno.test({
  name: "image lock: QEMU cannot open for writing, nor read a qcow without -U, what blktap writes",
  ignore,
  fn: () =>
    withImages(async (dir) => {
      await withDriver(`qcow:${dir}/disk.qcow`, {}, async () => {
        const info = await qemu("qemu-img", "info", `${dir}/disk.qcow`);
        assert.equal(info.ok, false);
        assert.match(info.text, /Failed to get shared "write" lock/);
        assert.ok((await qemu("qemu-img", "info", "-U", `${dir}/disk.qcow`)).ok);
        const write = await qemu("qemu-io", "-f", "qcow", "-c", "write 0 512", `${dir}/disk.qcow`);
        assert.equal(write.ok, false, write.text);
        assert.match(write.text, /Failed to get "write" lock/);
      });
      await withDriver(`aio:${dir}/disk.raw`, {}, async () => {
        const write = await qemu("qemu-io", "-f", "raw", "-c", "write 0 512", `${dir}/disk.raw`);
        assert.match(write.text, /Failed to get "write" lock/);
        const read = await qemu(
          "qemu-io",
          "-U",
          "-r",
          "-f",
          "raw",
          "-c",
          "read 0 512",
          `${dir}/disk.raw`,
        );
        assert.ok(read.ok, read.text);
      });
      // Closed: QEMU writes again.
      assert.ok((await qemu("qemu-io", "-f", "raw", "-c", "write 0 512", `${dir}/disk.raw`)).ok);
    }),
});

Deno.test({
  name: "image lock: blktap refuses an image qemu-io or qemu-nbd has open for writing",
  ignore,
  fn: () =>
    withImages(async (dir) => {
      const raw = `${dir}/disk.raw`;
      for (
        const command of [
          ["qemu-io", "-f", "raw", raw],
          ["qemu-nbd", "-f", "raw", "-k", `${dir}/nbd.sock`, raw],
        ]
      ) {
        const holder = await qemuHolding(command, raw);
        try {
          await assert.rejects(
            openImage(`aio:${raw}`),
            inUse(/disk\.raw: Failed to get/),
            command[0],
          );
          await assert.rejects(
            openImage(`aio:${raw}`, { readOnly: true, lock: true }),
            inUse(/Failed to get shared "write" lock/),
            `${command[0]}: a served read-only disk does not share writes either`,
          );
          // Readers that take no lock (info, map) still read, as qemu-img -U.
          await withDriver(`aio:${raw}`, { readOnly: true }, () => Promise.resolve());
        } finally {
          await holder.stop();
        }
      }
      await withDriver(`aio:${raw}`, {}, () => Promise.resolve());
    }),
});

Deno.test({
  name: "image lock: read-only users share: two blktap readers, plain qemu-img info; no writer",
  ignore,
  fn: () =>
    withImages(async (dir) => {
      const qcow = `${dir}/disk.qcow`;
      await withDriver(`qcow:${qcow}`, { readOnly: true, lock: true }, async () => {
        await withDriver(`qcow:${qcow}`, { readOnly: true, lock: true }, async () => {
          const info = await qemu("qemu-img", "info", qcow);
          assert.ok(info.ok, info.text);
          const write = await qemu("qemu-io", "-f", "qcow", "-c", "write 0 512", qcow);
          assert.match(write.text, /Failed to get "write" lock/);
          await assert.rejects(
            openImage(`qcow:${qcow}`),
            inUse(/Failed to get "write" lock/),
          );
        });
      });
    }),
});

Deno.test({
  name: "image lock: backing files are read-locked as QEMU locks them",
  ignore,
  fn: () =>
    withImages(async (dir) => {
      const base = `${dir}/disk.raw`;
      const created = await blktap(["qcow-create", "4", `${dir}/top.qcow`, base]);
      assert.equal(created.code, 0, created.stderr);
      await withDriver(`qcow:${dir}/top.qcow`, {}, async () => {
        const write = await qemu("qemu-io", "-f", "raw", "-c", "write 0 512", base);
        assert.match(write.text, /Failed to get "write" lock/, "nobody writes below an overlay");
        const read = await qemu("qemu-io", "-r", "-f", "raw", "-c", "read 0 512", base);
        assert.ok(read.ok, read.text);
        await withDriver(`aio:${base}`, { readOnly: true, lock: true }, () => Promise.resolve());
      });
    }),
});

Deno.test("image lock: an open waits out a conflict that goes away, else refuses", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-lock-" });
  try {
    const raw = `${dir}/disk.raw`;
    await Deno.writeFile(raw, new Uint8Array(MiB));
    const first = await openImage(`aio:${raw}`);
    const started = Date.now();
    const second = openImage(`aio:${raw}`);
    setTimeout(() => first.close(), lock_conflict_wait_ms / 5);
    await (await second).close();
    assert.ok(Date.now() - started < lock_conflict_wait_ms, "served once the holder let go");
    await withDriver(`aio:${raw}`, {}, async () => {
      const refusedAt = Date.now();
      await assert.rejects(openImage(`aio:${raw}`), inUse(/Failed to get "write" lock/));
      assert.ok(Date.now() - refusedAt >= lock_conflict_wait_ms, "refused after the wait");
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("image lock: a closed writer's locks are gone at once", async () => {
  await withImages(async (dir) => {
    const path = `${dir}/disk.raw`;
    const image = await openImageFile(path, {});
    // Something else keeps the open file alive past close (here a mapping; in
    // a disk process the kernel's deferred fput after the last aio, or a child
    // between fork and exec): the locks must not live as long as that.
    const fd = (image as unknown as { file: File }).file.fd;
    const mapping = NativeMemory.mapShared(fd, 4096, 0, path);
    try {
      await image.close();
      const file = File.open(path, { write: true });
      try {
        lockImage(file, "write"); // no waiting: a leftover lock fails here
      } finally {
        file.close();
      }
    } finally {
      mapping.release();
    }
  });
});
