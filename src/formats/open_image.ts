/**
 * Opens images named as `type:path` (`qcow:/img/a.qcow`, as in `tap:qcow:`
 * disk configs) or as a bare path whose format is probed from its header.
 * Backing chains are opened through {@linkcode OpenContext.openBacking},
 * which resolves relative names, refuses loops and, for served images,
 * applies the {@linkcode ChainPolicy}.
 *
 * Probing reads bytes a guest can write: whoever serves a disk probes once,
 * when it is attached ({@linkcode resolveImageSpec}), records `type:path`,
 * and opens by that ever after.
 * @module
 */
import { BlockDriver, BlockError } from "./driver.ts";
import type { ImageOpenOptions } from "./image_file.ts";
import { FORMATS } from "./formats.ts";
import { openImageFile } from "./raw/open_file.ts";
import { probe_head_bytes } from "./raw/probe_guard.ts";
import type { FormatEntry, OpenContext } from "./format_entry.ts";
import { type ChainPolicy, checkChainPath, resolveStoredName } from "./chain_policy.ts";

export type { FormatEntry, OpenContext } from "./format_entry.ts";

/** The registry entry for a format name or alias. */
export function formatEntry(name: string): FormatEntry | undefined {
  return findFormat(name);
}

const backing_chain_depth_max = 64;
/** The last bytes probed too: a fixed VHD's footer (QEMU opens a VHD by it only when fixed). */
const probe_tail_bytes = 512;

/** Splits `type:path`; a spec without a known type is a bare path. */
export function parseImageSpec(spec: string): { format?: string; path: string } {
  const colon = spec.indexOf(":");
  if (colon > 0) {
    const type = spec.slice(0, colon);
    if (findFormat(type)) return { format: type, path: spec.slice(colon + 1) };
  }
  return { path: spec };
}

function findFormat(name: string): FormatEntry | undefined {
  return FORMATS.find((f) => f.name === name || f.aliases?.includes(name));
}

/** The file a spec names (a bare path or `type:path`); undefined for fileless types (`ram:`). */
export function specFilePath(spec: string): string | undefined {
  const { format, path } = parseImageSpec(spec);
  return format && findFormat(format)?.fileless ? undefined : path;
}

/** Names of every registered format, for help texts. */
export function formatNames(): string[] {
  return FORMATS.map((f) => f.name);
}

/**
 * The format whose probe claims `head` (a file's first bytes, up to
 * {@linkcode probe_head_bytes}), or undefined when none does (raw).
 */
export function probeHead(head: Uint8Array): string | undefined {
  return FORMATS.find((f) => f.probe?.(head))?.name;
}

/** Reads the file's first bytes and asks each format whether they are its own (else `aio`). */
export async function probeFormat(path: string): Promise<string> {
  const file = await openImageFile(path, { readOnly: true, cache: "writeback", lock: false });
  try {
    const length = file.lengthBytes();
    const head = new Uint8Array(Math.min(probe_head_bytes, length));
    await file.read(0, head);
    const tail = new Uint8Array(Math.min(probe_tail_bytes, length));
    await file.read(length - tail.byteLength, tail);
    return probeHead(head) ?? FORMATS.find((f) => f.probe?.(head, tail))?.name ?? "aio";
  } finally {
    await file.close();
  }
}

/** An image spec made explicit, once, when a disk is attached. */
export interface ResolvedImageSpec {
  /** `type:path` with an absolute path: what to record and open by from now on. */
  spec: string;
  /** Registry name of the format (`aio`, `qcow`, ...). */
  format: string;
  /** The file, absolute; undefined for formats that do not name one (`ram:`). */
  path?: string;
  /** True when the format was probed (the user named none). */
  probed: boolean;
  /** Probed as raw and to be written: open it with `probedRaw` (the probe guard). */
  probedRaw: boolean;
  /** QEMU's warning for that case, to show the user. */
  warning?: string;
}

/**
 * Makes `spec` explicit: a bare path is probed now (its first 4 KiB read)
 * and becomes `type:path`; a relative path becomes absolute (against
 * `cwd`). Throws EINVAL naming the file when it cannot be read.
 * @param readOnly whether the image will be served read-only (then no guard is needed)
 */
