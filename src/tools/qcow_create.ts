/**
 * `blktap qcow-create [-r] SIZE FILE [BACKING]`: the seed's qcow-create.
 * SIZE is MiB when bare (as the seed) and takes K/M/G/T suffixes; with
 * BACKING the virtual size is the backing file's and SIZE is ignored, as
 * the seed did. `-r` reserves (preallocates) every cluster.
 * @module
 */
import { type Command, parseCommandArgs, parseSize, UsageError } from "../cli/command.ts";
import { openImage } from "../formats/open_image.ts";
import { createQcow } from "../formats/qcow/create.ts";
import { resolveStoredName } from "../formats/chain_policy.ts";
import { exists } from "../formats/paths.ts";

const USAGE = `usage: blktap qcow-create [-r] SIZE FILE [BACKING]

Creates FILE as a qcow (version 1) image in blktap's layout.

  SIZE        virtual size: MiB when bare (as the 2006 tool), or with a
              suffix K, M, G, T (e.g. 512M, 10G); ignored with BACKING
  BACKING     backing image (raw or qcow); the new image starts as a copy-
              on-write overlay of it and takes its size. A relative name is
              stored as given when it resolves from FILE's folder, else as
              an absolute path.
  -r, --reserve   preallocate every cluster (no backing file)`;

/** The name to store for `backing`, and the path to open it by now. */
export function resolveBackingForCreate(backing: string, imagePath: string) {
  if (backing.startsWith("/")) return { stored: backing, path: backing };
  const fromImage = resolveStoredName(backing, imagePath);
  if (exists(fromImage)) return { stored: backing, path: fromImage };
  if (exists(backing)) {
    const absolute = Deno.realPathSync(backing);
    return { stored: absolute, path: absolute };
  }
  throw new Error(`backing file ${backing} not found`);
}

async function run(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(argv, {
    reserve: { type: "boolean", short: "r" },
  }, { min: 2, max: 3 });
  const [sizeText, file, backing] = positionals;
  let sizeBytes = parseSize(sizeText, 1 << 20);
  if (backing !== undefined && values.reserve) {
    throw new UsageError("-r cannot be combined with a backing file");
  }
  if (exists(file)) throw new Error(`${file} already exists; refusing to overwrite it`);
  let backingName: string | undefined;
  let backingMtime: number | undefined;
  if (backing !== undefined) {
    const resolved = resolveBackingForCreate(backing, file);
    const parent = await openImage(resolved.path, { readOnly: true, cache: "writeback" });
    sizeBytes = parent.sizeBytes;
    await parent.close();
    backingName = resolved.stored;
    backingMtime = Math.floor((Deno.statSync(resolved.path).mtime?.getTime() ?? 0) / 1000);
  }
  // QEMU counts whole sectors: keep the size a multiple of 512.
  sizeBytes = Math.ceil(sizeBytes / 512) * 512;
  if (sizeBytes < 512) throw new UsageError(`size must be at least 512 bytes`);
  await createQcow(file, { sizeBytes, backingName, backingMtime, reserve: values.reserve });
  return 0;
}

/** The `qcow-create` command. */
export const QCOW_CREATE_COMMAND: Command = {
  name: "qcow-create",
  summary: "create a qcow image (blktap layout), optionally over a backing file",
  usage: USAGE,
  run,
};
