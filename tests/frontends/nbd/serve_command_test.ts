/**
 * `blktap serve`: its default socket is in a private directory of its own
 * (never a fixed name in a shared folder), and its help says what TCP
 * exposes.
 */
import assert from "node:assert/strict";
import { selfCommandFor } from "../../../src/cli/self_command.ts";
import { blktap, hasTool, run, sha256File } from "../../_helpers/tools.ts";

/** Starts `blktap serve ARGS`; resolves with the child and its first line of output. */
async function serve(args: string[], env: Record<string, string> = {}) {
  const child = selfCommandFor(["serve", ...args], {
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
    env,
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    text += value;
  }
  reader.releaseLock();
  return { child, line: text.split("\n")[0] };
}

async function stop(child: Deno.ChildProcess): Promise<void> {
  try {
    child.kill("SIGTERM");
  } catch {
    // gone
  }
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await child.status;
  clearTimeout(timer);
  await child.stdout.cancel().catch(() => {});
}

Deno.test("serve: the default socket is nbd.sock in a new private directory, removed at exit", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "blktap-serve-test-" });
  try {
    const image = `${tmp}/disk.raw`;
    await Deno.writeFile(image, new Uint8Array(1 << 20).fill(3));
    // What the fixed name of old pointed at: planted by someone else, never touched.
    const planted = `${tmp}/blktap-serve.sock`;
    await Deno.writeTextFile(planted, "not a socket");
    const before = await sha256File(planted);
    const { child, line } = await serve([`raw:${image}`], { TMPDIR: tmp });
    try {
      const socket = line.match(/socket=(\S+)/)?.[1];
      assert.ok(socket, line);
      const dir = socket.slice(0, socket.lastIndexOf("/"));
      assert.notEqual(socket, planted);
      assert.ok(dir.startsWith(`${tmp}/blktap-serve-`), dir);
      assert.equal((await Deno.lstat(dir)).mode! & 0o777, 0o700, "private directory");
      assert.equal((await Deno.lstat(socket)).mode! & 0o777, 0o600, "private socket");
      if (hasTool("nbdinfo")) {
        const info = await run("nbdinfo", ["--size", `nbd+unix:///?socket=${socket}`]);
        assert.equal(info.stdout.trim(), String(1 << 20), info.stderr);
      }
      await stop(child);
      assert.equal(await Deno.stat(dir).then(() => true, () => false), false, "removed at exit");
      assert.equal(await sha256File(planted), before);
    } finally {
      await stop(child);
    }
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("serve: --tcp without a host listens on 127.0.0.1 only", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "blktap-serve-test-" });
  try {
    const image = `${tmp}/disk.raw`;
    await Deno.writeFile(image, new Uint8Array(1 << 16));
    const { child, line } = await serve([`raw:${image}`, "--tcp", ":0"]);
    try {
      assert.match(line, /at nbd:\/\/127\.0\.0\.1:\d+\/$/);
    } finally {
      await stop(child);
    }
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("serve and ctrl --help say that NBD over TCP has no authentication and who can reach it", async () => {
  for (const command of ["serve", "ctrl"]) {
    const help = await blktap([command, "--help"]);
    assert.equal(help.code, 0);
    const text = help.stdout.replace(/\s+/g, " ");
    assert.match(text, /has no authentication and no encryption \(TLS is refused\)/, command);
    assert.match(text, /127\.0\.0\.1, which every local user can reach/, command);
  }
});

Deno.test("serve --payload-max and ctrl --nbd-payload-max refuse a budget below one request (exit 2)", async () => {
  for (
    const args of [["serve", "raw:/nonexistent", "--payload-max", "1M"], [
      "ctrl",
      "--nbd-payload-max",
      "1M",
    ]]
  ) {
    const out = await blktap(args);
    assert.equal(out.code, 2, args.join(" "));
    assert.match(
      out.stderr,
      /payload-max must be at least 33562624 bytes \(one 33554432-byte request\)/,
    );
  }
  const help = await blktap(["serve", "--help"]);
  assert.match(help.stdout, /--payload-max SIZE\s+memory for request and reply payloads/);
});
