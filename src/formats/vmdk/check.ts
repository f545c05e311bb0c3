/**
 * The structural check of vmdk images (`blktap check`): for every sparse
 * extent, grain tables lie inside the file and outside other metadata, no
 * grain is referenced twice or overlaps another or the metadata, grains
 * lie past the header's overhead and inside the file, the grain directory
 * agrees with the redundant one, and compressed grains carry the marker of
 * their own grain. QEMU's `qemu-img check` only tests that grains start
 * before the end of the file; this is stricter.
 *
 * A grain (or table) named only by the redundant side is what a flush
 * interrupted between the redundant and the primary side leaves (see
 * `sparse_extent.ts`): a leak, not a corruption. `--repair` clears such
 * redundant entries, copies primary entries over disagreeing redundant
 * ones, and truncates unreferenced grains at the end of the file.
 * @module
 */
import type { CheckOptions, CheckReport } from "../inspect.ts";
import { readTable, type SparseExtent } from "./sparse_extent.ts";
import { SECTOR_BYTES } from "./sparse_header.ts";
import { openVmdk } from "./vmdk.ts";

/** Corruption messages kept per check; the rest are counted. */
const check_messages_max = 100;

interface Range {
  start: number;
  end: number;
  what: string;
}

class Findings {
  corruptions: string[] = [];
  hidden = 0;
  leaked = 0;
  repaired: string[] = [];

  corrupt(message: string): void {
    if (this.corruptions.length < check_messages_max) this.corruptions.push(message);
    else this.hidden += 1;
  }
}

/** Runs the check on `path`; writes only with `repair`. */
export async function vmdkCheck(path: string, options: CheckOptions): Promise<CheckReport> {
  let driver;
  try {
    driver = await openVmdk(path, { readOnly: !options.repair, cache: "writeback" });
  } catch (error) {
    return { corruptions: [], leakedClusters: 0, unusable: (error as Error).message };
  }
  const findings = new Findings();
  try {
    for (const extent of driver.sparseExtents) {
      await checkSparse(extent, findings, options.repair);
    }
    if (options.repair) await driver.flush();
  } catch (error) {
    return { corruptions: findings.corruptions, leakedClusters: 0, unusable: String(error) };
  } finally {
    await driver.close();
  }
  if (findings.hidden > 0) findings.corruptions.push(`... and ${findings.hidden} more`);
  return {
    corruptions: findings.corruptions,
    leakedClusters: findings.leaked,
    repaired: options.repair ? findings.repaired : undefined,
  };
}

interface GrainRef {
  grain: number;
  start: number;
}

function metadataRanges(extent: SparseExtent): Range[] {
  const { header, directoryEntries, redundant } = extent.layout;
  const ranges: Range[] = [{ start: 0, end: SECTOR_BYTES, what: "header" }];
  if (header.descriptorSectors > 0) {
    const start = header.descriptorOffsetSectors * SECTOR_BYTES;
    ranges.push({
      start,
      end: start + header.descriptorSectors * SECTOR_BYTES,
      what: "descriptor",
    });
  }
  const gd = header.directoryOffsetSectors * SECTOR_BYTES;
  ranges.push({ start: gd, end: gd + directoryEntries * 4, what: "grain directory" });
  if (redundant) {
    const rgd = header.redundantDirectoryOffsetSectors * SECTOR_BYTES;
    ranges.push({ start: rgd, end: rgd + directoryEntries * 4, what: "redundant grain directory" });
  }
  return ranges;
}

