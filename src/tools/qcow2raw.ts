/**
 * `blktap qcow2raw RAW QCOW`: a qcow image, read through its whole backing
 * chain, to a raw file. Ranges unallocated in the chain stay holes, and so
 * do 4 KiB blocks of zeros; data is copied in large page-aligned chunks,
 * several in flight, then fdatasync. Refuses an existing RAW unless
 * `--force`.
 * @module
 */
import { type Command, parseCommandArgs } from "../cli/command.ts";
import type { BlockDriver } from "../formats/driver.ts";
import type { ImageFile } from "../formats/image_file.ts";
import { openImage } from "../formats/open_image.ts";
import { openImageFile } from "../formats/raw/open_file.ts";
import { isZeroBytes } from "../formats/zero_bytes.ts";
import { NativeMemory } from "../../ffi/memory.ts";
import { Progress } from "./progress.ts";

const USAGE = `usage: blktap qcow2raw [--force] RAW QCOW

Writes the contents of QCOW (with its backing chain) to the raw file RAW.
Unallocated ranges and zero blocks stay holes. Shows progress on a terminal.

  --force     overwrite RAW if it exists`;

const chunk_bytes = 4 << 20;
const chunks_in_flight_max = 4;
const block_bytes = 4096;

/** Copies every non-zero block of `source` into `target` (already sized). */
export async function copyToRaw(
  source: BlockDriver,
  target: ImageFile,
  progress?: Progress,
): Promise<void> {
  const chunks: [number, number][] = [];
  for (const e of await source.blockStatus(0, source.sizeBytes)) {
    if (e.zero) continue;
    for (let pos = e.offsetBytes; pos < e.offsetBytes + e.lengthBytes; pos += chunk_bytes) {
      chunks.push([pos, Math.min(pos + chunk_bytes, e.offsetBytes + e.lengthBytes)]);
    }
  }
  let next = 0;
  let doneBytes = 0;
  const worker = async () => {
    const memory = NativeMemory.allocate(chunk_bytes);
    try {
      while (next < chunks.length) {
        const [start, end] = chunks[next++];
        const buffer = memory.bytes.subarray(0, end - start);
        await source.read(start, buffer);
        await _writeNonZero(target, start, buffer);
        doneBytes += end - start;
        progress?.update(doneBytes);
      }
    } finally {
      memory.release();
    }
  };
  await Promise.all(Array.from({ length: chunks_in_flight_max }, worker));
}

async function _writeNonZero(target: ImageFile, offsetBytes: number, buffer: Uint8Array) {
  const writes: Promise<void>[] = [];
  for (let k = 0; k < buffer.byteLength;) {
    const blockEnd = Math.min(k + block_bytes, buffer.byteLength);
    if (isZeroBytes(buffer.subarray(k, blockEnd))) {
      k = blockEnd;
      continue;
    }
    let m = blockEnd;
    while (m < buffer.byteLength) {
      const next = Math.min(m + block_bytes, buffer.byteLength);
      if (isZeroBytes(buffer.subarray(m, next))) break;
      m = next;
    }
    writes.push(target.write(offsetBytes + k, buffer.subarray(k, m)));
    k = m;
  }
  await Promise.all(writes);
}

function _prepareTarget(path: string, force: boolean): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(path);
  } catch {
    return;
  }
  if (!force) throw new Error(`${path} already exists; use --force to overwrite it`);
  if (!info.isFile) throw new Error(`${path} is not a regular file`);
  Deno.removeSync(path);
}

async function run(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(argv, {
    force: { type: "boolean" },
  }, { min: 2, max: 2 });
  const [rawPath, qcowSpec] = positionals;
  const source = await openImage(qcowSpec, { readOnly: true, cache: "writeback" });
  try {
    _prepareTarget(rawPath, values.force ?? false);
    const target = await openImageFile(rawPath, { createNew: true });
    try {
      await target.truncate(source.sizeBytes);
      const progress = new Progress("qcow2raw", source.sizeBytes);
      await copyToRaw(source, target, progress);
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
