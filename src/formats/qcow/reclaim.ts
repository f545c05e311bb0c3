/**
 * Space a dead writer left behind, and taking it back.
 *
 * New clusters and tables are always written at the end of the file
 * before anything links them. A writer that dies (SIGKILL, power loss)
 * with allocating writes in flight leaves data that nothing references:
 * leaks. `check` counts them (`findLeaks`); a read-write open of an image
 * whose last writer died (the Xen dirty flag, or always for images
 * without the Xen extension, which cannot record it) punches them out and
 * cuts the file after the last referenced byte (`reclaimLeaks`), so a kill
 * costs no space once the disk is opened again.
 *
 * blktap's Xen checksum is written at a clean close only (as the 2006
 * tapdisk did), so after a crash it is stale. `extentsHold` checks what the
 * checksum stands for — every table that owns its 2 MiB extent finds in it
 * only its own clusters, each in its own slot — so the checksum can be
 * restored and the extent layout kept.
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import { type FileRange, rangesBytes, unreferencedRanges } from "../unreferenced_space.ts";
import type { QcowImage } from "./qcow_image.ts";
import { type Span, visitReferences } from "./references.ts";

/** Unreferenced data of a qcow file, and where its last referenced byte ends. */
export interface Leaks {
  ranges: FileRange[];
  /** Leaked bytes, in clusters. */
  clusters: number;
  /** End of the last referenced byte (at least the end of the L1 table's pages). */
  referencedEndBytes: number;
}

/** Start of the space after header and L1 table (whole pages: metadata, never leaks). */
function _metadataEnd(image: QcowImage): number {
  const { l1TableOffset, l1Entries } = image.header;
  return Math.ceil((l1TableOffset + l1Entries * 8) / 4096) * 4096;
}

/** Data that nothing references, in whole units of max(cluster, 4 KiB). */
export async function findLeaks(file: ImageFile, image: QcowImage): Promise<Leaks> {
  const cluster = image.geometry.clusterBytes;
  let referencedEndBytes = _metadataEnd(image);
  let visited = false;
  const visit = (mark: (start: number, end: number) => void) => {
    visited = true;
    return visitReferences(file, image, (span) => {
      mark(span.start, span.end);
      referencedEndBytes = Math.max(referencedEndBytes, span.end);
    });
  };
  const ranges = await unreferencedRanges(file, referencedEndBytes, Math.max(cluster, 4096), visit);
  // A file without data past the metadata is not scanned: still find its referenced end.
  if (!visited) await visit(() => {});
  return { ranges, clusters: rangesBytes(ranges) / cluster, referencedEndBytes };
}

/**
 * Frees leaked space: punches leaked ranges and cuts the file after its
 * last referenced byte. The caller makes it durable (fdatasync) before
 * allocating again: the space past the end must read as zeros.
 */
export async function reclaimLeaks(file: ImageFile, leaks: Leaks): Promise<void> {
  const end = leaks.referencedEndBytes;
  for (const r of leaks.ranges) {
    if (r.startBytes >= end) continue; // cut below
    await file.punchHole(r.startBytes, Math.min(r.endBytes, end) - r.startBytes);
  }
  if (file.lengthBytes() > end) await file.truncate(end);
}

interface _Extent {
  start: number;
  end: number;
  l1Index: number;
}

/**
 * True when the extent behind every table that owns one (blktap layout:
 * tables at or past the BLKX record's offset in a standalone image) lies
 * inside the file and holds nothing but that table's own clusters in their
 * own slots. Memory: one record per L2 table.
 */
export async function extentsHold(file: ImageFile, image: QcowImage): Promise<boolean> {
  const { header, geometry: g } = image;
  if (header.backingFileOffset !== 0 || header.xen?.minClusterAlloc !== g.l2Entries) return true;
  const from = header.extentTablesFromBytes ?? 0;
  const tableBytes = Math.ceil(g.l2TableBytes / g.clusterBytes) * g.clusterBytes;
  const extents: _Extent[] = [];
  await image.l1.scan((l1Index, offset) => {
    if (!Number.isFinite(offset) || offset < from) return;
    const start = offset + tableBytes;
    extents.push({ start, end: start + g.l2Entries * g.clusterBytes, l1Index });
  });
  extents.sort((a, b) => a.start - b.start);
  for (let i = 0; i < extents.length; i += 1) {
    if (extents[i].end > file.lengthBytes()) return false;
    if (i > 0 && extents[i - 1].end > extents[i].start) return false;
  }
  let holds = true;
  await visitReferences(file, image, (span) => {
    if (holds && !_fitsExtents(extents, span, g.clusterBytes)) holds = false;
  });
  return holds;
}

// The span lies in no extent, or is its own table's cluster in its own slot.
function _fitsExtents(extents: _Extent[], span: Span, clusterBytes: number): boolean {
  let lo = 0;
  let hi = extents.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (extents[mid].end <= span.start) lo = mid + 1;
    else hi = mid;
  }
  const e = extents[lo];
  if (!e || e.start >= span.end) return true;
  return span.kind === "cluster" && span.l1Index === e.l1Index &&
    span.start === e.start + span.slot! * clusterBytes && span.end <= e.end;
}

/** What a read-write open found and did. */
export interface ReclaimReport {
  leakedBytes: number;
  /** The stale Xen checksum may be restored (the extents were verified). */
  extentsHold: boolean;
}

/** The open-time recovery of an image whose last writer died (see the module description). */
export async function reclaimAtOpen(file: ImageFile, image: QcowImage): Promise<ReclaimReport> {
  const leaks = await findLeaks(file, image);
  await reclaimLeaks(file, leaks);
  const hold = image.header.xen !== undefined && !image.checksumValid &&
    await extentsHold(file, image);
  return { leakedBytes: rangesBytes(leaks.ranges), extentsHold: hold };
}
