/**
 * How to run `blktap` itself again (ctrl spawning `blktap disk`, tests
 * spawning ctrl): `$BLKTAP_EXE` (set by the ./blktap launcher), else the
 * compiled executable, else `deno run -A main.ts`.
 * @module
 */

/** The argv prefix that runs `blktap`; append the subcommand and its options. */
export function selfCommand(): string[] {
  const fromEnv = Deno.env.get("BLKTAP_EXE");
  if (fromEnv) return [fromEnv];
  const exe = Deno.execPath();
  const base = exe.slice(exe.lastIndexOf("/") + 1);
  if (base !== "deno") return [exe];
  const main = new URL("../../main.ts", import.meta.url).pathname;
  return [exe, "run", "--quiet", "--no-prompt", "-A", main];
}

/** A `Deno.Command` running `blktap ...args`. */
export function selfCommandFor(args: string[], options: Deno.CommandOptions = {}): Deno.Command {
  const [program, ...prefix] = selfCommand();
  return new Deno.Command(program, { ...options, args: [...prefix, ...args] });
}
