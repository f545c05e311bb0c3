/** SIGKILL crash loop on an image over a backing file (see `_kill_loop.ts`). */
import { inTempDir } from "./_util.ts";
import { killLoop } from "./_kill_loop.ts";

Deno.test("qcow SIGKILL loop: image over a backing file, 100 kills", async () => {
  await inTempDir(async (dir) => {
    const flushed = await killLoop(dir, "kill-backed", true, 100);
    console.log(`backed: 100 kills, ${flushed} flushed batches verified`);
  });
});
