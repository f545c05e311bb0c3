/**
 * What a format driver registers (src/formats/formats.ts) and what it gets
 * to open its file and its parents with. Types only, so format folders and
 * the opener do not import each other.
 * @module
 */
import type { BlockDriver } from "./driver.ts";
import type { ImageFile, ImageOpenOptions } from "./image_file.ts";
import type { CheckOptions, CheckReport, ImageInfo } from "./inspect.ts";

/** What a driver gets to open its file and its parents. */
export interface OpenContext {
  /** Opens the file layer with the chain's cache mode. */
  openFile(path: string, options: ImageOpenOptions): Promise<ImageFile>;
  /**
   * Opens a backing image read-only. `name` is as stored in the overlay;
   * relative names resolve against the overlay's folder. `format` forces a
   * driver (else probed). Fails with a message naming the whole chain on a
   * loop, a missing parent, or a chain deeper than `backing_chain_depth_max`.
   */
  openBacking(name: string, overlayPath: string, format?: string): Promise<BlockDriver>;
  /** Opens another image named by the user read-only (ram's `load=FILE`). */
  openSource?(spec: string): Promise<BlockDriver>;
  /**
   * The format the registered probes find in `head` (a file's first bytes),
   * or undefined for raw; what the raw driver's probe guard asks.
   */
  probeHead?(head: Uint8Array): string | undefined;
}

/** A format driver as registered in `formats.ts`. */
export interface FormatEntry {
  /** The `type` in `type:path`. */
  name: string;
  /** Other accepted type names. */
  aliases?: string[];
  /** What follows `type:` is not a file path (ram: `NAME,size=...`). */
  fileless?: boolean;
  /**
   * True when the first bytes of a file (up to 4 KiB) are this format, or,
   * when `probeFormat` passes them, its last 512 bytes (`tail`, where a
   * fixed VHD keeps its footer). The probe guard of raw images asks about
   * the head alone.
   */
  probe?(head: Uint8Array, tail?: Uint8Array): boolean;
  /** Opens `path` (the part after `type:`). */
  open(path: string, options: ImageOpenOptions, context: OpenContext): Promise<BlockDriver>;
  /** Header facts for `blktap info` (without opening the chain). */
  info?(path: string): Promise<ImageInfo>;
  /**
   * Creates a new image at `path` (`blktap create -f FMT`, `blktap convert
   * -O FMT`). Refuses an existing file unless the caller removed it. Unknown
   * `options` keys are a usage error naming the key.
   */
  create?(path: string, options: CreateOptions): Promise<void>;
  /** Structural check for `blktap check`; must never write unless `repair`. */
  check?(path: string, options: CheckOptions): Promise<CheckReport>;
}

/** What `blktap create -f FMT [-o OPTIONS] [-b BACKING [-F FMT]] FILE SIZE` asks for. */
export interface CreateOptions {
  /** Virtual size; may be 0 with a backing file (then the backing file's size). */
  sizeBytes: number;
  /** Backing file as it is to be stored in the image (relative names resolve against its folder). */
  backingName?: string;
  /** Backing format to record (`-F`), when the format can record one. */
  backingFormat?: string;
  /** `-o key=value,...`, format-specific (`cluster_size`, `compat`, `subformat`, ...). */
  options: Record<string, string>;
}
