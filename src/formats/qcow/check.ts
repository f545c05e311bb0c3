/**
 * Structural check of a qcow image (QEMU 7.2 has none for qcow v1): every
 * table and cluster lies inside the file, is aligned, and no two of them
 * overlap (so no cluster is referenced twice). Leaks — file data that no
 * table references, left by a crash between data and metadata — are
 * harmless; `--repair` punches them out, the only change that cannot lose
 * data. Opens the file read-only unless repairing.
 * @module
 */
import type { CheckOptions, CheckReport } from "../inspect.ts";
import type { ImageFile } from "../image_file.ts";
import { checkOnFile } from "../beneath.ts";
import { decodeEntry, l1Checksum, QcowFormatError } from "./header.ts";
import { type QcowImage, readQcowImage } from "./qcow.ts";

/** Corruptions listed individually before they are only counted. */
const corruptions_listed_max = 50;

interface Span {
  start: number;
  end: number;
  what: string;
  /** For L2 tables and plain clusters: the L1 entry they belong to. */
  l1Index?: number;
  /** For plain clusters: the index in their L2 table. */
  slot?: number;
  table?: boolean;
}

class _Findings {
  readonly corruptions: string[] = [];
  #more = 0;
  add(message: string): void {
    if (this.corruptions.length < corruptions_listed_max) this.corruptions.push(message);
    else this.#more += 1;
  }
  finish(): string[] {
    if (this.#more > 0) this.corruptions.push(`... and ${this.#more} more problems`);
    return this.corruptions;
  }
}

/** Checks `path`; see the module description. */
export function checkQcow(path: string, options: CheckOptions): Promise<CheckReport> {
  return checkOnFile(path, options.repair, (file) => _checkFile(file, options));
}

async function _checkFile(file: ImageFile, options: CheckOptions): Promise<CheckReport> {
  let image: QcowImage;
  try {
    image = await readQcowImage(file);
  } catch (error) {
    if (error instanceof QcowFormatError) {
      return { corruptions: [], leakedClusters: 0, unusable: error.message };
    }
    throw error;
  }
  const findings = new _Findings();
  const spans = await _collectSpans(file, image, findings);
  _findOverlaps(spans, findings);
  const leaks = await _findLeaks(file, image, spans);
  const report: CheckReport = {
    corruptions: findings.finish(),
    leakedClusters: leaks.clusters,
  };
  if (options.repair && report.corruptions.length === 0) {
    report.repaired = await _repair(file, image, spans, leaks);
    if (leaks.ranges.length > 0) report.leakedClusters = 0;
  }
  return report;
}

/**
 * What is safe to fix: leaked clusters (nothing references them), and a
 * stale Xen L1 checksum (left by a crash between the L1 write and the
 * checksum write) once every extent the layout reserves is verified free.
 */
async function _repair(
  file: ImageFile,
  image: QcowImage,
  spans: Span[],
  leaks: { ranges: { start: number; end: number }[]; clusters: number },
): Promise<string[]> {
  const repaired: string[] = [];
  for (const r of leaks.ranges) await file.punchHole(r.start, r.end - r.start);
  if (leaks.ranges.length > 0) repaired.push(`punched out ${leaks.clusters} leaked clusters`);
  const xen = image.header.xen;
  if (xen && !image.checksumValid && _extentsHold(file, image, spans)) {
    const value = new Uint8Array(4);
    new DataView(value.buffer).setUint32(0, l1Checksum(image.l1Bytes));
    await file.write(52, value);
    repaired.push("restored the Xen L1 checksum (extent layout verified)");
  }
  if (repaired.length > 0) await file.flush();
  return repaired;
}

/**
 * True when trusting the Xen header again is safe: in an extent-layout
 * image, the extent behind every table that owns one lies inside the file
 * and holds nothing but that table's own clusters in their own slots.
 */
function _extentsHold(file: ImageFile, image: QcowImage, sortedSpans: Span[]): boolean {
  const { header, geometry: g } = image;
  if (header.backingFileOffset !== 0 || header.xen!.minClusterAlloc !== g.l2Entries) return true;
  const from = header.extentTablesFromBytes ?? 0;
  for (const t of sortedSpans) {
    if (!t.table || t.start < from) continue;
    const start = t.start + Math.ceil(g.l2TableBytes / g.clusterBytes) * g.clusterBytes;
    const end = start + g.l2Entries * g.clusterBytes;
    if (end > file.lengthBytes()) return false;
    let lo = 0;
    let hi = sortedSpans.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (sortedSpans[mid].end <= start) lo = mid + 1;
      else hi = mid;
    }
    for (let i = lo; i < sortedSpans.length && sortedSpans[i].start < end; i += 1) {
      const s = sortedSpans[i];
      const own = !s.table && s.l1Index === t.l1Index && s.slot !== undefined && s.slot >= 0 &&
        s.start === start + s.slot * g.clusterBytes;
      if (!own) return false;
    }
  }
  return true;
}

