/**
 * Path arithmetic for backing-file names beyond what chain_policy.ts
 * resolves: whether a path exists, and the relative path between two
 * files (a VHD's `W2ru` locator).
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
