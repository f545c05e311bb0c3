/**
 * The output file of a conversion: refused when it exists, unless the
 * user said `--force`, and then only a regular file is replaced.
 * @module
 */

/** Makes way for a new output at `path`; throws naming the file otherwise. */
export function clearTarget(path: string, force: boolean): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(path);
  } catch {
    return;
  }
  if (!force) throw new Error(`${path} already exists; use --force to replace it`);
  if (!info.isFile) throw new Error(`${path} is not a regular file`);
  Deno.removeSync(path);
}
