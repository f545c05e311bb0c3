/**
 * `blktap`: one executable, the subcommand picks the role (control daemon,
 * per-disk server, image tools).
 * @module
 */
import { COMMANDS } from "./src/cli/commands.ts";
import { HelpRequested, UsageError } from "./src/cli/command.ts";

const VERSION = "0.1.0";

function mainUsage(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length), 4);
  const lines = COMMANDS.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`);
  return [
    "usage: blktap COMMAND [OPTIONS] [ARGS]",
    "",
    "Userspace block devices served from image files (raw, qcow, vmdk, ...).",
    "",
    "Commands:",
    ...lines,
    "",
    "Run 'blktap COMMAND --help' for a command's options.",
  ].join("\n");
}

function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Runs `blktap` with `argv`; resolves to the exit status. */
export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === "--help" || name === "-h" || name === "help") {
    (name === undefined ? console.error : console.log)(mainUsage());
    return name === undefined ? 2 : 0;
  }
  if (name === "--version" || name === "-V") {
    console.log(`blktap ${VERSION}`);
    return 0;
  }
  const command = COMMANDS.find((c) => c.name === name);
  if (!command) {
    console.error(`blktap: unknown command '${name}'\n\n${mainUsage()}`);
    return 2;
  }
  try {
    return await command.run(rest);
  } catch (error) {
    if (error instanceof HelpRequested) {
      console.log(command.usage);
      return 0;
    }
    if (error instanceof UsageError) {
      // One line: what is wrong, and where the usage is.
      console.error(`blktap ${name}: ${error.message} (see 'blktap ${name} --help')`);
      return 2;
    }
    console.error(`blktap ${name}: ${errorMessage(error)}`);
    if (Deno.env.get("BLKTAP_DEBUG")) console.error(error);
    return 1;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
