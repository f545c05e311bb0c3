/**
 * Ring devices live in a shared-memory folder: a symbolic link or a file of
 * someone else where one goes is refused, never followed, never written.
 */
import assert from "node:assert/strict";
import { ShmRingDevice } from "../../src/ring/shm_ring_device.ts";
import { PAGE_BYTES } from "../../src/ring/blkif.ts";
import { inTempDir, sha256File } from "../_helpers/tools.ts";

const LAYOUT = { ringPages: 1, poolPages: 3 };
const DEVICE_BYTES = (LAYOUT.ringPages + LAYOUT.poolPages) * PAGE_BYTES;

function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  return inTempDir(fn, "blktap-ring-dev-");
}

/** A file of exactly a ring device's size, full of non-zero bytes: what a planted link points at. */
async function victim(dir: string): Promise<string> {
  const path = `${dir}/victim`;
  await Deno.writeFile(path, new Uint8Array(DEVICE_BYTES).fill(0xa5), { mode: 0o600 });
  return path;
}

Deno.test("ring device: a symbolic link where the device goes is refused; its target is untouched", async () => {
  await withDir(async (dir) => {
    const target = await victim(dir);
    const before = await sha256File(target);
    const path = `${dir}/ring0`;
    await Deno.symlink(target, path);
    assert.throws(() => ShmRingDevice.open(path, LAYOUT), /ring device .*ring0 is a symbolic link/);
    assert.throws(
      () => ShmRingDevice.create(path, LAYOUT),
      /ring device .*ring0 is a symbolic link/,
    );
    assert.equal(await sha256File(target), before);
    assert.ok((await Deno.lstat(path)).isSymlink, "the link itself is left alone");
  });
});

Deno.test("ring device: a file with another owner or mode is refused, saying which", async () => {
  await withDir(async (dir) => {
    const path = `${dir}/ring0`;
    ShmRingDevice.create(path, LAYOUT).close();
    assert.equal((await Deno.stat(path)).mode! & 0o777, 0o600, "created 0600");
    await Deno.chmod(path, 0o644);
    assert.throws(
      () => ShmRingDevice.open(path, LAYOUT),
      /ring device .*ring0 has mode 0644: group or others have access \(expected 0600\)/,
    );
    assert.throws(() => ShmRingDevice.create(path, LAYOUT), /has mode 0644/);
    await Deno.chmod(path, 0o600);
    await Deno.chown(path, 65534, 65534);
    assert.throws(
      () => ShmRingDevice.open(path, LAYOUT),
      /ring device .*ring0 is owned by uid 65534, not by us/,
    );
    assert.equal((await Deno.stat(path)).uid, 65534, "refused, not replaced");
  });
});

Deno.test("ring device: a stale device of ours is replaced by create, and opened by open", async () => {
  await withDir(async (dir) => {
    const path = `${dir}/ring0`;
    const first = ShmRingDevice.create(path, LAYOUT);
    first.pool[0] = 7;
    first.close();
    const reopened = ShmRingDevice.open(path, LAYOUT);
    assert.equal(reopened.pool[0], 7);
    reopened.close();
    const fresh = ShmRingDevice.create(path, LAYOUT);
    assert.equal(fresh.pool[0], 0, "a new device starts zeroed");
    fresh.close();
    assert.equal((await Deno.stat(path)).mode! & 0o777, 0o600);
    fresh.unlink();
  });
});
