/**
 * The SIGKILL loops' writer: a Deno script that writes `ready` at the start
 * of its log, then logs each answered batch. It is started, given time to
 * write, and killed with SIGKILL, so that nothing it did not answer is
 * expected and nothing it answered may be lost.
 * @module
 */

/** How long a writer may take to start (a loaded machine compiles slowly). */
const ready_wait_ms = 30_000;

/**
 * Runs `deno run -A script ...args`, waits until `log` starts with
 * `ready`, lets it write for `writeMs`, then kills it with SIGKILL and
 * reaps it. Throws, with the writer's stderr, if it exits or stalls before
 * it is ready.
 */
export async function killWriterAfter(
  script: string,
  args: string[],
  log: string,
  writeMs: number,
): Promise<void> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", "-A", script, ...args],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let failure: Error | undefined;
  try {
    await waitForReady(log, child);
    await new Promise((r) => setTimeout(r, writeMs));
  } catch (e) {
    failure = e as Error;
  } finally {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
  const { stderr } = await child.output();
  if (failure) throw new Error(`${failure.message}: ${new TextDecoder().decode(stderr)}`);
}

async function waitForReady(log: string, child: Deno.ChildProcess): Promise<void> {
  const deadline = Date.now() + ready_wait_ms;
  let exited = false;
  child.status.then(() => (exited = true));
  while (Date.now() < deadline && !exited) {
    try {
      if ((await Deno.readTextFile(log)).startsWith("ready")) return;
    } catch {
      // not created yet
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`writer logging to ${log} did not start (exited: ${exited})`);
}
