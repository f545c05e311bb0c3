/**
 * The format registry: every driver `openImage` knows, in probing order
 * (formats with a magic number first; raw is the fallback).
 * @module
 */
import type { FormatEntry } from "./format_entry.ts";
import { AIO_FORMAT, SYNC_FORMAT } from "./raw/raw.ts";
import { VMDK_FORMAT } from "./vmdk/format.ts";
import { RAM_FORMAT } from "./ram/ram.ts";
import { QCOW_FORMAT } from "./qcow/format.ts";
import { QCOW2_FORMAT } from "./qcow2/format.ts";
import { VHD_FORMAT } from "./vhd/format.ts";

export const FORMATS: FormatEntry[] = [
  QCOW_FORMAT,
  QCOW2_FORMAT,
  VMDK_FORMAT,
  VHD_FORMAT,
  AIO_FORMAT,
  RAM_FORMAT,
  SYNC_FORMAT,
];
