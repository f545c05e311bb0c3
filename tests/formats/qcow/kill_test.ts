/** SIGKILL loops on a standalone image (see `_kill_loop.ts`). */
import assert from "node:assert/strict";
import { hasQemu, inTempDir } from "./_util.ts";
import { killLoop } from "./_kill_loop.ts";

Deno.test("qcow SIGKILL loop: standalone image, 110 kills: answered writes survive, leaks are reclaimed", async () => {
  const kills = 110;
  await inTempDir(async (dir) => {
    const r = await killLoop(dir, "kill-solo", false, kills, false);
    console.log(`standalone: ${kills} kills, ${JSON.stringify(r)}`);
    // Kills land 0..120 ms into the writing: most after answered, unflushed writes.
    assert.ok(r.answered >= 2 * kills, JSON.stringify(r));
    assert.ok(r.answeredUnflushed >= kills / 2, JSON.stringify(r));
    // Leaks are rare here: a table, its extent and L1 entry are written before
    // the first answer; the backed loop (kill_backed_test.ts) leaks at most kills.
  });
});

Deno.test({
  name: "qcow SIGKILL loop: standalone image, QEMU reads what we read after each kill",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const r = await killLoop(dir, "kill-solo-qemu", false, 15, true);
      assert.ok(r.answered > 0, JSON.stringify(r));
    });
  },
});
