/**
 * `blktap disk` started by hand with a minor ctrl does not serve, or with a
 * minor that is not a number: one clear line on stderr and exit 2, and the
 * disks ctrl does serve are not disturbed.
 */
import assert from "node:assert/strict";
import { CtrlHarness, rawImage } from "../_helpers/ctrl_harness.ts";
import { blktap } from "../_helpers/tools.ts";

function oneLine(stderr: string, what: string): string {
  const lines = stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `${what}: one line, got ${JSON.stringify(stderr)}`);
  return lines[0];
}

Deno.test("disk: --minor -1, --minor x and a missing --minor are one-line usage errors (exit 2)", async () => {
  for (const args of [["--minor", "-1"], ["--minor=-1"], ["--minor", "x"], []]) {
    const result = await blktap(["disk", ...args, "--run-dir", "/nonexistent"]);
    assert.equal(result.code, 2, `disk ${args.join(" ")}: ${result.stderr}`);
    const line = oneLine(result.stderr, `disk ${args.join(" ")}`);
    assert.match(
      line,
      /^blktap disk: --minor (expects a non-negative integer, got '(-1|x)'|is required)/,
    );
    assert.equal(result.stdout, "");
  }
});

Deno.test("disk: a minor ctrl does not have, or serves itself, is refused with one line (exit 2)", async () => {
  const h = await CtrlHarness.start();
  try {
    const unknown = await blktap(["disk", "--minor", "999", "--run-dir", h.runDir]);
    assert.equal(unknown.code, 2, unknown.stderr);
    assert.match(
      oneLine(unknown.stderr, "minor 999"),
      /^blktap disk: minor 999: .*has no minor 999$/,
    );

    const image = await rawImage(h.dir, "a.raw", 1 << 20);
    await h.request({ op: "create", image: `aio:${image}` });
    const pid = await h.diskPid(0);
    const taken = await blktap(["disk", "--minor", "0", "--run-dir", h.runDir]);
    assert.equal(taken.code, 2, taken.stderr);
    assert.match(
      oneLine(taken.stderr, "minor 0"),
      new RegExp(`^blktap disk: minor 0: minor 0 is served by pid ${pid}`),
    );
    const [minor] = await h.list();
    assert.deepEqual([minor.pid, minor.state, minor.restarts], [pid, "running", 0]);
  } finally {
    await h.close();
  }
});
