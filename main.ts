/**
 * `blktap`: one executable, the subcommand picks the role (control daemon,
 * per-disk server, image tools).
 * @module
 */
import { loadCommand, loadCommands } from "./src/cli/commands.ts";
import { HelpRequested, UsageError } from "./src/cli/command.ts";

const VERSION = "0.1.0";

/** The overall usage: every command with its summary (loads every command's module). */
async function mainUsage(): Promise<string> {
  const commands = await loadCommands();
  const width = Math.max(...commands.map((c) => c.name.length), 4);
  const lines = commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`);
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
    (name === undefined ? console.error : console.log)(await mainUsage());
    return name === undefined ? 2 : 0;
  }
  if (name === "--version" || name === "-V") {
    console.log(`blktap ${VERSION}`);
    return 0;
  }
  // Only this command's module is loaded (startup of a tool stays short).
  const command = await loadCommand(name);
  if (!command) {
    console.error(`blktap: unknown command '${name}'\n\n${await mainUsage()}`);
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
