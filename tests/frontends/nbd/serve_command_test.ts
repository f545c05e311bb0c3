/**
 * `blktap serve` probes once, at start, and serves what it found: a probed
 * raw image refuses (EPERM) writes that would make it probe as another
 * format, its chain stays in its folder unless --allow-path, and it holds
 * QEMU's image locks while it serves.
 */
import assert from "node:assert/strict";
import * as P from "../../../src/frontends/nbd/protocol.ts";
import { RawNbdClient } from "../../_helpers/nbd_client.ts";
import { hostileHeads } from "../../_helpers/hostile_heads.ts";
import { blktap, hasTool, MAIN_TS, run } from "../../_helpers/tools.ts";

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
    if (hasTool("qemu-io")) {
      const write = await run("qemu-io", ["-f", "raw", "-c", "write 0 512", path]);
      assert.match(write.stderr, /Failed to get "write" lock/, "serve holds the image lock");
    }
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
