/**
 * Every `blktap` subcommand, in the order `blktap --help` lists them. A
 * command appears here only once it works.
 * @module
 */
import type { Command } from "./command.ts";
import { SERVE_COMMAND } from "../frontends/nbd/serve_command.ts";
import { CTRL_COMMAND } from "../ctl/ctrl_command.ts";
import { CLIENT_VERBS } from "../ctl/verbs.ts";
import { CREATE_COMMAND } from "./create_command.ts";
import { DISK_COMMAND } from "../disk/disk_command.ts";
import { INFO_COMMAND } from "../tools/info.ts";
import { MAP_COMMAND } from "../tools/map.ts";
import { CHECK_COMMAND } from "../tools/check.ts";
import { QCOW_CREATE_COMMAND } from "../tools/qcow_create.ts";
import { IMG2QCOW_COMMAND } from "../tools/img2qcow.ts";
import { QCOW2RAW_COMMAND } from "../tools/qcow2raw.ts";
import { CONVERT_COMMAND } from "../tools/convert.ts";

export const COMMANDS: Command[] = [
  CTRL_COMMAND,
  CREATE_COMMAND,
  ...CLIENT_VERBS,
  DISK_COMMAND,
  SERVE_COMMAND,
  INFO_COMMAND,
  MAP_COMMAND,
  CHECK_COMMAND,
  CONVERT_COMMAND,
  QCOW_CREATE_COMMAND,
  IMG2QCOW_COMMAND,
  QCOW2RAW_COMMAND,
];
