import assert from "node:assert/strict";
import { testSeed } from "../_helpers/random.ts";
import { CtrlHarness, rawImage } from "./_ctrl_harness.ts";

const MiB = 1 << 20;
const load_ms = 60_000;

type Load = {
  requests: number;
  errors: number;
  mismatches: number;
  verifiedSectors: number;
  firstError?: string;
};

Deno.test("supervision: SIGKILL of a disk every few seconds under 60 s of verified load", async () => {
  const rng = testSeed("supervision kills");
  // Killed on purpose ~15 times a minute: above the default crash-loop limit.
  const h = await CtrlHarness.start(["--restart-limit", "1000"]);
  try {
    const a = await rawImage(h.dir, "victim.raw", 32 * MiB);
    const b = await rawImage(h.dir, "bystander.raw", 32 * MiB);
    // QoS keeps the two loads from starving tests running beside this one.
    const qos = { maxIops: 2500, burstMs: 200 };
    const { minor: victim } = await h.request({
      op: "create",
      image: `aio:${a}`,
      name: "victim",
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
    const loads = [victim, bystander].map((minor) =>
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
      const m = (await h.list()).find((x) => x.minor === victim)!;
      if (m.state === "running" && typeof m.pid === "number") {
        Deno.kill(m.pid, "SIGKILL");
        kills += 1;
      }
    }
    const [hurt, spared] = await Promise.all(loads);
    console.log(
      `kills: ${kills}; victim: ${hurt.requests} requests, bystander: ${spared.requests} requests`,
    );
    assert.ok(kills >= 12, `only ${kills} kills`);
    for (const [name, r] of [["victim", hurt], ["bystander", spared]] as const) {
      assert.equal(r.errors, 0, `${name}: ${r.firstError}`);
      assert.equal(r.mismatches, 0, `${name}: ${r.firstError}`);
      assert.ok(r.verifiedSectors > 0);
    }
    const list = await h.list();
    const v = list.find((x) => x.minor === victim)!;
    const s = list.find((x) => x.minor === bystander)!;
    assert.equal(v.restarts, kills);
    assert.equal(v.state, "running");
    assert.equal(s.restarts, 0);
    assert.equal(s.pid, bystanderPid, "the bystander's process never changed");
  } finally {
    await h.close();
  }
});
