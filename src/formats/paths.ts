/**
 * Path arithmetic for backing-file names: folders, names stored relative
 * to an image's folder, and the relative path between two files (a VHD's
 * `W2ru` locator).
 * @module
 */

/** True when `path` names something (links followed). */
export function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/** The folder of `path` (`.` for a bare name). */
export function dirname(path: string): string {
  const slash = path.lastIndexOf("/");
  return slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
}

/** The last component of `path`. */
export function basename(path: string): string {
  return path.slice(path.lastIndexOf("/") + 1);
}

/** `name` resolved against the folder of `imagePath` unless it is absolute. */
export function resolveFrom(imagePath: string, name: string): string {
  return name.startsWith("/") ? name : `${dirname(imagePath)}/${name}`;
}

function parts(absolute: string): string[] {
  const out: string[] = [];
  for (const part of absolute.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") out.pop();
    else out.push(part);
  }
  return out;
}

/** The path from folder `fromDir` to `to` (both absolute), `../` where needed. */
export function relativePath(fromDir: string, to: string): string {
  const from = parts(fromDir);
  const target = parts(to);
  let common = 0;
  while (common < from.length && common < target.length && from[common] === target[common]) {
    common += 1;
  }
  const up = from.slice(common).map(() => "..");
  return [...up, ...target.slice(common)].join("/");
}
