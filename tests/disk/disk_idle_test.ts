/**
 * A disk process that has served a load and then has nothing to do sleeps:
 * no spin on the ring (the wait that watches it runs only while I/O is in
 * flight, and its spin is bounded), no polling loop burning the CPU.
 */
import assert from "node:assert/strict";
import { blktap } from "../_helpers/tools.ts";
import { CtrlHarness, rawImage } from "../_helpers/ctrl_harness.ts";

/** CPU time (user + system) of a process so far, in clock ticks. */
async function cpuTicks(pid: number): Promise<number> {
  const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]); // utime, stime
}

/** CPU an idle disk process may use, in clock ticks (10 ms each) over idle_seconds. */
const idle_ticks_max = 5;
const idle_seconds = 3;

Deno.test("disk process: idle after a load, it uses almost no CPU", async () => {
  const h = await CtrlHarness.start();
  try {
    const image = await rawImage(h.dir, "idle.raw", 16 << 20);
    await h.request({ op: "create", image: `aio:${image}`, name: "idle" });
    const load = await blktap([
      "exercise",
      "idle",
      "--requests",
      "4000",
      "--depth",
      "32",
      "--no-verify",
      "--run-dir",
      h.runDir,
    ]);
    assert.equal(load.code, 0, load.stderr);
    const pid = await h.diskPid(0);
    await new Promise((r) => setTimeout(r, 300)); // the last waits time out
    const before = await cpuTicks(pid);
    await new Promise((r) => setTimeout(r, idle_seconds * 1000));
    const used = (await cpuTicks(pid)) - before;
    assert.ok(used <= idle_ticks_max, `idle disk process used ${used} ticks in ${idle_seconds} s`);
  } finally {
    await h.close();
  }
});
