/**
 * `blktap convert [-f FMT] -O FMT [-c] [-p] [-o OPTIONS] [--force] SRC DST`:
 * the contents of SRC (with its backing chain) into a new image DST of any
 * format blktap creates, as `qemu-img convert` does.
 *
 * DST is made by its format's `create` hook (`-o` as for `blktap create`;
 * the size is SRC's, rounded up where the format must), opened with the
 * cache `-t` names (the page cache by default, with flush-behind: a
 * background fdatasync per 32 MiB written, so the disk drains during the
 * copy; measured faster than O_DIRECT on all four pairs of
 * bench/convert.sh) and filled by `copyImage`: only what SRC holds is read, 4 KiB blocks of zeros are not
 * written, several chunks are in flight. DST is opened `unordered`: the
 * format need not order its metadata until the final flush. qcow output goes through
 * img2qcow's packed writer instead (its tables hold only what has data).
 * DST is fdatasynced before convert exits. On failure, or on SIGINT or
 * SIGTERM, DST is removed: no half-written image is left behind looking
 * complete.
 * @module
 */
import { type Command, parseCommandArgs, UsageError } from "../cli/command.ts";
import type { BlockDriver } from "../formats/driver.ts";
import { CreateOptionError, readCreateOptions } from "../formats/create_options.ts";
import { formatEntry, openImage } from "../formats/open_image.ts";
import { QCOW_CREATE_OPTIONS } from "../formats/qcow/format.ts";
import { useIoUringOnly } from "../formats/raw/aio_file.ts";
import { copyImage } from "./copy_image.ts";
import { creatableFormat, optionRecord } from "./create_image.ts";
import { imageToQcow } from "./img2qcow.ts";
import { Progress } from "./progress.ts";
import { clearTarget } from "./target_file.ts";

const USAGE =
  `usage: blktap convert [-f FMT] -O FMT [-c] [-p] [-o OPTIONS] [-t CACHE] [--force] SRC DST

Copies the contents of SRC (and its backing chain) into a new image DST,
as qemu-img convert does. Holes and blocks of zeros stay unallocated in DST.
DST is durable (fdatasync) when convert exits 0, and removed when it fails.

  -f FMT       SRC's format (default: read from its header)
  -O FMT       DST's format: raw, qcow, qcow2, vmdk, vhd (alias vpc)
  -c           compress DST's data (formats with compressed clusters only)
  -p           show progress (shown anyway on a terminal)
  -o OPTIONS   DST creation options, as for blktap create -o
  -t CACHE     how DST is written: writeback (page cache, default; flushed
               in the background as it fills) or none (O_DIRECT, no copy
               through the page cache). Either way DST is fdatasynced before
               convert exits.
  --force      replace DST if it exists`;

/** What `blktap convert` was asked. */
export interface ConvertRequest {
  source: string;
  sourceFormat?: string;
  target: string;
  targetFormat: string;
  compress: boolean;
  progress: boolean;
  options: Record<string, string>;
  /** How DST is written (the `cache` it is opened with). */
  cache: "none" | "writeback";
  force: boolean;
}

/** Removes DST if the process is told to stop while it fills. */
function _removeOnSignal(path: string): () => void {
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
  const handlers = signals.map((signal) => {
    const handler = () => {
      try {
        Deno.removeSync(path);
      } catch {
        // already gone
      }
      console.error(`blktap convert: ${signal}: ${path} removed`);
      Deno.exit(signal === "SIGINT" ? 130 : 143);
    };
    Deno.addSignalListener(signal, handler);
    return handler;
  });
  return () => signals.forEach((s, i) => Deno.removeSignalListener(s, handlers[i]));
}

/** Fills a new DST through its format's driver. */
async function _convertGeneric(source: BlockDriver, request: ConvertRequest, progress: Progress) {
  const entry = creatableFormat(request.targetFormat);
  await entry.create!(request.target, { sizeBytes: source.sizeBytes, options: request.options });
  // Deleted on failure: no ordering barriers while it fills (one flush at the end).
  const target = await openImage(`${entry.name}:${request.target}`, {
    cache: request.cache,
    unordered: true,
    filling: true,
  });
  try {
    if (target.sizeBytes < source.sizeBytes) {
      throw new Error(
        `${request.target}: created with ${target.sizeBytes} bytes, less than ${source.sizeBytes}`,
      );
    }
    let clusterBytes: number | undefined;
    if (request.compress) {
      clusterBytes = (await entry.info?.(request.target))?.clusterSizeBytes;
      if (typeof target.writeCompressed !== "function" || !clusterBytes) {
        throw new UsageError(`-c: blktap cannot write compressed ${entry.name} images`);
      }
    }
    await copyImage(source, target, { compressClusterBytes: clusterBytes, progress });
    await target.flush();
  } finally {
    await target.close();
  }
}

/** Converts; removes DST on any failure. */
export async function convertImage(request: ConvertRequest): Promise<void> {
  const entry = creatableFormat(request.targetFormat);
  const spec = request.sourceFormat ? `${request.sourceFormat}:${request.source}` : request.source;
  if (request.sourceFormat && !formatEntry(request.sourceFormat)) {
    throw new UsageError(`unknown format '${request.sourceFormat}'`);
  }
  const source = await openImage(spec, { readOnly: true, cache: "writeback" });
  try {
    clearTarget(request.target, request.force);
    const progress = new Progress(
      "convert",
      source.sizeBytes,
      request.progress || Deno.stderr.isTerminal(),
    );
    const stopWatching = _removeOnSignal(request.target);
    try {
      if (entry.name === "qcow" && !request.compress) {
        const values = readCreateOptions("qcow", request.options, QCOW_CREATE_OPTIONS);
        const reserve = values.preallocation === "full";
        await imageToQcow(source, request.target, { reserve, progress, cache: request.cache });
      } else await _convertGeneric(source, request, progress);
      progress.finish();
    } catch (error) {
      await Deno.remove(request.target).catch(() => {});
      if (error instanceof CreateOptionError) throw new UsageError(error.message);
      throw error;
    } finally {
      stopWatching();
    }
  } finally {
    await source.close();
  }
}

async function run(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(argv, {
    format: { type: "string", short: "f" },
    "output-format": { type: "string", short: "O" },
    compress: { type: "boolean", short: "c" },
    progress: { type: "boolean", short: "p" },
    options: { type: "string", short: "o", multiple: true },
    cache: { type: "string", short: "t" },
    force: { type: "boolean" },
  }, { min: 2, max: 2 });
  if (values["output-format"] === undefined) throw new UsageError("-O FMT is required");
  const cache = values.cache ?? "writeback";
  if (cache !== "none" && cache !== "writeback") {
    throw new UsageError(`-t must be none or writeback, not '${cache}'`);
  }
  useIoUringOnly();
  await convertImage({
    source: positionals[0],
    sourceFormat: values.format,
    target: positionals[1],
    targetFormat: values["output-format"],
    compress: values.compress ?? false,
    progress: values.progress ?? false,
    options: optionRecord((values.options as unknown as string[] | undefined) ?? []),
    cache,
    force: values.force ?? false,
  });
  return 0;
}

/** The `convert` command. */
export const CONVERT_COMMAND: Command = {
  name: "convert",
  summary: "convert an image to another format (qemu-img convert)",
  usage: USAGE,
  run,
};
