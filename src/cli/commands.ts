/**
 * Every `blktap` subcommand, in the order `blktap --help` lists them. A
 * command appears here only once it works.
 * @module
 */
import type { Command } from "./command.ts";
import { SERVE_COMMAND } from "../ctl/nbd/serve_command.ts";

export const COMMANDS: Command[] = [
  SERVE_COMMAND,
];
