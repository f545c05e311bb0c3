/**
 * Counters across restarts: a minor's totals since create include what its
 * SIGKILLed disk processes counted (they cannot report at death: the counts
 * live in the minor's shared-memory stats file), the restart count stands
 * beside them, and a ctrl restart keeps all of it.
 */
import assert from "node:assert/strict";
import { CtrlHarness, type Load, rawImage, waitRunning } from "../_helpers/ctrl_harness.ts";
import { testSeed } from "../_helpers/random.ts";
import { blktap } from "../_helpers/tools.ts";

const MiB = 1 << 20;
const fuzz_entries = 1500;
const kills = 3;

interface Counters {
  ops: Record<string, number>;
  errors: number;
  invalid: number;
}
interface Stats {
  pid: number | null;
  state: string;
  restarts: number;
  disk: Counters;
  total: Counters;
}

const opsOf = (c: Counters) => Object.values(c.ops).reduce((a, b) => a + b, 0);

async function stats(h: CtrlHarness, minor: number): Promise<Stats> {
  return await h.request({ op: "stats", minor }) as unknown as Stats;
}

Deno.test("ctrl: totals since create keep the counts of SIGKILLed disk processes, with restarts, across a ctrl restart", async () => {
  const rng = testSeed("counters across restarts");
  const h = await CtrlHarness.start(["--restart-limit", "100"]);
  try {
    const image = await rawImage(h.dir, "a.raw", 16 * MiB);
    await h.request({ op: "create", image: `aio:${image}` });

    // A verified load runs throughout, across every kill.
    let loading = true;
    let loadRequests = 0;
    const load = (async () => {
      while (loading) {
        const seed = rng.int(0, 2 ** 31);
        const result = await h.request({
          op: "exercise",
          minor: 0,
          requests: 1500,
          depth: 8,
          seed,
        }) as Load;
        assert.equal(result.errors, 0, `load seed ${seed}: ${result.firstError}`);
        assert.equal(result.mismatches, 0, `load seed ${seed}: ${result.firstError}`);
        loadRequests += result.requests;
      }
    })();

    let deadOps = 0; // what the killed processes had counted at least
    let lastTotalOps = 0;
    try {
      for (let k = 1; k <= kills; k += 1) {
        // Exactly fuzz_entries refused requests in this process: errors of known number.
        const fuzz = await h.request({
          op: "fuzz",
          minor: 0,
          entries: fuzz_entries,
          depth: 8,
          seed: rng.int(0, 2 ** 31),
        });
        assert.equal(fuzz.wrongStatus, 0, String(fuzz.firstWrong));
        const before = await stats(h, 0);
        assert.equal(before.disk.invalid, fuzz_entries, "this process's refusals");
        assert.equal(before.total.invalid, k * fuzz_entries, "refusals since create");
        assert.equal(before.restarts, k - 1);
        assert.ok(opsOf(before.total) >= lastTotalOps, "totals never go back");
        const pid = before.pid!;
        deadOps += opsOf(before.disk);
        Deno.kill(pid, "SIGKILL");
        await waitRunning(h.runDir, { replacing: [pid] });

        const after = await stats(h, 0);
        assert.equal(after.restarts, k, "restarts since create");
        assert.equal(after.disk.invalid, 0, "a new process starts from zero");
        assert.equal(after.total.invalid, k * fuzz_entries, "the dead process's refusals are kept");
        assert.equal(
          after.total.errors,
          k * fuzz_entries,
          "errors since create: the refusals, no more",
        );
        assert.ok(
          opsOf(after.total) >= deadOps + opsOf(after.disk),
          `${opsOf(after.total)} ops since create`,
        );
        lastTotalOps = opsOf(after.total);
      }
    } finally {
      loading = false;
      await load;
    }
    assert.ok(loadRequests > 0);

    // What the CLI shows: restarts beside totals since create and per process.
    const listed = await blktap(["list", "--run-dir", h.runDir]);
    assert.equal(listed.code, 0, listed.stderr);
    const [header, row] = listed.stdout.trim().split("\n").map((l) => l.split(/\s+/));
    const column = (name: string) => row[header.indexOf(name)];
    assert.equal(column("RESTARTS"), String(kills));
    assert.equal(column("ERRORS"), String(kills * fuzz_entries));
    assert.equal(column("PROC-ERRORS"), "0");
    const text = await blktap(["stats", "0", "--run-dir", h.runDir]);
    assert.match(
      text.stdout,
      new RegExp(
        `since create \\(all disk processes, ${kills} restarts\\):\\n(  .*\\n)*  invalid: ${
          kills * fuzz_entries
        }\\n`,
      ),
    );
    assert.match(
      text.stdout,
      /this disk process \(pid \d+, since .*\):\n( {2}.*\n)* {2}invalid: 0\n/,
    );
    const json = JSON.parse((await blktap(["stats", "0", "--json", "--run-dir", h.runDir])).stdout);
    assert.equal(json.total.invalid, kills * fuzz_entries);
    assert.equal(json.restarts, kills);

    // A ctrl restart keeps the totals (its new disk process starts from zero).
    const beforeCtrl = await stats(h, 0);
    await h.killCtrl();
    await h.startCtrl(["--restart-limit", "100"]);
    const afterCtrl = await stats(h, 0);
    assert.equal(afterCtrl.restarts, kills);
    assert.equal(afterCtrl.total.invalid, kills * fuzz_entries);
    assert.equal(afterCtrl.total.errors, kills * fuzz_entries);
    assert.ok(opsOf(afterCtrl.total) >= opsOf(beforeCtrl.total), "ops since create survive ctrl");
    assert.equal(afterCtrl.disk.invalid, 0);
  } finally {
    await h.close();
  }
});
