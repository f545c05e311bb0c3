/**
 * OFD locks through the shim: they belong to the open file, so two opens
 * in one process conflict, shared locks coexist, and closing releases.
 */
import assert from "node:assert/strict";
import { File } from "../../ffi/file.ts";
import { ofdCanLock, ofdSetLock } from "../../ffi/ofd_lock.ts";

Deno.test("ofd lock: shared locks coexist, an exclusive one conflicts, close releases", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-ofd-" });
  const path = `${dir}/image`;
  await Deno.writeFile(path, new Uint8Array(4096));
  const first = File.open(path, { write: true });
  const second = File.open(path);
  try {
    assert.equal(ofdSetLock(first, "read", 100, 1), true);
    assert.equal(ofdSetLock(second, "read", 100, 1), true, "two shared locks");
    assert.equal(ofdCanLock(first, "write", 100, 1), false, "the other open holds a shared lock");
    assert.equal(ofdSetLock(second, "unlock", 100, 1), true);
    assert.equal(ofdCanLock(first, "write", 100, 1), true, "its own lock never conflicts");
    assert.equal(ofdSetLock(first, "write", 200, 1), true);
    assert.equal(ofdSetLock(second, "read", 200, 1), false, "an exclusive lock refuses others");
    assert.equal(ofdCanLock(second, "read", 201, 1), true, "only the locked byte");
    first.close();
    assert.equal(ofdCanLock(second, "write", 100, 101), true, "closing released everything");
  } finally {
    first.close();
    second.close();
    await Deno.remove(dir, { recursive: true });
  }
});
