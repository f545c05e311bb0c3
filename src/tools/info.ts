/**
 * `blktap info IMAGE [--json]`: format, virtual size, cluster size,
 * allocation (guest bytes allocated according to block status, and the
 * file's size and space on disk) and the backing chain, walked through the
 * formats' `info` hooks.
 * @module
 */
import { type Command, parseCommandArgs } from "../cli/command.ts";
import type { SnapshotInfo } from "../formats/inspect.ts";
import { openImage } from "../formats/open_image.ts";
import { type ChainLayer, describeChain, isRawFormat } from "./image_chain.ts";

/** What `blktap info --json` prints for one image of the chain. */
export interface ImageReport {
  filename: string;
  format: string;
  /** The driver that serves it (`aio` for raw). */
  driver: string;
  virtualSizeBytes: number;
  clusterSizeBytes?: number;
  /** Apparent size of the file. */
  fileSizeBytes: number;
  /** Space the file takes on disk (`du`). */
  diskSizeBytes: number;
  backingFile?: string;
  backingFormat?: string;
  details?: Record<string, string | number | boolean>;
  /** Internal snapshots (qcow2). */
  snapshots?: SnapshotInfo[];
}

/** The whole report: the top image, guest allocation, and the chain below it. */
export interface InfoReport extends ImageReport {
  /** Guest bytes allocated in the image or its chain (from block status). */
  allocatedBytes: number;
  backingChain: ImageReport[];
}

function fileStat(path: string): { size: number; blocks: number | null } {
  try {
    return Deno.statSync(path);
  } catch {
    return { size: 0, blocks: 0 }; // not a file (a RAM disk)
  }
}

function layerReport(layer: ChainLayer): ImageReport {
  const stat = fileStat(layer.path);
  const report: ImageReport = {
    filename: layer.path,
    format: isRawFormat(layer.format) ? "raw" : layer.format,
    driver: layer.format,
    virtualSizeBytes: layer.info.virtualSizeBytes,
    fileSizeBytes: stat.size,
    diskSizeBytes: (stat.blocks ?? 0) * 512,
  };
  if (layer.info.clusterSizeBytes !== undefined) {
    report.clusterSizeBytes = layer.info.clusterSizeBytes;
  }
  if (layer.info.backingFile !== undefined) report.backingFile = layer.info.backingFile;
  if (layer.info.backingFormat !== undefined) report.backingFormat = layer.info.backingFormat;
  if (layer.info.details) report.details = layer.info.details;
  if (layer.info.snapshots) report.snapshots = layer.info.snapshots;
  return report;
}

async function allocatedBytes(spec: string): Promise<number> {
  const driver = await openImage(spec, { readOnly: true, cache: "writeback" });
  try {
    const extents = await driver.blockStatus(0, driver.sizeBytes);
    return extents.reduce((sum, e) => sum + (e.hole ? 0 : e.lengthBytes), 0);
  } finally {
    await driver.close();
  }
}

/** Gathers the report for `spec` (`type:path` or a path). */
export async function imageInfo(spec: string): Promise<InfoReport> {
  const layers = await describeChain(spec);
  const [top, ...below] = layers.map(layerReport);
  return {
    ...top,
    // Attaching to a RAM disk could end its life on detach: memory is all allocated.
    allocatedBytes: layers[0].format === "ram"
      ? layers[0].info.virtualSizeBytes
      : await allocatedBytes(`${layers[0].format}:${layers[0].path}`),
    backingChain: below,
  };
}

function humanSize(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const shown = unit === 0 ? String(value) : value.toFixed(value < 10 ? 2 : 1);
  return `${shown} ${units[unit]}`;
}

/** The snapshot table as `qemu-img info` prints it. */
function snapshotLines(snapshots: SnapshotInfo[]): string[] {
  const clock = (ns: number) => {
    const ms = Math.floor(ns / 1e6);
    const two = (n: number) => String(n).padStart(2, "0");
    return `${two(Math.floor(ms / 3_600_000))}:${two(Math.floor(ms / 60_000) % 60)}:` +
      `${two(Math.floor(ms / 1000) % 60)}.${String(ms % 1000).padStart(3, "0")}`;
  };
  const date = (s: number) => new Date(s * 1000).toISOString().replace("T", " ").slice(0, 19);
  return [
    "Snapshot list:",
    "ID        TAG               VM SIZE                DATE     VM CLOCK",
    ...snapshots.map((s) =>
      `${s.id.padEnd(10)}${s.name.padEnd(18)}${humanSize(s.vmStateBytes).padStart(7)} ` +
      `${date(s.dateSeconds)} ${clock(s.vmClockNanoseconds)}`
    ),
  ];
}

function imageLines(r: ImageReport): string[] {
  const lines = [
    `image: ${r.filename}`,
    `file format: ${r.format}${r.driver !== r.format ? ` (driver ${r.driver})` : ""}`,
    `virtual size: ${humanSize(r.virtualSizeBytes)} (${r.virtualSizeBytes} bytes)`,
    `file size: ${humanSize(r.fileSizeBytes)}, on disk: ${humanSize(r.diskSizeBytes)}`,
  ];
  if (r.clusterSizeBytes !== undefined) lines.push(`cluster_size: ${r.clusterSizeBytes}`);
  if (r.backingFile !== undefined) {
    const format = r.backingFormat ? ` (format ${r.backingFormat})` : "";
    lines.push(`backing file: ${r.backingFile}${format}`);
  }
  for (const [key, value] of Object.entries(r.details ?? {})) lines.push(`${key}: ${value}`);
  if (r.snapshots?.length) lines.push(...snapshotLines(r.snapshots));
  return lines;
}

/** Text as `qemu-img info --backing-chain` prints it. */
export function formatInfoHuman(report: InfoReport): string {
  const top = imageLines(report);
  top.splice(
    4,
    0,
    `allocated: ${humanSize(report.allocatedBytes)} (${report.allocatedBytes} bytes)`,
  );
  const blocks = [top.join("\n"), ...report.backingChain.map((r) => imageLines(r).join("\n"))];
  return blocks.join("\n\n");
}

export const INFO_COMMAND: Command = {
  name: "info",
  summary: "show an image's format, sizes, allocation and backing chain",
  usage: [
    "usage: blktap info IMAGE [--json]",
    "",
    "IMAGE is `type:path` or a path (format probed). Shows the format, virtual",
    "size, cluster size, guest bytes allocated (block status over the chain),",
    "file size and space on disk, and every backing file below it.",
    "",
    "  --json   one JSON object (sizes in bytes, `backingChain` lists the parents)",
  ].join("\n"),
  async run(argv) {
    const { values, positionals } = parseCommandArgs(argv, { json: { type: "boolean" } }, {
      min: 1,
      max: 1,
    });
    const report = await imageInfo(positionals[0]);
    console.log(values.json ? JSON.stringify(report, null, 2) : formatInfoHuman(report));
    return 0;
  },
};
