/**
 * `blktap img2qcow QCOW IMAGE`: a raw image or block device to a sparse
 * standalone qcow in blktap's layout. Holes in the source are skipped by
 * its block status (SEEK_DATA/SEEK_HOLE); written zeros are detected per
 * 4 KiB cluster in memory and never allocated. Each 2 MiB region with data
 * gets its L2 table at the end of the file with its clusters packed right
 * behind it, so data goes out in large sequential writes from page-aligned
 * buffers (no O_DIRECT bounce), several regions in flight, and the file is
 * as small as QEMU's. The BLKX record marks these tables as owning no
 * extent: tables the driver adds later reserve theirs (see header.ts).
 * Dependency order: data and L2 tables, fdatasync, L1 and header, fdatasync
 * — an interrupted conversion leaves a valid empty image, never a wrong one.
 * @module
 */
import { type Command, parseCommandArgs, UsageError } from "../cli/command.ts";
import type { BlockDriver, Extent } from "../formats/driver.ts";
import type { ImageFile } from "../formats/image_file.ts";
import { openImage } from "../formats/open_image.ts";
import { openImageFile } from "../formats/raw/open_file.ts";
import { useIoUringOnly } from "../formats/raw/aio_file.ts";
import { planQcow, type QcowLayout, setHeadChecksum } from "../formats/qcow/create.ts";
import { encodeBlkx } from "../formats/qcow/header.ts";
import { isZeroBytes } from "../formats/zero_bytes.ts";
import { NativeMemory } from "../../ffi/memory.ts";
import { Progress } from "./progress.ts";
import { clearTarget } from "./target_file.ts";

const USAGE = `usage: blktap img2qcow [-r] [--force] [-t CACHE] QCOW IMAGE

Converts IMAGE (raw file or block device, or any 'type:path' blktap reads)
into QCOW, a standalone qcow (version 1) image in blktap's layout. Holes
and zero blocks of IMAGE are not allocated. Shows progress on a terminal.

  -r, --reserve   preallocate every cluster of QCOW
  --force         overwrite QCOW if it exists
  -t, --cache M   how QCOW is written: writeback (page cache, default; the
                  kernel merges writes, best on a busy disk) or none
                  (O_DIRECT from page-aligned buffers). Either way the
                  result is made durable (fdatasync) before img2qcow exits.`;

/** Regions converted concurrently (each holds one 2 MiB buffer). */
const regions_in_flight_max = 8;

/** Converts `source` into a new qcow file at `path`. */
export async function imageToQcow(
  source: BlockDriver,
  path: string,
  options: { reserve?: boolean; progress?: Progress; cache?: "none" | "writeback" } = {},
): Promise<void> {
  const sizeBytes = Math.ceil(source.sizeBytes / 512) * 512;
  const layout = planQcow({ sizeBytes, reserve: options.reserve });
  const file = await openImageFile(path, {
    createNew: true,
    cache: options.cache ?? "writeback",
    filling: true,
  });
  try {
    const writer = new _QcowWriter(file, layout, sizeBytes, options.reserve ?? false);
    await writer.start();
    const extents = await source.blockStatus(0, source.sizeBytes);
    await writer.copy(source, extents, options.progress);
    await writer.finish();
  } finally {
    await file.close();
  }
}

/** Lays out a fresh image region by region. */
class _QcowWriter {
  readonly #file: ImageFile;
  readonly #layout: QcowLayout;
  readonly #sizeBytes: number;
  readonly #reserve: boolean;
  readonly #clusterBytes: number;
  readonly #l2Entries: number;
  readonly #spanBytes: number;
  readonly #l1: NativeMemory;
  #fdEnd: number;

  constructor(file: ImageFile, layout: QcowLayout, sizeBytes: number, reserve: boolean) {
    this.#file = file;
    this.#layout = layout;
    this.#sizeBytes = sizeBytes;
    this.#reserve = reserve;
    this.#clusterBytes = 2 ** layout.clusterBits;
    this.#l2Entries = 2 ** layout.l2Bits;
    this.#spanBytes = this.#clusterBytes * this.#l2Entries;
    this.#l1 = NativeMemory.allocate(layout.l1RegionBytes);
    this.#fdEnd = layout.dataStart;
  }

