/**
 * `blktap qcow2raw RAW QCOW`: a qcow image, read through its whole backing
 * chain, to a raw file. Ranges unallocated in the chain stay holes, and so
 * do 4 KiB blocks of zeros (`copyImage`, shared with `blktap convert`),
 * then fdatasync. Refuses an existing RAW unless
 * `--force`.
 * @module
 */
import { type Command, parseCommandArgs } from "../cli/command.ts";
import { openImage } from "../formats/open_image.ts";
import { openImageFile } from "../formats/raw/open_file.ts";
import { RawDriver } from "../formats/raw/raw.ts";
import { copyImage } from "./copy_image.ts";
import { Progress } from "./progress.ts";
import { clearTarget } from "./target_file.ts";

const USAGE = `usage: blktap qcow2raw [--force] RAW QCOW

Writes the contents of QCOW (with its backing chain) to the raw file RAW.
Unallocated ranges and zero blocks stay holes. Shows progress on a terminal.

  --force     overwrite RAW if it exists`;

async function run(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(argv, {
    force: { type: "boolean" },
  }, { min: 2, max: 2 });
  const [rawPath, qcowSpec] = positionals;
  const source = await openImage(qcowSpec, { readOnly: true, cache: "writeback" });
  try {
    clearTarget(rawPath, values.force ?? false);
    const target = await openImageFile(rawPath, { createNew: true });
    try {
      await target.truncate(source.sizeBytes);
      const progress = new Progress("qcow2raw", source.sizeBytes);
      await copyImage(source, new RawDriver("aio", target), { progress });
      await target.flush();
      progress.finish();
    } finally {
      await target.close();
    }
  } finally {
    await source.close();
  }
  return 0;
}

/** The `qcow2raw` command. */
export const QCOW2RAW_COMMAND: Command = {
  name: "qcow2raw",
  summary: "convert a qcow image (and its backing chain) to a sparse raw file",
  usage: USAGE,
  run,
};
