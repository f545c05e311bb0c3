/**
 * In-process harness for NBD front-end tests: a server on a temporary Unix
 * socket serving a map of exports, peer tools run as child processes with a
 * timeout (killed in `finally`), and `requires` checks that let a test skip
 * cleanly when a peer is missing.
 * @module
 */
import type { BlockDriver } from "../../src/formats/driver.ts";
import { type NbdExport, type NbdServer, startNbdServer } from "../../src/frontends/nbd/server.ts";
import type { NbdLimits } from "../../src/frontends/nbd/limits.ts";

const toolCache = new Map<string, boolean>();

/** True when `tool` is on PATH. */
export function haveTool(tool: string): boolean {
  let found = toolCache.get(tool);
  if (found === undefined) {
    const out = new Deno.Command("sh", {
      args: ["-c", `command -v ${tool}`],
      stdout: "null",
      stderr: "null",
    })
      .outputSync();
    found = out.success;
    toolCache.set(tool, found);
  }
  return found;
}

/** The tools missing among `tools` (for `ignore:` and its message). */
export function missingTools(...tools: string[]): string[] {
  const missing = tools.filter((t) => !haveTool(t));
  if (missing.length > 0) console.error(`skipping: missing ${missing.join(", ")}`);
  return missing;
}

/** A running test server. */
export interface NbdHarness {
  server: NbdServer;
  socket: string;
  dir: string;
  /** `nbd+unix:///NAME?socket=...` */
  uri(name?: string): string;
  /** The same for qemu (`nbd:unix:PATH:exportname=NAME`). */
  qemuUri(name?: string): string;
}

/** Export descriptions for {@linkcode withNbdServer}. */
export interface HarnessExport {
  name: string;
  driver: BlockDriver;
  readOnly?: boolean;
  description?: string;
}

/** Runs `body` with a server on a fresh socket; always closes it and removes the folder. */
export async function withNbdServer(
  exports: HarnessExport[],
  body: (h: NbdHarness) => Promise<void>,
  limits?: Partial<NbdLimits>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-nbd-" });
  const socket = `${dir}/nbd.sock`;
  const table = new Map<string, NbdExport>(
    exports.map((e) => [e.name, { ...e, readOnly: e.readOnly ?? false }]),
  );
  const server = await startNbdServer({
    unixPath: socket,
    lookup: (name) => table.get(name),
    list: () => [...table.values()],
    limits,
    log: (level, message) => {
      if (Deno.env.get("NBD_TEST_LOG") || level === "warn") {
        console.error(`[nbd ${level}] ${message}`);
      }
    },
  });
  try {
    await body({
      server,
      socket,
      dir,
      uri: (name = "") => `nbd+unix:///${name}?socket=${socket}`,
      qemuUri: (name = "") => `nbd+unix:///${name}?socket=${socket}`,
    });
  } finally {
    await server.close();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Result of {@linkcode run}. */
export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs a peer tool with a timeout; the child is killed if the test ends
 * first or the timeout passes. Throws unless it exits 0 (when `check`).
 */
export async function run(
  command: string,
  args: string[],
  options: { check?: boolean; timeoutMs?: number; stdin?: string } = {},
): Promise<RunResult> {
  const child = new Deno.Command(command, {
    args,
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  }, options.timeoutMs ?? 60_000);
  try {
    if (options.stdin !== undefined) {
      const writer = child.stdin.getWriter();
      await writer.write(new TextEncoder().encode(options.stdin));
      await writer.close();
    }
    const out = await child.output();
    const result = {
      code: out.code,
      stdout: new TextDecoder().decode(out.stdout),
      stderr: new TextDecoder().decode(out.stderr),
    };
    if ((options.check ?? true) && out.code !== 0) {
      throw new Error(
        `${command} ${args.join(" ")} exited ${out.code}:\n${result.stdout}\n${result.stderr}`,
      );
    }
    return result;
  } finally {
    clearTimeout(timer);
    try {
      child.kill("SIGKILL");
    } catch {
      // exited
    }
  }
}
