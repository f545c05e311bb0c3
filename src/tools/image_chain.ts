/**
 * What `info` and `map` need of an image and its backing chain: the chain
 * walked through the formats' `info` hooks (without opening data paths),
 * and each layer opened on its own — its backing replaced by a stand-in
 * that holds nothing — so block status tells what *that* layer holds.
 * @module
 */
import {
  BlockDriverBase,
  BlockError,
  type DriverCapabilities,
  imageFormatCapabilities,
} from "../formats/driver.ts";
import type { BlockDriver } from "../formats/driver.ts";
import type { ImageInfo } from "../formats/inspect.ts";
import {
  formatEntry,
  type OpenContext,
  openImage,
  parseImageSpec,
  probeFormat,
} from "../formats/open_image.ts";
import { openImageFile } from "../formats/raw/open_file.ts";
import { resolveStoredName } from "../formats/chain_policy.ts";

/** Backing chains deeper than this are refused (as `openImage` does). */
export const chain_depth_max = 64;

/** One image of a chain, top first. */
export interface ChainLayer {
  path: string;
  /** Registry name of its driver. */
  format: string;
  info: ImageInfo;
}

/** Formats whose every byte is allocated (no backing, holes are zeros). */
export function isRawFormat(format: string): boolean {
  return format === "aio" || format === "sync" || format === "raw";
}

async function layerInfo(path: string, format: string): Promise<ImageInfo> {
  const entry = formatEntry(format);
  if (!entry) throw new BlockError("EINVAL", `${path}: unknown image format '${format}'`);
  if (entry.info) return await entry.info(path);
  const stat = await Deno.stat(path);
  return { format: entry.name, virtualSizeBytes: stat.size };
}

// The file behind a path (a link or another spelling of the same path is the same file).
async function fileIdentity(path: string): Promise<string | undefined> {
  try {
    const stat = await Deno.stat(path);
    return `${stat.dev}:${stat.ino}`;
  } catch {
    return undefined;
  }
}

/**
 * Walks the backing chain of `spec` (`type:path` or a path), top first.
 * Throws, naming the chain, when a backing file is missing, when the chain
 * comes back to a file already in it (an image that is its own backing
 * file, two images backing each other), or when it is deeper than
 * {@linkcode chain_depth_max}.
 */
export async function describeChain(spec: string): Promise<ChainLayer[]> {
  const parsed = parseImageSpec(spec);
  let path = parsed.path;
  let format = parsed.format ?? await probeFormat(path);
  const layers: ChainLayer[] = [];
  const seen = new Set<string | undefined>([await fileIdentity(path)]);
  for (;;) {
    const info = await layerInfo(path, format);
    layers.push({ path, format: formatEntry(format)!.name, info });
    if (!info.backingFile) return layers;
    const next = resolveStoredName(info.backingFile, path);
    const shown = [...layers.map((l) => l.path), next].join(" -> ");
    if (layers.length >= chain_depth_max) {
      throw new BlockError("EINVAL", `backing chain deeper than ${chain_depth_max}: ${shown}`);
    }
    const identity = await fileIdentity(next);
    if (identity === undefined) {
      throw new BlockError("EINVAL", `backing file ${next} not found (chain: ${shown})`);
    }
    if (seen.has(identity)) throw new BlockError("EINVAL", `backing file loop: ${shown}`);
    seen.add(identity);
    path = next;
    format = info.backingFormat && formatEntry(info.backingFormat)
      ? info.backingFormat
      : await probeFormat(next);
  }
}

/** A backing stand-in: the right size, nothing allocated, reads as zeros. */
class EmptyLayer extends BlockDriverBase {
  readonly format = "empty";
  readonly path: string;
  readonly sizeBytes: number;
  readonly capabilities: DriverCapabilities = imageFormatCapabilities(false);

  constructor(path: string, sizeBytes: number) {
    super();
    this.path = path;
    this.sizeBytes = sizeBytes;
  }

  protected _read(_offsetBytes: number, buffer: Uint8Array): Promise<void> {
    buffer.fill(0);
    return Promise.resolve();
  }

  protected _write(): Promise<void> {
    return Promise.reject(new BlockError("EPERM", `${this.path}: read-only`));
  }

  protected _flush(): Promise<void> {
    return Promise.resolve();
  }

  protected override _blockStatus(offsetBytes: number, lengthBytes: number) {
    return Promise.resolve([{ offsetBytes, lengthBytes, hole: true, zero: true }]);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** Opens one layer read-only with an empty stand-in for its backing file. */
export async function openLayerAlone(layer: ChainLayer): Promise<BlockDriver> {
  const entry = formatEntry(layer.format)!;
  const context: OpenContext = {
    openFile: (path, options) => openImageFile(path, options),
    openBacking: async (name, overlayPath, format) => {
      const path = resolveStoredName(name, overlayPath);
      const real = await openImage(format ? `${format}:${path}` : path, { readOnly: true });
      const size = real.sizeBytes;
      await real.close();
      return new EmptyLayer(path, size);
    },
  };
  return await entry.open(layer.path, { readOnly: true, cache: "writeback" }, context);
}