  /** Distance between consecutive tables: a table page and its extent. */
  get #stride(): number {
    return 4096 + this.#spanBytes;
  }

  /** Writes an empty image first: valid whatever happens next. */
  async start(): Promise<void> {
    const head = NativeMemory.allocate(4096);
    try {
      head.bytes.set(this.#layout.head);
      await this.#file.write(0, head.bytes);
      await this.#file.write(this.#layout.l1Offset, this.#l1.bytes);
    } finally {
      head.release();
    }
    if (this.#reserve) {
      const end = this.#layout.dataStart + this.#layout.l1Entries * this.#stride;
      await this.#file.allocate(this.#layout.dataStart, end - this.#layout.dataStart);
      this.#fdEnd = end;
    }
  }

  async copy(source: BlockDriver, extents: Extent[], progress?: Progress): Promise<void> {
    const regions = _regionsWithData(extents, this.#spanBytes);
    let next = 0;
    let done = 0;
    const worker = async () => {
      const buffer = NativeMemory.allocate(this.#spanBytes);
      const table = NativeMemory.allocate(this.#l2Entries * 8);
      try {
        while (next < regions.length) {
          const region = regions[next++];
          await this.#copyRegion(source, region, buffer.bytes, table.bytes);
          done += 1;
          progress?.update((done / regions.length) * this.#sizeBytes);
        }
      } finally {
        buffer.release();
        table.release();
      }
    };
    const workers = Math.min(regions_in_flight_max, Math.max(1, regions.length));
    await Promise.all(Array.from({ length: workers }, worker));
    if (this.#reserve) await this.#reserveEmptyRegions(regions);
  }

  async #copyRegion(
    source: BlockDriver,
    region: _Region,
    buffer: Uint8Array,
    table: Uint8Array,
  ): Promise<void> {
    const base = region.index * this.#spanBytes;
    const cluster = this.#clusterBytes;
    const regionBytes = Math.min(this.#spanBytes, this.#sizeBytes - base);
    let zeroFrom = 0;
    await Promise.all(region.ranges.map(([start, end]) => {
      const readEnd = Math.max(start, Math.min(end, source.sizeBytes));
      _zeroClusterEdges(buffer, zeroFrom, start - base, cluster);
      zeroFrom = readEnd - base;
      if (readEnd <= start) return Promise.resolve();
      return source.read(start, buffer.subarray(start - base, readEnd - base));
    }));
    const clustersEnd = Math.min(buffer.byteLength, Math.ceil(regionBytes / cluster) * cluster);
    _zeroClusterEdges(buffer, zeroFrom, clustersEnd, cluster);
    const present = new Uint8Array(this.#l2Entries);
    let any = false;
    for (const [start, end] of region.ranges) {
      const first = Math.floor((start - base) / cluster);
      const last = Math.ceil((end - base) / cluster);
      for (let k = first; k < last; k += 1) {
        if (present[k]) continue;
        if (!isZeroBytes(buffer.subarray(k * cluster, (k + 1) * cluster))) {
          present[k] = 1;
          any = true;
        }
      }
    }
    if (!any && !this.#reserve) return;
    const tableOffset = this.#tableOffset(region.index, present);
    const hosts = this.#hostOffsets(tableOffset, present, base);
    await this.#writeRuns(hosts, present, buffer);
    this.#fillTable(table, hosts);
    await this.#file.write(tableOffset, table);
    _setU64(new DataView(this.#l1.bytes.buffer), region.index * 8, tableOffset);
  }

  /** Reserved images: fixed places. Sparse: the end of the file, room for the data clusters. */
  #tableOffset(index: number, present: Uint8Array): number {
    if (this.#reserve) return this.#layout.dataStart + index * this.#stride;
    const offset = this.#fdEnd;
    this.#fdEnd += 4096 + present.reduce((n, p) => n + p, 0) * this.#clusterBytes;
    return offset;
  }

  /**
   * Host offset of every cluster of a region (0: not allocated): its slot in
   * a reserved image, else packed behind the table in guest order.
   */
  #hostOffsets(tableOffset: number, present: Uint8Array, base: number): number[] {
    const clusters = Math.ceil(
      Math.min(this.#spanBytes, this.#sizeBytes - base) / this.#clusterBytes,
    );
    const hosts = new Array<number>(this.#l2Entries).fill(0);
    let packed = 0;
    for (let k = 0; k < clusters; k += 1) {
      if (this.#reserve) hosts[k] = tableOffset + 4096 + k * this.#clusterBytes;
      else if (present[k]) hosts[k] = tableOffset + 4096 + (packed++) * this.#clusterBytes;
    }
    return hosts;
  }

  /** One write per run of clusters with data (consecutive in the buffer and the file). */
  async #writeRuns(hosts: number[], present: Uint8Array, buffer: Uint8Array) {
    const cluster = this.#clusterBytes;
    const writes: Promise<void>[] = [];
    for (let k = 0; k < present.length;) {
      if (!present[k]) {
        k += 1;
        continue;
      }
      let m = k + 1;
      while (m < present.length && present[m] && hosts[m] === hosts[m - 1] + cluster) m += 1;
      writes.push(this.#file.write(hosts[k], buffer.subarray(k * cluster, m * cluster)));
      k = m;
    }
    await Promise.all(writes);
  }

  /** The L2 table of a region from its clusters' host offsets. */
  #fillTable(table: Uint8Array, hosts: number[]) {
    table.fill(0);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    hosts.forEach((host, k) => {
      if (host !== 0) _setU64(view, k * 8, host);
    });
  }

  /** In a reserved image, regions without source data still get their (zero) tables. */
  async #reserveEmptyRegions(copied: _Region[]): Promise<void> {
    const done = new Set(copied.map((r) => r.index));
    const table = NativeMemory.allocate(this.#l2Entries * 8);
    const none = new Uint8Array(this.#l2Entries);
    try {
      for (let index = 0; index < this.#layout.l1Entries; index += 1) {
        if (done.has(index)) continue;
        const tableOffset = this.#tableOffset(index, none);
        this.#fillTable(table.bytes, this.#hostOffsets(tableOffset, none, index * this.#spanBytes));
        await this.#file.write(tableOffset, table.bytes);
        _setU64(new DataView(this.#l1.bytes.buffer), index * 8, tableOffset);
      }
    } finally {
      table.release();
    }
  }

  /** Publishes the tables: fdatasync, L1, header with its checksum, fdatasync. */
  async finish(): Promise<void> {
    if (this.#fdEnd > this.#file.lengthBytes()) await this.#file.truncate(this.#fdEnd);
    await this.#file.flush();
    await this.#file.write(this.#layout.l1Offset, this.#l1.bytes);
    const head = NativeMemory.allocate(4096);
    try {
      head.bytes.set(this.#layout.head);
      // Tables written here own no extent; those added later will.
      if (!this.#reserve) encodeBlkx(this.#fdEnd, head.bytes);
      setHeadChecksum(head.bytes, this.#l1.bytes.subarray(0, this.#layout.l1Entries * 8));
      await this.#file.write(0, head.bytes);
    } finally {
      head.release();
    }
    await this.#file.flush();
    this.#l1.release();
  }
}

interface _Region {
  index: number;
  /** Guest ranges with source data inside the region. */
  ranges: [number, number][];
}

/** Groups the source's data extents by 2 MiB region. */
function _regionsWithData(extents: Extent[], spanBytes: number): _Region[] {
  const regions: _Region[] = [];
  for (const e of extents) {
    if (e.zero) continue;
    let pos = e.offsetBytes;
    const end = e.offsetBytes + e.lengthBytes;
    while (pos < end) {
      const index = Math.floor(pos / spanBytes);
      const stop = Math.min(end, (index + 1) * spanBytes);
      const last = regions[regions.length - 1];
      if (last?.index === index) last.ranges.push([pos, stop]);
      else regions.push({ index, ranges: [[pos, stop]] });
      pos = stop;
    }
  }
  return regions;
}

/**
 * Zeros the bytes of a gap `[from, to)` of `buffer` (nothing read there)
 * that share a cluster with data: clusters wholly inside the gap are never
 * examined nor written, so they keep whatever the buffer held (a 2 MiB
 * memset per region cost a fifth of the conversion's CPU time).
 */
function _zeroClusterEdges(buffer: Uint8Array, from: number, to: number, clusterBytes: number) {
  if (to <= from) return;
  const headEnd = Math.min(to, Math.ceil(from / clusterBytes) * clusterBytes);
  buffer.fill(0, from, headEnd);
  buffer.fill(0, Math.max(headEnd, Math.floor(to / clusterBytes) * clusterBytes), to);
}

function _setU64(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, Math.floor(value / 2 ** 32));
  view.setUint32(offset + 4, value >>> 0);
}

async function run(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(argv, {
    reserve: { type: "boolean", short: "r" },
    force: { type: "boolean" },
    cache: { type: "string", short: "t" },
  }, { min: 2, max: 2 });
  const [qcowPath, imageSpec] = positionals;
  const cache = values.cache ?? "writeback";
  if (cache !== "none" && cache !== "writeback") {
    throw new UsageError(`--cache must be none or writeback, not '${cache}'`);
  }
  useIoUringOnly();
  const source = await openImage(imageSpec, { readOnly: true, cache: "writeback" });
  try {
    clearTarget(qcowPath, values.force ?? false);
    const progress = new Progress("img2qcow", source.sizeBytes);
    await imageToQcow(source, qcowPath, { reserve: values.reserve, progress, cache });
    progress.finish();
  } finally {
    await source.close();
  }
  return 0;
}

/** The `img2qcow` command. */
export const IMG2QCOW_COMMAND: Command = {
  name: "img2qcow",
  summary: "convert a raw image or block device to a sparse qcow image",
  usage: USAGE,
  run,
};
