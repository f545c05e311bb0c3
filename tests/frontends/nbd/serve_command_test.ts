/**
 * `blktap serve` probes once, at start, and serves what it found: a probed
 * raw image refuses (EPERM) writes that would make it probe as another
 * format, its chain stays in its folder unless --allow-path, and it holds
 * QEMU's image locks while it serves. Its default socket is in a private
 * directory of its own (never a fixed name in a shared folder), and its
 * help says what TCP exposes.
 */
import assert from "node:assert/strict";
import * as P from "../../../src/frontends/nbd/protocol.ts";
import { RawNbdClient } from "../../_helpers/nbd_client.ts";
import { hostileHeads } from "../../_helpers/hostile_heads.ts";
import { selfCommandFor } from "../../../src/cli/self_command.ts";
import { blktap, hasTool, MAIN_TS, missingTools, run, sha256File } from "../../_helpers/tools.ts";

const MiB = 1 << 20;

/** A running `blktap serve`, its Unix socket, and what it said. */
async function serve(args: string[], socket: string) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", "-A", MAIN_TS, "serve", ...args, "--socket", socket],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const output = child.output();
  for (let i = 0; i < 200; i += 1) {
    if (await Deno.stat(socket).then(() => true, () => false)) break;
    const exited = await Promise.race([
      child.status.then(() => true),
      new Promise((r) => setTimeout(() => r(false), 50)),
    ]);
    if (exited) break;
  }
  return {
    async stop() {
      try {
        child.kill("SIGTERM");
      } catch {
        // exited
      }
      const out = await output;
      const text = new TextDecoder();
      return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
    },
  };
}

async function nbdWrite(socket: string, offset: number, data: Uint8Array): Promise<number> {
  const client = await RawNbdClient.connect(socket);
  try {
    await client.go("");
    return await client.command(P.NBD_CMD_WRITE, 0, offset, data.byteLength, data);
  } finally {
    client.close();
  }
}

Deno.test("serve: a probed raw image says so, warns, and refuses a hostile head with EPERM", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-serve-" });
  try {
    const path = `${dir}/disk.raw`;
    await Deno.writeFile(path, new Uint8Array(4 * MiB));
    const server = await serve([path], `${dir}/nbd.sock`);
    const [qcow, , vmdk] = hostileHeads("/etc/shadow", 4 * MiB);
    const refusals = [
      await nbdWrite(`${dir}/nbd.sock`, 0, qcow.head),
      await nbdWrite(`${dir}/nbd.sock`, 0, vmdk.head),
      await nbdWrite(`${dir}/nbd.sock`, MiB, qcow.head),
    ];
    const { code, stderr } = await server.stop();
    assert.equal(code, 0, stderr);
    assert.deepEqual(refusals, [P.NBD_EPERM, P.NBD_EPERM, 0]);
    assert.match(stderr, /disk\.raw: format not given, probed as raw \(aio:/);
    assert.match(stderr, /WARNING: Image format was not specified for '.*disk\.raw'/);
    assert.deepEqual((await Deno.readFile(path)).subarray(0, 4096), new Uint8Array(4096));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "serve: holds QEMU's write lock on the image while it serves",
  ignore: missingTools("qemu-io").length > 0,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "blktap-serve-" });
    try {
      const path = `${dir}/disk.raw`;
      await Deno.writeFile(path, new Uint8Array(4 * MiB));
      const server = await serve([`aio:${path}`], `${dir}/nbd.sock`);
      const write = await run("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 512", path]);
      assert.equal((await server.stop()).code, 0);
      assert.match(write.stderr, /Failed to get "write" lock/, "serve holds the image lock");
      assert.deepEqual((await Deno.readFile(path)).subarray(0, 512), new Uint8Array(512));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("serve: a backing file outside the image's folder needs --allow-path", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-serve-" });
  try {
    await Deno.mkdir(`${dir}/images`);
    await Deno.mkdir(`${dir}/shared`);
    await Deno.writeFile(`${dir}/shared/base.raw`, new Uint8Array(4 * MiB).fill(3));
    const overlay = `${dir}/images/vm.qcow`;
    const created = await blktap(["qcow-create", "4", overlay, `${dir}/shared/base.raw`]);
    assert.equal(created.code, 0, created.stderr);
    const refused = await (await serve([`qcow:${overlay}`], `${dir}/a.sock`)).stop();
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /vm\.qcow: refusing backing file .*shared\/base\.raw/);
    assert.match(refused.stderr, /--allow-path DIR/);
    const allowed = await serve(
      [`qcow:${overlay}`, "--allow-path", `${dir}/shared`],
      `${dir}/b.sock`,
    );
    const client = await RawNbdClient.connect(`${dir}/b.sock`);
    try {
      await client.go("");
      assert.deepEqual(await client.read(0, 4096), new Uint8Array(4096).fill(3));
    } finally {
      client.close();
    }
    assert.equal((await allowed.stop()).code, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Starts `blktap serve ARGS`; resolves with the child and its first line of output. */
async function serveLine(args: string[], env: Record<string, string> = {}) {
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
    const { child, line } = await serveLine([`raw:${image}`], { TMPDIR: tmp });
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
    const { child, line } = await serveLine([`raw:${image}`, "--tcp", ":0"]);
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
