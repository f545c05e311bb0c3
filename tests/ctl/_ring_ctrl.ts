/**
 * A `blktap ctrl` (the same `Ctrl` class) that also lets a test act as a
 * guest on a minor's ring, as the kernel front end does: blkif requests
 * straight into the ring, no NBD. Run as a script:
 *
 *   deno run -A tests/ctl/_ring_ctrl.ts RUN_DIR SHM_DIR
 *
 * It serves ctrl's API on RUN_DIR/ctrl.sock and the guest's requests on
 * RUN_DIR/ring-guest/ctrl.sock (same framing, so `ctlRequest` is the client):
 * `{op: "write", name, offset, data}` and `{op: "read", name, offset,
 * length}`, data in base64. A test kills it with SIGKILL and starts another
 * on the same run dir to restart ctrl.
 */
import { Buffer } from "node:buffer";
import { Ctrl } from "../../src/ctl/daemon.ts";
import { ctlRequest } from "../../src/ctl/client.ts";
import { CTRL_SOCKET_NAME } from "../../src/cli/run_dir.ts";
import { setLogLevel } from "../../src/cli/log.ts";

const GUEST_DIR = "ring-guest";

const encodeBase64 = (bytes: Uint8Array) => Buffer.from(bytes).toString("base64");
const decodeBase64 = (text: string) => new Uint8Array(Buffer.from(text, "base64"));

async function guest(ctrl: Ctrl, request: Record<string, unknown>) {
  const disk = ctrl.exportByName(String(request.name));
  if (!disk) throw new Error(`no export ${request.name}`);
  const offset = Number(request.offset);
  if (request.op === "write") {
    await disk.write(offset, decodeBase64(String(request.data)));
    return {};
  }
  const buffer = new Uint8Array(Number(request.length));
  await disk.read(offset, buffer);
  return { data: encodeBase64(buffer) };
}

async function serveGuest(ctrl: Ctrl, listener: Deno.Listener): Promise<void> {
  for await (const conn of listener) {
    (async () => {
      const text = new TextDecoder();
      const buffer = new Uint8Array(1 << 20);
      let line = "";
      while (!line.includes("\n")) {
        const n = await conn.read(buffer);
        if (n === null) return;
        line += text.decode(buffer.subarray(0, n), { stream: true });
      }
      let reply: Record<string, unknown>;
      try {
        reply = { ok: true, ...await guest(ctrl, JSON.parse(line)) };
      } catch (error) {
        reply = { ok: false, error: (error as Error).message };
      }
      const bytes = new TextEncoder().encode(JSON.stringify(reply) + "\n");
      for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
      conn.close();
    })().catch(() => {});
  }
}

if (import.meta.main) {
  const [runDir, shmDir] = Deno.args;
  setLogLevel("warn");
  const ctrl = new Ctrl({ runDir, shmDir });
  await ctrl.start();
  const dir = `${runDir}/${GUEST_DIR}`;
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  await Deno.remove(`${dir}/${CTRL_SOCKET_NAME}`).catch(() => {});
  await serveGuest(ctrl, Deno.listen({ transport: "unix", path: `${dir}/${CTRL_SOCKET_NAME}` }));
}

/** A ring ctrl run for a test; `kill()` is a ctrl crash, `start()` again restarts it. */
export class RingCtrl {
  readonly runDir: string;
  readonly shmDir: string;
  #child: Deno.ChildProcess | undefined;

  constructor(runDir: string, shmDir: string) {
    this.runDir = runDir;
    this.shmDir = shmDir;
  }

  /** Starts the script and waits until both sockets answer. */
  async start(): Promise<void> {
    this.#child = new Deno.Command(Deno.execPath(), {
      args: ["run", "--quiet", "-A", new URL(import.meta.url).pathname, this.runDir, this.shmDir],
      stdin: "null",
      stdout: "null",
      stderr: "inherit",
    }).spawn();
    for (let i = 0; i < 200; i += 1) {
      try {
        await ctlRequest(this.runDir, { op: "list" });
        await this.read("-", 0, 0).catch((e) => {
          if (!/no export/.test(e.message)) throw e;
        });
        return;
      } catch {
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    throw new Error("ring ctrl did not start");
  }

  /** SIGKILLs the ctrl (its disk processes drain and exit when they notice). */
  async kill(): Promise<void> {
    this.#child?.kill("SIGKILL");
    await this.#child?.status;
    this.#child = undefined;
  }

  /** A ring write by the guest; resolves to undefined or the error the ring answered. */
  async write(name: string, offset: number, data: Uint8Array): Promise<string | undefined> {
    try {
      await this.#guest({ op: "write", name, offset, data: encodeBase64(data) });
      return undefined;
    } catch (error) {
      return (error as Error).message;
    }
  }

  /** A ring read by the guest. */
  async read(name: string, offset: number, length: number): Promise<Uint8Array> {
    const reply = await this.#guest({ op: "read", name, offset, length });
    return decodeBase64(String(reply.data));
  }

  #guest(request: Record<string, unknown>) {
    return ctlRequest(`${this.runDir}/${GUEST_DIR}`, request);
  }
}