async function checkSparse(extent: SparseExtent, f: Findings, repair: boolean): Promise<void> {
  const path = extent.file.path;
  const fileBytes = extent.file.lengthBytes();
  const metadata = metadataRanges(extent);
  const grains: GrainRef[] = [];
  const { directory, redundantDirectory } = extent;
  for (let t = 0; t < directory.length; t += 1) {
    const primary = directory[t];
    let backup = redundantDirectory?.[t] ?? 0;
    if (redundantDirectory && primary === 0 && backup !== 0) {
      // A table allocation interrupted before its directory entry: a leak.
      if (repair) {
        await writeU32(extent, extent.layout.header.redundantDirectoryOffsetSectors, t, 0);
        f.repaired.push(`${path}: redundant grain directory entry ${t}: ${backup} -> 0`);
      }
      backup = 0;
    } else if (redundantDirectory && primary !== 0 && backup === 0) {
      f.corrupt(`${path}: grain directory entry ${t} is ${primary}, redundant entry is 0`);
    }
    const gt = await loadTable(extent, primary, `grain table ${t}`, metadata, f);
    const rgt = await loadTable(extent, backup, `redundant grain table ${t}`, metadata, f);
    if (gt) collectGrains(extent, t, gt, grains);
    if (gt && rgt) await compareTables(extent, t, gt, rgt, f, repair);
  }
  checkGrains(extent, grains, metadata, f);
  if (extent.layout.compressed) await checkMarkers(extent, grains, f);
  checkOverlaps(metadata, f, path);
  await countLeaks(extent, grains, metadata, fileBytes, f, repair);
}

async function loadTable(
  extent: SparseExtent,
  sector: number,
  what: string,
  metadata: Range[],
  f: Findings,
): Promise<Uint32Array | undefined> {
  if (sector === 0) return undefined;
  const start = sector * SECTOR_BYTES;
  const end = start + extent.layout.tableBytes;
  if (end > extent.file.lengthBytes()) {
    f.corrupt(`${extent.file.path}: ${what} at sector ${sector} lies past the end of the file`);
    return undefined;
  }
  metadata.push({ start, end, what });
  return await readTable(extent.file, start, extent.layout.header.grainTableEntries);
}

function isDataEntry(extent: SparseExtent, entry: number): boolean {
  return entry > 1 || (entry === 1 && !extent.layout.zeroGrains);
}

function collectGrains(extent: SparseExtent, t: number, gt: Uint32Array, grains: GrainRef[]) {
  for (let j = 0; j < gt.length; j += 1) {
    if (isDataEntry(extent, gt[j])) {
      grains.push({ grain: t * gt.length + j, start: gt[j] * SECTOR_BYTES });
    }
  }
}

async function compareTables(
  extent: SparseExtent,
  t: number,
  gt: Uint32Array,
  rgt: Uint32Array,
  f: Findings,
  repair: boolean,
) {
  const rgtStart = extent.redundantDirectory![t] * SECTOR_BYTES;
  for (let j = 0; j < gt.length; j += 1) {
    if (gt[j] === rgt[j]) continue;
    const grain = t * gt.length + j;
    // Only the redundant side names a grain: a flush interrupted before the primary side.
    const interrupted = !isDataEntry(extent, gt[j]);
    if (!interrupted) {
      f.corrupt(
        `${extent.file.path}: grain ${grain}: grain table says sector ${gt[j]}, ` +
          `redundant table says ${rgt[j]}`,
      );
    }
    if (repair) {
      await writeU32(extent, rgtStart / SECTOR_BYTES, j, gt[j]);
      f.repaired.push(`grain ${grain}: redundant entry ${rgt[j]} -> ${gt[j]}`);
    }
  }
}

async function writeU32(extent: SparseExtent, tableSector: number, index: number, value: number) {
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, value, true);
  await extent.file.write(tableSector * SECTOR_BYTES + index * 4, bytes);
}

