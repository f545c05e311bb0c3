/**
 * Every `blktap` subcommand, in the order `blktap --help` lists them, and
 * the module each lives in, loaded only when that command runs (dynamic
 * `import()` with a constant specifier, which `deno compile` includes): a
 * tool such as `convert` does not load the control daemon, the NBD server
 * or the ring. A command appears here only once it works.
 *
 * The table names each command (what `blktap NAME` picks) beside its
 * loader; its summary and usage stay in its module (`--help` loads them
 * all). A test checks that every name matches what its module defines.
 * @module
 */
import type { Command } from "./command.ts";

/** Commands defined by one module: their names, and the module's loader. */
interface CommandModule {
  names: string[];
  load(): Promise<Command[]>;
}

const MODULES: CommandModule[] = [
  {
    names: ["ctrl"],
    load: async () => [(await import("../ctl/ctrl_command.ts")).CTRL_COMMAND],
  },
  {
    names: ["create"],
    load: async () => [(await import("./create_command.ts")).CREATE_COMMAND],
  },
  {
    names: ["list", "stats", "pause", "resume", "destroy", "qos", "exercise"],
    load: async () => (await import("../ctl/verbs.ts")).CLIENT_VERBS,
  },
  { names: ["disk"], load: async () => [(await import("../disk/disk_command.ts")).DISK_COMMAND] },
  {
    names: ["serve"],
    load: async () => [(await import("../frontends/nbd/serve_command.ts")).SERVE_COMMAND],
  },
  { names: ["info"], load: async () => [(await import("../tools/info.ts")).INFO_COMMAND] },
  { names: ["map"], load: async () => [(await import("../tools/map.ts")).MAP_COMMAND] },
  { names: ["check"], load: async () => [(await import("../tools/check.ts")).CHECK_COMMAND] },
  {
    names: ["convert"],
    load: async () => [(await import("../tools/convert.ts")).CONVERT_COMMAND],
  },
  {
    names: ["qcow-create"],
    load: async () => [(await import("../tools/qcow_create.ts")).QCOW_CREATE_COMMAND],
  },
  {
    names: ["img2qcow"],
    load: async () => [(await import("../tools/img2qcow.ts")).IMG2QCOW_COMMAND],
  },
  {
    names: ["qcow2raw"],
    load: async () => [(await import("../tools/qcow2raw.ts")).QCOW2RAW_COMMAND],
  },
];

/** Every command name, in help order (no module loaded). */
export const COMMAND_NAMES: string[] = MODULES.flatMap((m) => m.names);

/** The command called `name`, its module loaded; undefined for an unknown name. */
export async function loadCommand(name: string): Promise<Command | undefined> {
  const module = MODULES.find((m) => m.names.includes(name));
  if (!module) return undefined;
  const command = (await module.load()).find((c) => c.name === name);
  if (!command) throw new Error(`command table: '${name}' is not defined by its module`);
  return command;
}

/** Every command, in help order (loads every module: for `--help`). */
export async function loadCommands(): Promise<Command[]> {
  const loaded = await Promise.all(MODULES.map((m) => m.load()));
  return loaded.flat();
}
