/**
 * Opens and creates the file layer ({@linkcode ImageFile}) beneath every
 * format: `aio` (libaio) by default, `sync` when asked. cache=none means
 * O_DIRECT; where the file system refuses it, the file is opened through
 * the page cache with a warning, as QEMU does not (it fails) but users of
 * tmpfs expect.
 * @module
 */
import { SysError } from "../../../ffi/errno.ts";
import { File } from "../../../ffi/file.ts";
import { BlockError } from "../driver.ts";
import type { ImageFile, ImageOpenOptions } from "../image_file.ts";
import { AioFile } from "./aio_file.ts";
import { lockImageWaiting } from "./image_lock.ts";
import { SyncFile } from "./sync_file.ts";

/** Which file layer to use. */
export type FileEngine = "aio" | "sync";

/** Options for {@linkcode openImageFile}. */
export interface FileOpenOptions extends ImageOpenOptions {
  engine?: FileEngine;
  /** Create a new file; fails if it exists. */
  createNew?: boolean;
}

const warnedPaths = new Set<string>();

function openDescriptor(path: string, options: FileOpenOptions): File {
  const base = { write: !options.readOnly, createNew: options.createNew };
  const direct = (options.cache ?? "none") === "none" && options.engine !== "sync";
  if (!direct) return File.open(path, base);
  try {
    return File.open(path, { ...base, direct: true });
  } catch (error) {
    if (!(error instanceof SysError && error.code === "EINVAL")) throw error;
    if (!warnedPaths.has(path)) {
      warnedPaths.add(path);
      console.error(
        `blktap: warning: ${path}: O_DIRECT refused by the file system; using the page cache`,
      );
    }
    return File.open(path, base);
  }
}

/**
 * Opens `path` as the file layer; refuses directories with a clear error.
 * Takes QEMU's image locks as `options.lock` says (an image in use is
 * refused with EPERM naming it).
 */
export async function openImageFile(
  path: string,
  options: FileOpenOptions = {},
): Promise<ImageFile> {
  const file = openDescriptor(path, options);
  try {
    const { kind } = file.stat();
    if (kind === "directory" || kind === "other") {
      const what = kind === "directory" ? "a directory" : "not a file or block device";
      throw new BlockError("EINVAL", `${path}: is ${what}`);
    }
    if (options.lock ?? !options.readOnly) {
      await lockImageWaiting(file, options.readOnly ? "read" : "write");
    }
  } catch (error) {
    file.close();
    throw error;
  }
  if (options.engine === "sync") return new SyncFile(file, !options.readOnly);
  return new AioFile(file, !options.readOnly, options.filling);
}

/**
 * Creates `path` as a new image file (never over an existing one) and lets
 * `fill` write it through the sync engine; when `fill` fails the file is
 * removed, so no half-made image is left to be opened later.
 */
export async function createImageFile(
  path: string,
  fill: (file: ImageFile) => Promise<void>,
): Promise<void> {
  const file = await openImageFile(path, { createNew: true, engine: "sync" });
  try {
    await fill(file);
  } catch (error) {
    await file.close();
    await Deno.remove(path).catch(() => {});
    throw error;
  }
  await file.close();
}
