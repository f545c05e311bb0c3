/** SIGKILL loops on an image over a backing file (see `_kill_loop.ts`). */
import assert from "node:assert/strict";
import { hasQemu, inTempDir } from "./_util.ts";
import { killLoop } from "./_kill_loop.ts";

Deno.test("qcow SIGKILL loop: image over a backing file, 100 kills: answered writes survive, leaks are reclaimed", async () => {
  const kills = 100;
  await inTempDir(async (dir) => {
    const r = await killLoop(dir, "kill-backed", true, kills, false);
    console.log(`backed: ${kills} kills, ${JSON.stringify(r)}`);
    assert.ok(r.answered >= 2 * kills, JSON.stringify(r));
    assert.ok(r.answeredUnflushed >= kills / 2, JSON.stringify(r));
    assert.ok(r.leakedAfterKillMax > 0, "the kills left space to reclaim");
  });
});

Deno.test({
  name: "qcow SIGKILL loop: image over a backing file, QEMU reads what we read after each kill",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const r = await killLoop(dir, "kill-backed-qemu", true, 15, true);
      assert.ok(r.answered > 0, JSON.stringify(r));
    });
  },
});
