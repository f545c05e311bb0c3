import assert from "node:assert/strict";
import { testSeed } from "../_helpers/random.ts";
import {
  assertClean,
  CtrlHarness,
  type Load,
  qcowImage,
  rawImage,
} from "../_helpers/ctrl_harness.ts";

const MiB = 1 << 20;
const load_ms = 60_000;

Deno.test("supervision: SIGKILL of disks every few seconds under 60 s of verified load", async () => {
  const rng = testSeed("supervision kills");
  // Killed on purpose ~15 times a minute: above the default crash-loop limit.
  const h = await CtrlHarness.start(["--restart-limit", "1000"]);
  try {
    const a = await rawImage(h.dir, "victim.raw", 32 * MiB);
    const q = await qcowImage(h.dir, "victim.qcow", 32);
    const b = await rawImage(h.dir, "bystander.raw", 32 * MiB);
    // QoS keeps the two loads from starving tests running beside this one.
    const qos = { maxIops: 2500, burstMs: 200 };
    const { minor: victim } = await h.request({
      op: "create",
      image: `aio:${a}`,
      name: "victim",
      ...qos,
    });
    const { minor: qvictim } = await h.request({
      op: "create",
      image: `qcow:${q}`,
      name: "qvictim",
      ...qos,
    });
    const { minor: bystander } = await h.request({
      op: "create",
      image: `aio:${b}`,
      name: "bystander",
      ...qos,
    });
    const bystanderPid = await h.diskPid(bystander as number);
    const started = Date.now();
    const victims = [victim, qvictim];
    const loads = [victim, qvictim, bystander].map((minor) =>
      h.request({
        op: "exercise",
        minor,
        durationMs: load_ms,
        depth: 16,
        indirectFraction: 0.05,
        seed: rng.int(0, 2 ** 31),
      }) as Promise<Load>
    );
    let kills = 0;
    while (Date.now() - started < load_ms - 4000) {
      await new Promise((r) => setTimeout(r, rng.int(2000, 4000)));
      for (const m of (await h.list()).filter((x) => victims.includes(x.minor))) {
        if (m.state === "running" && typeof m.pid === "number") {
          Deno.kill(m.pid, "SIGKILL");
          kills += 1;
        }
      }
    }
    const [hurt, qhurt, spared] = await Promise.all(loads);
    console.log(
      `kills: ${kills}; raw victim: ${hurt.requests} requests, qcow victim: ${qhurt.requests}, ` +
        `bystander: ${spared.requests}`,
    );
    assert.ok(kills >= 24, `only ${kills} kills`);
    const runs = [["victim", hurt], ["qvictim", qhurt], ["bystander", spared]] as const;
    for (const [name, r] of runs) {
      assertClean(r, name);
      assert.ok(r.verifiedSectors > 0);
    }
    const list = await h.list();
    const restarts = list.filter((x) => victims.includes(x.minor)).map((x) => x.restarts as number);
    assert.equal(restarts[0] + restarts[1], kills);
    const s = list.find((x) => x.minor === bystander)!;
    assert.equal(s.restarts, 0);
    assert.equal(s.pid, bystanderPid, "the bystander's process never changed");
  } finally {
    await h.close();
  }
});