function checkGrains(extent: SparseExtent, grains: GrainRef[], metadata: Range[], f: Findings) {
  const path = extent.file.path;
  const fileBytes = extent.file.lengthBytes();
  const overheadBytes = extent.layout.header.overheadSectors * SECTOR_BYTES;
  const grainBytes = extent.layout.grainBytes;
  const compressed = extent.layout.compressed;
  for (const g of grains) {
    if (g.start >= fileBytes) {
      f.corrupt(`${path}: grain ${g.grain} at offset ${g.start} points past the end of the file`);
    } else if (g.start < overheadBytes) {
      f.corrupt(`${path}: grain ${g.grain} at offset ${g.start} lies inside the metadata area`);
    } else if (!compressed) {
      const hit = metadata.find((m) => m.start < g.start + grainBytes && g.start < m.end);
      if (hit) f.corrupt(`${path}: grain ${g.grain} overlaps the ${hit.what}`);
    }
  }
  const sorted = [...grains].sort((a, b) => a.start - b.start);
  for (let i = 1; i < sorted.length; i += 1) {
    const [a, b] = [sorted[i - 1], sorted[i]];
    if (a.start === b.start) {
      f.corrupt(`${path}: grains ${a.grain} and ${b.grain} both use offset ${a.start}`);
    } else if (!compressed && a.start + grainBytes > b.start) {
      f.corrupt(`${path}: grains ${a.grain} and ${b.grain} overlap`);
    }
  }
}

async function checkMarkers(extent: SparseExtent, grains: GrainRef[], f: Findings) {
  if (!extent.layout.markers) return;
  const marker = new Uint8Array(12);
  const view = new DataView(marker.buffer);
  const fileBytes = extent.file.lengthBytes();
  for (const g of grains) {
    if (g.start + 12 > fileBytes) continue; // reported as past the end
    await extent.file.read(g.start, marker);
    const lba = view.getBigUint64(0, true);
    const size = view.getUint32(8, true);
    const expected = BigInt(g.grain) * BigInt(extent.layout.header.grainSectors);
    if (lba !== expected) {
      f.corrupt(`${extent.file.path}: compressed grain ${g.grain} has the marker of sector ${lba}`);
    } else if (size === 0 || g.start + 12 + size > fileBytes) {
      f.corrupt(`${extent.file.path}: compressed grain ${g.grain} has a bad size ${size}`);
    }
  }
}

function checkOverlaps(metadata: Range[], f: Findings, path: string) {
  const sorted = [...metadata].sort((a, b) => a.start - b.start);
  for (let i = 1; i < sorted.length; i += 1) {
    if (sorted[i - 1].end > sorted[i].start) {
      f.corrupt(`${path}: ${sorted[i - 1].what} overlaps ${sorted[i].what}`);
    }
  }
}

async function countLeaks(
  extent: SparseExtent,
  grains: GrainRef[],
  metadata: Range[],
  fileBytes: number,
  f: Findings,
  repair: boolean,
) {
  if (extent.layout.compressed) return;
  const grainBytes = extent.layout.grainBytes;
  const overheadBytes = extent.layout.header.overheadSectors * SECTOR_BYTES;
  const slots = Math.max(0, Math.ceil((fileBytes - overheadBytes) / grainBytes));
  const used = new Set(
    grains.filter((g) => g.start >= overheadBytes && g.start < fileBytes)
      .map((g) => Math.floor((g.start - overheadBytes) / grainBytes)),
  );
  // Grain tables allocated after creation live among the grains.
  for (const m of metadata) {
    if (m.start < overheadBytes) continue;
    const first = Math.floor((m.start - overheadBytes) / grainBytes);
    const last = Math.floor((m.end - 1 - overheadBytes) / grainBytes);
    for (let slot = first; slot <= last; slot += 1) used.add(slot);
  }
  f.leaked += Math.max(0, slots - used.size);
  if (!repair || f.corruptions.length > 0) return;
  // A loop, not Math.max(...): images have more grains than a call has arguments.
  let end = overheadBytes;
  for (const g of grains) end = Math.max(end, g.start + grainBytes);
  for (const m of metadata) end = Math.max(end, Math.ceil(m.end / grainBytes) * grainBytes);
  if (end < fileBytes) {
    await extent.file.truncate(end);
    f.repaired.push(`${extent.file.path}: truncated ${fileBytes - end} unreferenced bytes`);
  }
}
