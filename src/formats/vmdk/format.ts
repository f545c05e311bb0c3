/**
 * The vmdk registry entry: probe (sparse magic `KDMV` or a text
 * descriptor), open, and the `info` and `check` hooks.
 * @module
 */
import type { FormatEntry } from "../format_entry.ts";
import { looksLikeDescriptor } from "./descriptor.ts";
import { hasSparseMagic } from "./sparse_header.ts";
import { openVmdk, vmdkInfo } from "./vmdk.ts";
import { vmdkCheck } from "./check.ts";

/** `vmdk:PATH`. */
export const VMDK_FORMAT: FormatEntry = {
  name: "vmdk",
  probe: (head) => hasSparseMagic(head) || looksLikeDescriptor(head),
  open: (path, options, context) => openVmdk(path, options, (p, o) => context.openFile(p, o)),
  info: vmdkInfo,
  check: vmdkCheck,
};
