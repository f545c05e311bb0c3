/**
 * Running peer tools (qemu-img, qemu-io, nbdinfo...) and ./blktap from tests.
 * @module
 */

/** Output of a finished command. */
export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion, capturing output. */
export async function run(cmd: string, args: string[], stdin?: Uint8Array): Promise<RunResult> {
  const child = new Deno.Command(cmd, {
    args,
    stdin: stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (stdin) {
    const writer = child.stdin.getWriter();
    await writer.write(stdin);
    await writer.close();
  }
  const out = await child.output();
  const decoder = new TextDecoder();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** Runs a command and throws with its stderr unless it exits 0. */
export async function runOk(cmd: string, args: string[]): Promise<string> {
  const result = await run(cmd, args);
  if (result.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} exited ${result.code}: ${result.stderr}`);
  }
  return result.stdout;
}

/** True when `name` is on PATH. */
export function hasTool(name: string): boolean {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      if (Deno.statSync(`${dir}/${name}`).isFile) return true;
    } catch {
      // not in this folder
    }
  }
  return false;
}

/** Absolute path of the repository's main.ts. */
export const MAIN_TS = new URL("../../main.ts", import.meta.url).pathname;

/** Runs `blktap ARGS` from source (the same code ./blktap runs). */
export function blktap(args: string[], stdin?: Uint8Array): Promise<RunResult> {
  return run(Deno.execPath(), ["run", "--quiet", "-A", MAIN_TS, ...args], stdin);
}

/** SHA-256 of a file, hex. */
export async function sha256File(path: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", await Deno.readFile(path));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}
