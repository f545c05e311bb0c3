/**
 * Opens images named as `type:path` (`qcow:/img/a.qcow`, as in `tap:qcow:`
 * disk configs) or as a bare path whose format is probed from its header.
 * Backing chains are opened through {@linkcode OpenContext.openBacking},
 * which resolves relative names and refuses loops.
 * @module
 */
import { BlockDriver, BlockError } from "./driver.ts";
import type { ImageOpenOptions } from "./image_file.ts";
import { FORMATS } from "./formats.ts";
import { openImageFile } from "./raw/open_file.ts";
import type { FormatEntry, OpenContext } from "./format_entry.ts";

export type { FormatEntry, OpenContext } from "./format_entry.ts";

/** The registry entry for a format name or alias. */
export function formatEntry(name: string): FormatEntry | undefined {
  return findFormat(name);
}

const backing_chain_depth_max = 64;
const probe_bytes = 4096;
/** The last bytes probed too: a fixed VHD's footer. */
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

/** Names of every registered format, for help texts. */
export function formatNames(): string[] {
  return FORMATS.map((f) => f.name);
}

/** Reads the file's first bytes and asks each format whether they are its own. */
export async function probeFormat(path: string): Promise<string> {
  const file = await openImageFile(path, { readOnly: true, cache: "writeback" });
  try {
    const length = file.lengthBytes();
    const head = new Uint8Array(Math.min(probe_bytes, length));
    await file.read(0, head);
    const tail = new Uint8Array(Math.min(probe_tail_bytes, length));
    await file.read(length - tail.byteLength, tail);
    return FORMATS.find((f) => f.probe?.(head, tail))?.name ?? "aio";
  } finally {
    await file.close();
  }
}

function dirname(path: string): string {
  const slash = path.lastIndexOf("/");
  return slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
}

function resolveBackingName(name: string, overlayPath: string): string {
  return name.startsWith("/") ? name : `${dirname(overlayPath)}/${name}`;
}

function realPathOrSelf(path: string): string {
  try {
    return Deno.realPathSync(path);
  } catch {
    return path;
  }
}

function makeContext(options: ImageOpenOptions, chain: string[]): OpenContext {
  return {
    openFile: (path, fileOptions) => openImageFile(path, fileOptions),
    openSource: (spec) => openImage(spec, { readOnly: true, cache: "writeback" }),
    openBacking: async (name, overlayPath, format) => {
      const path = resolveBackingName(name, overlayPath);
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
      return await openChained(spec, { ...options, readOnly: true }, [...chain, path]);
    },
  };
}

async function openChained(
  spec: string,
  options: ImageOpenOptions,
  chain: string[],
): Promise<BlockDriver> {
  const parsed = parseImageSpec(spec);
  const formatName = parsed.format ?? await probeFormat(parsed.path);
  const entry = findFormat(formatName);
  if (!entry) {
    throw new BlockError("EINVAL", `${parsed.path}: unknown image format '${formatName}'`);
  }
  return await entry.open(parsed.path, options, makeContext(options, chain));
}

/**
 * Opens an image for serving or for the tools.
 * @param spec `type:path` or a path (format probed; raw when nothing matches)
 */
export function openImage(spec: string, options: ImageOpenOptions = {}): Promise<BlockDriver> {
  const { path } = parseImageSpec(spec);
  return openChained(spec, options, [path]);
}
