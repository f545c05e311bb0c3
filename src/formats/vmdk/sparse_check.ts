/**
 * The structural check of one sparse extent, shared by `blktap check` and
 * the recovery a read-write open runs after an unclean shutdown: grain
 * tables lie inside the file and outside other metadata, no grain is
 * referenced twice or overlaps another or the metadata, grains lie past
 * the header's overhead and inside the file, the grain directory agrees
 * with the redundant one, and compressed grains carry the marker of their
 * own grain. QEMU's `qemu-img check` only tests that grains start before
 * the end of the file; this is stricter.
 *
 * An entry (directory or table) present on one side only is what a crash
 * between the two writes of a table leaves: not a corruption. A grain (or
 * table) named only by the redundant side is a leak. Leaks are stored data
 * nothing references. `repair` makes the redundant side match the primary
 * one, punches leaked grains and cuts the file after its last referenced
 * byte.
 * @module
 */
import type { FileRange } from "../unreferenced_space.ts";
import { rangesBytes, unreferencedRanges } from "../unreferenced_space.ts";
import { readTable, type SparseExtent } from "./sparse_extent.ts";
import { SECTOR_BYTES } from "./sparse_header.ts";

/** Corruption messages kept per check; the rest are counted. */
const check_messages_max = 100;

interface Range {
  start: number;
  end: number;
  what: string;
}

/** What checks of one image found (and repaired). */
export class SparseFindings {
  corruptions: string[] = [];
  hidden = 0;
  leaked = 0;
  repaired: string[] = [];

  corrupt(message: string): void {
    if (this.corruptions.length < check_messages_max) this.corruptions.push(message);
    else this.hidden += 1;
  }
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

/** Checks (and with `repair`, fixes) one sparse extent. */
export async function checkSparse(
  extent: SparseExtent,
  f: SparseFindings,
  repair: boolean,
): Promise<void> {
  const fileBytes = extent.file.lengthBytes();
  const metadata = metadataRanges(extent);
  const grains: GrainRef[] = [];
  const { directory, redundantDirectory } = extent;
  for (let t = 0; t < directory.length; t += 1) {
    const primary = directory[t];
    const backup = await checkDirectoryEntry(extent, t, f, repair);
    const gt = await loadTable(extent, primary, `grain table ${t}`, metadata, f);
    const rgt = await loadTable(extent, backup, `redundant grain table ${t}`, metadata, f);
    if (gt) collectGrains(extent, t, gt, grains);
    if (gt && rgt) await compareTables(extent, t, gt, rgt, f, repair);
    else if (gt && redundantDirectory && repair) {
      metadata.push(await copyRedundantTable(extent, t, gt, f));
    }
  }
  checkGrains(extent, grains, metadata, f);
  if (extent.layout.compressed) await checkMarkers(extent, grains, f);
  checkOverlaps(metadata, f, extent.file.path);
  await countLeaks(extent, grains, metadata, fileBytes, f, repair);
}

/**
 * The redundant directory entry of table `t` as it should count: a table
 * named by the redundant side only was allocated by a writer that died
 * before the primary entry (a leak; cleared by `repair`).
 */
async function checkDirectoryEntry(
  extent: SparseExtent,
  t: number,
  f: SparseFindings,
  repair: boolean,
): Promise<number> {
  const redundantDirectory = extent.redundantDirectory;
  const backup = redundantDirectory?.[t] ?? 0;
  if (!redundantDirectory || extent.directory[t] !== 0 || backup === 0) return backup;
  if (repair) {
    await writeU32(extent, extent.layout.header.redundantDirectoryOffsetSectors, t, 0);
    redundantDirectory[t] = 0;
    f.repaired.push(`${extent.file.path}: redundant grain directory entry ${t}: ${backup} -> 0`);
  }
  return 0;
}

/**
 * A table the primary directory names and the redundant one does not (a
 * writer died between the two directory writes): the redundant side gets
 * its own copy at the end of the file.
 */
async function copyRedundantTable(
  extent: SparseExtent,
  t: number,
  gt: Uint32Array,
  f: SparseFindings,
): Promise<Range> {
  const { grainBytes, tableBytes, header } = extent.layout;
  const at = Math.ceil(extent.file.lengthBytes() / grainBytes) * grainBytes;
  const bytes = new Uint8Array(Math.ceil(tableBytes / grainBytes) * grainBytes);
  const view = new DataView(bytes.buffer);
  gt.forEach((entry, j) => view.setUint32(j * 4, entry, true));
  await extent.file.write(at, bytes);
  await extent.file.flush();
  await writeU32(extent, header.redundantDirectoryOffsetSectors, t, at / SECTOR_BYTES);
  extent.redundantDirectory![t] = at / SECTOR_BYTES;
  f.repaired.push(
    `${extent.file.path}: redundant grain table ${t} recreated at sector ${at / SECTOR_BYTES}`,
  );
  return { start: at, end: at + tableBytes, what: `redundant grain table ${t}` };
}

async function loadTable(
  extent: SparseExtent,
  sector: number,
  what: string,
  metadata: Range[],
  f: SparseFindings,
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
  f: SparseFindings,
  repair: boolean,
) {
  const rgtStart = extent.redundantDirectory![t] * SECTOR_BYTES;
  for (let j = 0; j < gt.length; j += 1) {
    if (gt[j] === rgt[j]) continue;
    const grain = t * gt.length + j;
    // One side only names the grain: a writer died between the two table writes.
    const interrupted = gt[j] === 0 || rgt[j] === 0;
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

function checkGrains(
  extent: SparseExtent,
  grains: GrainRef[],
  metadata: Range[],
  f: SparseFindings,
) {
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

async function checkMarkers(extent: SparseExtent, grains: GrainRef[], f: SparseFindings) {
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

function checkOverlaps(metadata: Range[], f: SparseFindings, path: string) {
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
  f: SparseFindings,
  repair: boolean,
) {
  if (extent.layout.compressed) return;
  const grainBytes = extent.layout.grainBytes;
  const overheadBytes = extent.layout.header.overheadSectors * SECTOR_BYTES;
  // Stored data nothing references; holes cost nothing and are not leaks.
  const leaks = await unreferencedRanges(
    extent.file,
    overheadBytes,
    Math.max(grainBytes, 4096),
    (mark) => {
      for (const g of grains) mark(g.start, g.start + grainBytes);
      for (const m of metadata) mark(m.start, m.end);
      return Promise.resolve();
    },
  );
  f.leaked += Math.ceil(rangesBytes(leaks) / grainBytes);
  if (!repair || f.corruptions.length > 0) return;
  // A loop, not Math.max(...): images have more grains than a call has arguments.
  let end = overheadBytes;
  for (const g of grains) end = Math.max(end, g.start + grainBytes);
  for (const m of metadata) end = Math.max(end, Math.ceil(m.end / grainBytes) * grainBytes);
  await punchLeaks(extent, leaks, end, f);
  if (end < fileBytes) {
    await extent.file.truncate(end);
    f.repaired.push(`${extent.file.path}: truncated ${fileBytes - end} unreferenced bytes`);
  }
}

async function punchLeaks(
  extent: SparseExtent,
  leaks: FileRange[],
  end: number,
  f: SparseFindings,
) {
  let punched = 0;
  for (const r of leaks) {
    if (r.startBytes >= end) continue; // cut off with the tail
    const length = Math.min(r.endBytes, end) - r.startBytes;
    await extent.file.punchHole(r.startBytes, length);
    punched += length;
  }
  if (punched > 0) f.repaired.push(`${extent.file.path}: punched out ${punched} leaked bytes`);
}
