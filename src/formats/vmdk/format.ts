/**
 * The vmdk registry entry: probe (sparse magic `KDMV` or a text
 * descriptor), open, and the `info` and `check` hooks.
 * @module
 */
import type { CreateOptions, FormatEntry } from "../format_entry.ts";
import { CreateOptionError, readCreateOptions } from "../create_options.ts";
import { createVmdk } from "./create.ts";
import { looksLikeDescriptor } from "./descriptor.ts";
import { hasSparseMagic } from "./sparse_header.ts";
import { openVmdk, vmdkInfo } from "./vmdk.ts";
import { vmdkCheck } from "./check.ts";

/**
 * `blktap create -f vmdk`: monolithicSparse (QEMU's default subformat),
 * the size in whole sectors; no backing files.
 */
async function createHook(path: string, options: CreateOptions): Promise<void> {
  readCreateOptions("vmdk", options.options, { subformat: ["monolithicSparse"] });
  if (options.backingName !== undefined) {
    throw new CreateOptionError("vmdk: blktap cannot create vmdk images with a backing file");
  }
  const sizeBytes = Math.ceil(options.sizeBytes / 512) * 512;
  if (sizeBytes < 512) throw new CreateOptionError("vmdk: size must be at least 512 bytes");
  await Promise.resolve(createVmdk(path, sizeBytes));
}

/** `vmdk:PATH`. */
export const VMDK_FORMAT: FormatEntry = {
  name: "vmdk",
  probe: (head) => hasSparseMagic(head) || looksLikeDescriptor(head),
  open: (path, options, context) => openVmdk(path, options, (p, o) => context.openFile(p, o)),
  info: vmdkInfo,
  create: createHook,
  check: vmdkCheck,
};
