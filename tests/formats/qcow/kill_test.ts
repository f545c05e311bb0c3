/** SIGKILL crash loop on a standalone image (see `_kill_loop.ts`). */
import { inTempDir } from "./_util.ts";
import { killLoop } from "./_kill_loop.ts";

Deno.test("qcow SIGKILL loop: standalone image, 110 kills", async () => {
  await inTempDir(async (dir) => {
    const flushed = await killLoop(dir, "kill-solo", false, 110);
    console.log(`standalone: 110 kills, ${flushed} flushed batches verified`);
  });
});