/** Every byte range the image references, with problems found on the way. */
async function _collectSpans(
  file: ImageFile,
  image: QcowImage,
  findings: _Findings,
): Promise<Span[]> {
  const fileBytes = file.lengthBytes();
  const { header, geometry: g } = image;
  const spans: Span[] = [{ start: 0, end: header.xen ? 64 : 48, what: "header" }];
  if (header.backingFileOffset !== 0) {
    const start = header.backingFileOffset;
    spans.push({ start, end: start + header.backingFileSize, what: "backing file name" });
  }
  const l1End = header.l1TableOffset + header.l1Entries * 8;
  spans.push({ start: header.l1TableOffset, end: l1End, what: "L1 table" });
  const table = new Uint8Array(g.l2TableBytes);
  const view = new DataView(table.buffer);
  for (let i = 0; i < image.l1.length; i += 1) {
    const offset = image.l1[i];
    if (offset === 0) continue;
    const what = `L2 table ${i}`;
    if (!Number.isFinite(offset) || offset % 512 !== 0) {
      findings.add(`L1 entry ${i}: L2 table offset ${offset} is not aligned to 512 bytes`);
      continue;
    }
    if (offset + g.l2TableBytes > fileBytes) {
      findings.add(`L1 entry ${i}: ${what} at ${offset} lies past the end of the file`);
      continue;
    }
    spans.push({ start: offset, end: offset + g.l2TableBytes, what, l1Index: i, table: true });
    await file.read(offset, table);
    for (let k = 0; k < g.l2Entries; k += 1) {
      const hi = view.getUint32(k * 8);
      const lo = view.getUint32(k * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      const guest = (i * g.l2Entries + k) * g.clusterBytes;
      const span = _clusterSpan(image, decodeEntry(hi, lo, g.clusterBits), guest, fileBytes);
      if (typeof span === "string") findings.add(span);
      else spans.push({ ...span, l1Index: i, slot: k });
    }
  }
  return spans;
}

function _clusterSpan(
  image: QcowImage,
  entry: ReturnType<typeof decodeEntry>,
  guest: number,
  fileBytes: number,
): Span | string {
  const cluster = image.geometry.clusterBytes;
  const what = `cluster at guest offset ${guest}`;
  if (guest >= image.header.sizeBytes) return `${what} lies past the virtual size`;
  if (!Number.isFinite(entry.offsetBytes)) return `${what}: offset out of range`;
  if (entry.compressed) {
    const end = entry.offsetBytes + entry.compressedBytes;
    if (entry.compressedBytes === 0) return `${what}: compressed size 0`;
    if (end > fileBytes) return `${what}: compressed data at ${entry.offsetBytes} past end of file`;
    return { start: entry.offsetBytes, end, what: `compressed ${what}`, slot: -1 };
  }
  if (entry.offsetBytes % cluster !== 0) {
    return `${what}: host offset ${entry.offsetBytes} is not cluster-aligned`;
  }
  if (entry.offsetBytes + cluster > fileBytes) {
    return `${what}: host offset ${entry.offsetBytes} lies past the end of the file`;
  }
  return { start: entry.offsetBytes, end: entry.offsetBytes + cluster, what };
}

function _findOverlaps(spans: Span[], findings: _Findings): void {
  spans.sort((a, b) => a.start - b.start || a.end - b.end);
  let reach = spans[0];
  for (let i = 1; i < spans.length; i += 1) {
    const s = spans[i];
    if (s.start < reach.end) {
      const verb = s.start === reach.start ? "is referenced twice" : "overlaps";
      findings.add(
        `${s.what} at ${s.start} ${verb}${
          verb === "overlaps" ? ` ${reach.what} at ${reach.start}` : ` (also ${reach.what})`
        }`,
      );
    }
    if (s.end > reach.end) reach = s;
  }
}

/** File data that nothing references (clusters written before a crash). */
async function _findLeaks(file: ImageFile, image: QcowImage, sortedSpans: Span[]) {
  const cluster = image.geometry.clusterBytes;
  // File systems report data per 4 KiB block; the header page and L1 region are metadata.
  const unit = Math.max(cluster, 4096);
  const { l1TableOffset, l1Entries } = image.header;
  const metaEnd = Math.ceil((l1TableOffset + l1Entries * 8) / 4096) * 4096;
  const ranges: { start: number; end: number }[] = [];
  const extents = await file.extents(metaEnd, Math.max(0, file.lengthBytes() - metaEnd));
  let s = 0;
  for (const e of extents) {
    if (!e.data) continue;
    let pos = e.offsetBytes;
    const end = e.offsetBytes + e.lengthBytes;
    while (pos < end) {
      while (s < sortedSpans.length && sortedSpans[s].end <= pos) s += 1;
      const next = s < sortedSpans.length ? sortedSpans[s] : undefined;
      if (next && next.start <= pos) {
        pos = next.end;
        continue;
      }
      const gapEnd = Math.min(end, next ? next.start : end);
      // Only whole clusters count: partial pages around metadata are not leaks.
      const start = Math.ceil(pos / unit) * unit;
      const stop = Math.floor(gapEnd / unit) * unit;
      if (stop > start) ranges.push({ start, end: stop });
      pos = gapEnd;
    }
  }
  const clusters = ranges.reduce((n, r) => n + (r.end - r.start) / cluster, 0);
  return { ranges, clusters };
}
