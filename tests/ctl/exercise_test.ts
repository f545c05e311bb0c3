/**
 * `blktap exercise` writes test patterns over a disk: it refuses a disk
 * with clients unless forced, its help says it destroys data, and the test
 * tools it runs are not part of the daemon's static code.
 */
import assert from "node:assert/strict";
import { RawNbdClient } from "../_helpers/nbd_client.ts";
import { blktap, sha256File } from "../_helpers/tools.ts";
import { CtrlHarness, rawImage } from "../_helpers/ctrl_harness.ts";
import { moduleGraph } from "../_helpers/module_graph.ts";

const MiB = 1 << 20;

/** `blktap ARGS` against the harness's ctrl. */
function cli(h: CtrlHarness, ...args: string[]) {
  return blktap([...args, "--run-dir", h.runDir]);
}

Deno.test("exercise: refuses a disk with an NBD client and leaves its data alone; --force runs", async () => {
  const h = await CtrlHarness.start();
  try {
    const image = await rawImage(h.dir, "live.raw", 4 * MiB);
    await Deno.writeFile(image, new Uint8Array(4 * MiB).fill(0x42));
    await h.request({ op: "create", image: `aio:${image}`, name: "live" });
    const before = await sha256File(image);
    const client = await RawNbdClient.connect(`${h.runDir}/nbd.sock`);
    try {
      await client.go("live");
      const refused = await cli(h, "exercise", "live", "--requests", "500");
      assert.equal(refused.code, 1, refused.stdout);
      assert.match(refused.stderr, /minor 0 \(live\) has clients: 1 NBD connection/);
      assert.match(refused.stderr, /destroys its data/);
      await assert.rejects(
        () => h.request({ op: "fuzz", minor: "live", entries: 10 }),
        /has clients: 1 NBD connection/,
      );
      assert.equal(await sha256File(image), before, "the refused run wrote nothing");
      assert.deepEqual(await client.read(0, 4096), new Uint8Array(4096).fill(0x42));
      const forced = await cli(h, "exercise", "live", "--requests", "500", "--force", "--json");
      assert.equal(forced.code, 0, forced.stderr);
      assert.equal(JSON.parse(forced.stdout).requests, 500);
      await h.request({ op: "pause", minor: "live" }); // its writes reach the file
      assert.notEqual(await sha256File(image), before, "--force did overwrite the disk");
      await h.request({ op: "resume", minor: "live" });
    } finally {
      client.close();
    }
    // Without clients, no --force is needed.
    for (let i = 0; i < 50; i++) {
      const alone = await cli(h, "exercise", "live", "--requests", "100");
      if (alone.code === 0) break;
      assert.match(alone.stderr, /has clients/); // the server may not have seen the close yet
      assert.ok(i < 49, "the closed client still counts");
      await new Promise((r) => setTimeout(r, 50));
    }
  } finally {
    await h.close();
  }
});

Deno.test("exercise --help says that it destroys the disk's data and how --force works", async () => {
  const help = await blktap(["exercise", "--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /DESTROYS DATA: writes test patterns over MINOR's disk/);
  assert.match(help.stdout, /--force\s+run even though the disk has clients/);
  const list = await blktap(["--help"]);
  assert.match(list.stdout, /exercise\s+.*DESTROYS the disk's data/);
});

/** The modules `root` loads without a dynamic import(), from `deno info --json`. */
Deno.test("the test front end and the malformed-entry generator are not in ctrl's static module graph", async () => {
  // main.ts loads ctrl_command.ts only when `blktap ctrl` runs (tests/cli/main_test.ts).
  for (const root of ["../../src/ctl/ctrl_command.ts"]) {
    const { statics, dynamics } = await moduleGraph(root, import.meta.url);
    assert.ok(statics.size > 20, `${root}: ${statics.size} modules`);
    const tools = [...statics].filter((s) => s.includes("/src/frontends/exercise/"));
    assert.deepEqual(tools, [], `${root} loads the test tools statically`);
    // Still reachable, on demand: the exercise and fuzz ops import them when they run.
    for (const tool of ["test_frontend.ts", "malformed.ts"]) {
      assert.ok([...dynamics].some((d) => d.endsWith(`/src/frontends/exercise/${tool}`)), tool);
    }
  }
});
