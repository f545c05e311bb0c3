/**
 * Running peer tools (qemu-img, qemu-io, nbdinfo...) and ./blktap from
 * tests, and finding out which peers are installed: the one place tests
 * detect tools and run processes.
 *
 * A test that needs a missing peer is `ignore:`d (reported as ignored),
 * never passed with its check skipped:
 *
 *     Deno.test({ name, ignore: missingTools("qemu-img").length > 0, fn })
 * @module
 */

/** Output of a finished command. */
export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Options of {@linkcode run}. */
export interface RunOptions {
  /** Bytes (or text) written to the child's stdin, which is then closed. */
  stdin?: Uint8Array | string;
  /** The child is SIGKILLed after this long (default 300 s), so a hang fails the test. */
  timeoutMs?: number;
}

/** Default bound on one peer invocation. */
export const run_timeout_ms_default = 300_000;

/**
 * Runs a command to completion, capturing output; never throws for a
 * non-zero exit (see {@linkcode runOk}). The child is killed when the
 * timeout passes or the test ends first.
 */
export async function run(
  cmd: string,
  args: string[],
  options: RunOptions | Uint8Array = {},
): Promise<RunResult> {
  const { stdin, timeoutMs } = options instanceof Uint8Array ? { stdin: options } : options;
  const child = new Deno.Command(cmd, {
    args,
    stdin: stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const kill = () => {
    try {
      child.kill("SIGKILL");
    } catch {
      // exited
    }
  };
  const timer = setTimeout(kill, timeoutMs ?? run_timeout_ms_default);
  try {
    if (stdin !== undefined) {
      const writer = child.stdin.getWriter();
      await writer.write(typeof stdin === "string" ? new TextEncoder().encode(stdin) : stdin);
      await writer.close();
    }
    const out = await child.output();
    const decoder = new TextDecoder();
    return {
      code: out.code,
      stdout: decoder.decode(out.stdout),
      stderr: decoder.decode(out.stderr),
    };
  } finally {
    clearTimeout(timer);
    kill();
  }
}

/** Runs a command and throws with its output unless it exits 0; resolves to stdout. */
export async function runOk(
  cmd: string,
  args: string[],
  options: RunOptions = {},
): Promise<string> {
  const result = await run(cmd, args, options);
  if (result.code !== 0) {
    throw new Error(
      `${cmd} ${args.join(" ")} exited ${result.code}:\n${result.stdout}\n${result.stderr}`,
    );
  }
  return result.stdout;
}

const found = new Map<string, boolean>();

/** True when `name` is an executable file on PATH. */
export function hasTool(name: string): boolean {
  let known = found.get(name);
  if (known !== undefined) return known;
  known = false;
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      const stat = Deno.statSync(`${dir || "."}/${name}`);
      if (stat.isFile && ((stat.mode ?? 0o111) & 0o111) !== 0) known = true;
    } catch {
      // not in this folder
    }
    if (known) break;
  }
  found.set(name, known);
  return known;
}

/**
 * The tools missing among `tools`, said once on stderr so an ignored test
 * explains itself. Use as `ignore: missingTools(...).length > 0`.
 */
export function missingTools(...tools: string[]): string[] {
  const missing = tools.filter((t) => !hasTool(t));
  if (missing.length > 0) console.error(`ignoring tests that need: ${missing.join(", ")}`);
  return missing;
}

/** qemu-img and qemu-io are both installed (CI installs them; elsewhere QEMU tests are ignored). */
export const haveQemu = hasTool("qemu-img") && hasTool("qemu-io");

/** Absolute path of the repository's main.ts. */
/** Runs `fn` in a fresh temp folder (named `prefix`...), removed afterwards. */
export async function inTempDir(
  fn: (dir: string) => Promise<void>,
  prefix = "blktap-test-",
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

export const MAIN_TS = new URL("../../main.ts", import.meta.url).pathname;

/** Runs `blktap ARGS` from source (the same code ./blktap runs). */
export function blktap(args: string[], options: RunOptions | Uint8Array = {}): Promise<RunResult> {
  return run(Deno.execPath(), ["run", "--quiet", "-A", MAIN_TS, ...args], options);
}

/** SHA-256 of a file, hex. */
export async function sha256File(path: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", await Deno.readFile(path));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}
