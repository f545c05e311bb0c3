/**
 * `blktap map IMAGE [--json]`: which guest ranges hold data, are zero, or
 * are unallocated, and in which layer of the backing chain — the shape and
 * semantics of `qemu-img map --output=json`: `start`, `length`, `depth`
 * (the layer the range comes from; the deepest layer when no layer has
 * it), `present` (allocated in some layer), `zero` (reads as zeros),
 * `data` (bytes stored in a file), `offset` (where in the file, when the
 * format says; raw layers map one to one).
 * @module
 */
import { type Command, parseCommandArgs } from "../cli/command.ts";
import type { BlockDriver } from "../formats/driver.ts";
import { type ChainLayer, describeChain, isRawFormat, openLayerAlone } from "./image_chain.ts";

/** One entry of the map, as `qemu-img map --output=json` prints it. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** A range of one layer alone. */
interface LayerRun {
  offsetBytes: number;
  lengthBytes: number;
  /** Not allocated in this layer. */
  hole: boolean;
  zero: boolean;
  /** Stored in a file (QEMU's BDRV_BLOCK_DATA); may be zero too (a flat file's hole). */
  data: boolean;
  hostOffsetBytes?: number;
}

/** Guest bytes asked of each layer at once, so memory stays bounded on huge images. */
const map_window_bytes = 1 << 30;

interface HostMapping {
  mapRuns(offsetBytes: number, lengthBytes: number): Promise<
    { offsetBytes: number; lengthBytes: number; kind: string; hostOffsetBytes?: number }[]
  >;
}

async function layerRuns(
  layer: ChainLayer,
  driver: BlockDriver,
  offsetBytes: number,
  lengthBytes: number,
): Promise<LayerRun[]> {
  const end = Math.min(offsetBytes + lengthBytes, driver.sizeBytes);
  const runs: LayerRun[] = [];
  if (end > offsetBytes) {
    const mapping = driver as unknown as Partial<HostMapping>;
    if (typeof mapping.mapRuns === "function") {
      for (const r of await mapping.mapRuns(offsetBytes, end - offsetBytes)) {
        runs.push({
          offsetBytes: r.offsetBytes,
          lengthBytes: r.lengthBytes,
          hole: r.kind === "hole",
          zero: r.kind === "hole" || r.kind === "zero" || r.kind === "flat-hole",
          data: r.kind === "data" || r.kind === "compressed" || r.kind === "flat-hole",
          hostOffsetBytes: r.hostOffsetBytes,
        });
      }
    } else {
      const raw = isRawFormat(layer.format);
      for (const e of await driver.blockStatus(offsetBytes, end - offsetBytes)) {
        runs.push({
          offsetBytes: e.offsetBytes,
          lengthBytes: e.lengthBytes,
          // A raw file has no "unallocated": its holes are allocated zeros.
          hole: raw ? false : e.hole,
          zero: e.zero,
          data: !e.zero,
          hostOffsetBytes: raw ? e.offsetBytes : undefined,
        });
      }
    }
  }
  // Past the end of a shorter backing file nothing is allocated.
  const covered = Math.max(end, offsetBytes);
  if (covered < offsetBytes + lengthBytes) {
    runs.push({
      offsetBytes: covered,
      lengthBytes: offsetBytes + lengthBytes - covered,
      hole: true,
      zero: true,
      data: false,
    });
  }
  return runs;
}

function pushEntry(entries: MapEntry[], entry: MapEntry): void {
  const last = entries[entries.length - 1];
  if (
    last && last.depth === entry.depth && last.present === entry.present &&
    last.zero === entry.zero && last.data === entry.data &&
    last.start + last.length === entry.start &&
    (last.offset === undefined) === (entry.offset === undefined) &&
    (last.offset === undefined || last.offset + last.length === entry.offset)
  ) {
    last.length += entry.length;
    return;
  }
  entries.push(entry);
}

/**
 * Which layer answers for `position`: the first one (from the top) that
 * allocates it, or whose backing file ends at or before it (QEMU: bytes past
 * the end of a shorter backing file read as zeros *from the overlay*, so
 * `qemu-img map` stops there with that overlay's depth), else the last.
 */
