import assert from "node:assert/strict";
import { File, POLLIN } from "../../ffi/file.ts";
import { run } from "../_helpers/tools.ts";

// File.poll is how a disk process waits for a kernel ring device's
// "requests published": it must wait off the JavaScript thread, time out
// with 0 and report readiness.
Deno.test("file: poll times out with 0, then reports POLLIN once there is data", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-poll-" });
  try {
    const fifo = `${dir}/fifo`;
    assert.equal((await run("mkfifo", [fifo])).code, 0);
    const file = File.open(fifo, { write: true }); // O_RDWR: no wait for a peer
    try {
      assert.equal(await file.poll(POLLIN, 20), 0);
      let timerRan = false;
      const waiting = file.poll(POLLIN, 5000);
      setTimeout(() => {
        timerRan = true; // the event loop runs while poll waits
        Deno.writeFileSync(fifo, new Uint8Array([1]), { append: true });
      }, 30);
      assert.equal((await waiting) & POLLIN, POLLIN);
      assert.ok(timerRan);
    } finally {
      file.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
