/**
 * Which files a served image may pull in. A backing file name or a vmdk
 * extent name is image bytes, so for a disk served to clients (ctrl's
 * `create`, `serve`) it may name only files in the top image's own folder,
 * compared by real path after symlinks, and no device nodes, unless the
 * user allowed a folder with `--allow-path DIR`. The image tools (`info`,
 * `map`, `check`, ...) follow chains as `qemu-img` does, with no policy.
 * @module
 */
import { BlockError } from "./driver.ts";

/** Where the files of a served image's chain may live, beyond its own folder. */
export interface ChainPolicy {
  /** Folders (absolute) the user allowed with `--allow-path`; device nodes in them too. */
  allowPaths: string[];
}

/** The hint every refusal carries. */
export const ALLOW_PATH_HINT = "to allow it, pass --allow-path DIR (create, serve or ctrl)";

/** Folder part of a path, as `dirname`: relative names resolve against it. */
export function dirname(path: string): string {
  const slash = path.lastIndexOf("/");
  return slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
}

/** Resolves a name stored in an image (backing file, extent) against the image's folder. */
export function resolveStoredName(name: string, imagePath: string): string {
  return name.startsWith("/") ? name : `${dirname(imagePath)}/${name}`;
}

function realPath(path: string): string | undefined {
  try {
    return Deno.realPathSync(path);
  } catch {
    return undefined;
  }
}

function isInside(path: string, folder: string): boolean {
  return folder === "/" || path === folder || path.startsWith(`${folder}/`);
}

/**
 * Throws EPERM unless `path`, named inside the served image `topPath`
 * (as its `what`: "backing file", "extent"), may be opened under `policy`.
 * A file that does not exist passes: opening it fails with its own error.
 */
export function checkChainPath(
  policy: ChainPolicy,
  topPath: string,
  path: string,
  what: string,
): void {
  const real = realPath(path);
  if (real === undefined) return;
  const topReal = realPath(topPath) ?? topPath;
  if (real === topReal) return;
  if (policy.allowPaths.some((dir) => isInside(real, realPath(dir) ?? dir))) return;
  // The top image's folder as named (relative names resolve there) and as it really is.
  const folders = [realPath(dirname(topPath)), dirname(topReal)];
  const stat = Deno.statSync(real);
  const why = stat.isBlockDevice || stat.isCharDevice
    ? "it is a device node"
    : !stat.isFile
    ? "it is not a regular file"
    : folders.some((folder) => folder !== undefined && isInside(real, folder))
    ? undefined
    : `it lies outside ${dirname(topPath)}`;
  if (why === undefined) return;
  const shown = real === path ? path : `${path} (${real})`;
  throw new BlockError(
    "EPERM",
    `${topPath}: refusing ${what} ${shown} named by the image: ${why}; ${ALLOW_PATH_HINT}`,
  );
}
