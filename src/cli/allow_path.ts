/**
 * `--allow-path DIR` (repeatable), shared by `create`, `serve` and `ctrl`:
 * the folders besides a served image's own where its backing files and
 * vmdk extents may be (device nodes there too). See
 * src/formats/chain_policy.ts.
 * @module
 */
import { UsageError } from "./command.ts";
import { absolutePath } from "../formats/open_image.ts";

/** The parseArgs option. */
export const ALLOW_PATH_OPTION = { "allow-path": { type: "string", multiple: true } } as const;

/** The help lines, descriptions starting at `column` (as the other options of the command). */
export function allowPathHelp(column: number): string {
  const lines = [
    "backing files and vmdk extents may also be in DIR, device nodes",
    "included (repeatable). Without it they must be regular files in",
    "the image's own folder (real paths, after symlinks)",
  ];
  return [
    "  --allow-path DIR".padEnd(column) + lines[0],
    ...lines.slice(1).map((l) => " ".repeat(column) + l),
  ].join("\n");
}

/** The folders given, absolute; a usage error for one that is not a folder. */
export function parseAllowPaths(values: { "allow-path"?: unknown }): string[] {
  const given = (values["allow-path"] ?? []) as string[];
  return given.map((dir) => {
    let isDirectory = false;
    try {
      isDirectory = Deno.statSync(dir).isDirectory;
    } catch {
      // reported below
    }
    if (!isDirectory) throw new UsageError(`--allow-path ${dir}: not a folder`);
    return absolutePath(dir);
  });
}
