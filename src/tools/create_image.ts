/**
 * `blktap create -f FMT [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] FILE [SIZE]`:
 * a new image through the `create` hook of the format's registry entry,
 * as `qemu-img create` makes one: SIZE in bytes or with a suffix (K, M, G,
 * T, P), taken from the backing file when omitted with `-b`; the backing
 * file's format from `-F` or its header; one `Formatting ...` line unless
 * `-q`. Unlike `qemu-img create`, an existing FILE is never overwritten.
 * @module
 */
import { parseSize, UsageError } from "../cli/command.ts";
import { CreateOptionError, parseOptionList } from "../formats/create_options.ts";
import type { FormatEntry } from "../formats/format_entry.ts";
import { formatEntry, openImage, probeFormat } from "../formats/open_image.ts";
import { resolveBackingForCreate } from "./qcow_create.ts";
import { SysError } from "../../ffi/errno.ts";

/** What `blktap create -f` was asked, parsed. */
export interface CreateRequest {
  format: string;
  file: string;
  /** Undefined: from the backing file. */
  sizeText?: string;
  options: string[];
  backing?: string;
  backingFormat?: string;
  quiet: boolean;
}

/** The entry of a format that can create images; usage error otherwise. */
export function creatableFormat(name: string): FormatEntry {
  const entry = formatEntry(name);
  if (!entry) throw new UsageError(`unknown format '${name}'`);
  if (!entry.create) throw new UsageError(`blktap cannot create ${entry.name} images`);
  return entry;
}

/** Merges `-o` lists (later keys win); a malformed list is a usage error. */
export function optionRecord(lists: string[]): Record<string, string> {
  try {
    return Object.assign({}, ...lists.map(parseOptionList));
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

function _occupied(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

function registryName(format: string): string {
  const name = formatEntry(format)?.name ?? format;
  return name === "aio" || name === "sync" ? "raw" : name;
}

/** The backing file as stored, its format, and its size. */
async function _backing(request: CreateRequest) {
  let resolved;
  try {
    resolved = resolveBackingForCreate(request.backing!, request.file);
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
  if (request.backingFormat !== undefined && !formatEntry(request.backingFormat)) {
    throw new UsageError(`unknown backing format '${request.backingFormat}'`);
  }
  const format = request.backingFormat ?? await probeFormat(resolved.path);
  const parent = await openImage(`${format}:${resolved.path}`, {
    readOnly: true,
    cache: "writeback",
  });
  const sizeBytes = parent.sizeBytes;
  await parent.close();
  return { stored: resolved.stored, format: registryName(format), sizeBytes };
}

/** Creates the image; prints the `Formatting` line unless quiet. */
export async function createImage(request: CreateRequest): Promise<void> {
  const entry = creatableFormat(request.format);
  const options = optionRecord(request.options);
  if (request.sizeText === undefined && request.backing === undefined) {
    throw new UsageError("missing SIZE (it may only be omitted with -b)");
  }
  if (request.backingFormat !== undefined && request.backing === undefined) {
    throw new UsageError("-F needs -b");
  }
  let sizeBytes = request.sizeText === undefined ? 0 : parseSize(request.sizeText);
  if (_occupied(request.file)) {
    throw new Error(`${request.file} already exists; blktap create never overwrites an image`);
  }
  const backing = request.backing === undefined ? undefined : await _backing(request);
  if (backing && request.sizeText === undefined) sizeBytes = backing.sizeBytes;
  try {
    await entry.create!(request.file, {
      sizeBytes,
      backingName: backing?.stored,
      backingFormat: backing?.format,
      options,
    });
  } catch (error) {
    // Remove what the hook made, never a file that appeared meanwhile.
    if (!(error instanceof SysError && error.code === "EEXIST")) {
      await Deno.remove(request.file).catch(() => {});
    }
    if (error instanceof CreateOptionError) throw new UsageError(error.message);
    throw error;
  }
  if (!request.quiet) {
    const extra = backing ? ` backing_file=${backing.stored} backing_fmt=${backing.format}` : "";
    const opts = Object.entries(options).map(([k, v]) => ` ${k}=${v}`).join("");
    console.log(
      `Formatting '${request.file}', fmt=${
        registryName(entry.name)
      } size=${sizeBytes}${extra}${opts}`,
    );
  }
}