function answeringLayer(
  runs: LayerRun[][],
  cursors: number[],
  sizes: number[],
  position: number,
): { depth: number; run?: LayerRun; next: number } {
  let next = Infinity;
  for (let i = 0; i < runs.length; i += 1) {
    while (runs[i][cursors[i]].offsetBytes + runs[i][cursors[i]].lengthBytes <= position) {
      cursors[i] += 1;
    }
    const run = runs[i][cursors[i]];
    next = Math.min(next, run.offsetBytes + run.lengthBytes);
    if (!run.hole) return { depth: i, run, next };
    if (i + 1 < runs.length && position >= sizes[i + 1]) return { depth: i, next };
  }
  return { depth: runs.length - 1, next };
}

// Maps one window: at each position the answering layer wins.
async function mapWindow(
  layers: ChainLayer[],
  drivers: BlockDriver[],
  start: number,
  length: number,
  entries: MapEntry[],
): Promise<void> {
  const runs = await Promise.all(layers.map((l, i) => layerRuns(l, drivers[i], start, length)));
  const sizes = drivers.map((d) => d.sizeBytes);
  const cursors = runs.map(() => 0);
  let position = start;
  while (position < start + length) {
    const { depth, run, next: runEnd } = answeringLayer(runs, cursors, sizes, position);
    const next = Math.min(runEnd, start + length);
    const entry: MapEntry = {
      start: position,
      length: next - position,
      depth,
      present: run !== undefined,
      zero: run?.zero ?? true,
      data: run?.data ?? false,
    };
    if (run?.hostOffsetBytes !== undefined) {
      entry.offset = run.hostOffsetBytes + (position - run.offsetBytes);
    }
    pushEntry(entries, entry);
    position = next;
  }
}

/** The map of `spec` (`type:path` or a path) over its whole virtual size. */
export async function mapImage(spec: string): Promise<MapEntry[]> {
  const layers = await describeChain(spec);
  if (layers[0].format === "ram") {
    // RAM is all data; attaching could end a RAM disk's life on detach.
    const length = layers[0].info.virtualSizeBytes;
    return [{ start: 0, length, depth: 0, present: true, zero: false, data: true }];
  }
  const drivers: BlockDriver[] = [];
  try {
    for (const layer of layers) drivers.push(await openLayerAlone(layer));
    const size = drivers[0].sizeBytes;
    const entries: MapEntry[] = [];
    for (let start = 0; start < size; start += map_window_bytes) {
      await mapWindow(layers, drivers, start, Math.min(map_window_bytes, size - start), entries);
    }
    return entries;
  } finally {
    for (const driver of drivers) await driver.close();
  }
}

/** QEMU's JSON lines: one entry per line inside one array. */
export function formatMapJson(entries: MapEntry[]): string {
  const lines = entries.map((e) => {
    const offset = e.offset === undefined ? "" : `, "offset": ${e.offset}`;
    return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, ` +
      `"present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}`;
  });
  return `[${lines.join(",\n")}]`;
}

function formatMapHuman(entries: MapEntry[]): string {
  const header = "Offset          Length          Depth  State";
  const rows = entries.map((e) => {
    const state = e.data ? "data" : e.present ? "zero" : "unallocated";
    const where = e.offset === undefined ? "" : ` at 0x${e.offset.toString(16)}`;
    return `0x${e.start.toString(16).padEnd(14)}0x${e.length.toString(16).padEnd(14)}` +
      `${String(e.depth).padEnd(7)}${state}${where}`;
  });
  return [header, ...rows].join("\n");
}

export const MAP_COMMAND: Command = {
  name: "map",
  summary: "show which ranges of an image hold data (qemu-img map)",
  usage: [
    "usage: blktap map IMAGE [--json]",
    "",
    "Prints the allocation of IMAGE (`type:path` or a path, format probed) over",
    "its whole virtual size, layer by layer through its backing chain.",
    "",
    "  --json   qemu-img map --output=json: start, length, depth, present, zero,",
    "           data, offset (where the format knows it)",
  ].join("\n"),
  async run(argv) {
    const { values, positionals } = parseCommandArgs(argv, { json: { type: "boolean" } }, {
      min: 1,
      max: 1,
    });
    const entries = await mapImage(positionals[0]);
    console.log(values.json ? formatMapJson(entries) : formatMapHuman(entries));
    return 0;
  },
};