export async function resolveImageSpec(
  spec: string,
  readOnly: boolean,
  cwd = Deno.cwd(),
): Promise<ResolvedImageSpec> {
  const parsed = parseImageSpec(spec);
  const entry = parsed.format ? findFormat(parsed.format)! : undefined;
  if (entry?.fileless) return { spec, format: entry.name, probed: false, probedRaw: false };
  const path = absolutePath(parsed.path, cwd);
  let format = entry?.name;
  if (!format) {
    try {
      format = await probeFormat(path);
    } catch (error) {
      const why = (error as Error).message;
      throw new BlockError("EINVAL", `${path}: cannot probe the image format: ${why}`);
    }
  }
  const probed = entry === undefined;
  const probedRaw = probed && format === "aio" && !readOnly;
  return {
    spec: `${format}:${path}`,
    format,
    path,
    probed,
    probedRaw,
    ...(probedRaw ? { warning: probedRawWarning(path) } : {}),
  };
}

/** What to tell the user whose image's format was probed (`spec` as resolved). */
export function probedNote(spec: string): string {
  const { format, path } = parseImageSpec(spec);
  const shown = format === "aio" || format === "sync" ? "raw" : format;
  return `${path}: format not given, probed as ${shown} (${spec})`;
}

/**
 * What to tell the user who attached a writable image without naming its
 * format and got raw (QEMU says the same, block.c find_image_format).
 */
export function probedRawWarning(path: string): string {
  return `Image format was not specified for '${path}' and probing guessed raw. ` +
    `Automatically detecting the format is dangerous for raw images: writes to the first ` +
    `${probe_head_bytes} bytes that would make it probe as another format will be refused. ` +
    `Specify the format explicitly (aio:${path}) to remove the restrictions.`;
}

/** `path` made absolute against `cwd` (`..` kept: the kernel resolves it through symlinks). */
export function absolutePath(path: string, cwd = Deno.cwd()): string {
  return path.startsWith("/") ? path : `${cwd.replace(/\/+$/, "")}/${path.replace(/^(\.\/)+/, "")}`;
}

function realPathOrSelf(path: string): string {
  try {
    return Deno.realPathSync(path);
  } catch {
    return path;
  }
}

/** How a chain is being opened: its top image and, when served, the policy on its paths. */
interface ChainScope {
  top: string;
  policy?: ChainPolicy;
}

function makeContext(options: ImageOpenOptions, chain: string[], scope: ChainScope): OpenContext {
  const confine = (path: string, what: string) => {
    if (scope.policy) checkChainPath(scope.policy, scope.top, path, what);
  };
  return {
    openFile: (path, fileOptions) => {
      confine(path, "file");
      return openImageFile(path, fileOptions);
    },
    openSource: (spec) => openImage(spec, { readOnly: true, cache: "writeback" }),
    probeHead,
    openBacking: async (name, overlayPath, format) => {
      const path = resolveStoredName(name, overlayPath);
      confine(path, "backing file");
      const shown = [...chain, path].join(" -> ");
      if (chain.length >= backing_chain_depth_max) {
        throw new BlockError(
          "EINVAL",
          `backing chain deeper than ${backing_chain_depth_max}: ${shown}`,
        );
      }
      const real = realPathOrSelf(path);
      if (chain.some((p) => realPathOrSelf(p) === real)) {
        throw new BlockError("EINVAL", `backing file loop: ${shown}`);
      }
      try {
        Deno.statSync(path);
      } catch {
        throw new BlockError("EINVAL", `backing file ${path} not found (chain: ${shown})`);
      }
      const spec = format ? `${format}:${path}` : path;
      // Below the top, always read-only; never a guard (nothing writes there).
      const below = { ...options, readOnly: true, probedRaw: false };
      return await openChained(spec, below, [...chain, path], scope);
    },
  };
}

async function openChained(
  spec: string,
  options: ImageOpenOptions,
  chain: string[],
  scope: ChainScope,
): Promise<BlockDriver> {
  const parsed = parseImageSpec(spec);
  const formatName = parsed.format ?? await probeFormat(parsed.path);
  const entry = findFormat(formatName);
  if (!entry) {
    throw new BlockError("EINVAL", `${parsed.path}: unknown image format '${formatName}'`);
  }
  return await entry.open(parsed.path, options, makeContext(options, chain, scope));
}

/**
 * Opens an image for serving or for the tools. The lock choice (default:
 * lock read-write opens) is made here once and holds for the whole chain,
 * so backing files of a locked image are read-locked.
 * @param spec `type:path` or a path (format probed; raw when nothing matches)
 * @param policy for served images: where backing files and extents may be
 *   (see {@linkcode ChainPolicy}); the tools pass none and follow any chain
 */
export function openImage(
  spec: string,
  options: ImageOpenOptions = {},
  policy?: ChainPolicy,
): Promise<BlockDriver> {
  const { path } = parseImageSpec(spec);
  const resolved = { ...options, lock: options.lock ?? !options.readOnly };
  return openChained(spec, resolved, [path], { top: path, policy });
}
