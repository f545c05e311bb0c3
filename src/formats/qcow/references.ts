/**
 * Every byte range of a qcow file its metadata references: header, backing
 * name, L1 table, L2 tables, clusters. Streamed (one L2 table in memory at
 * a time), so `check` and the leak reclaim of a read-write open work on
 * images of any size.
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import { decodeEntry } from "./header.ts";
import type { QcowImage } from "./qcow_image.ts";

/** What a referenced range is. */
export type SpanKind = "header" | "backing" | "l1" | "l2" | "cluster" | "compressed";

/** One referenced range `[start, end)` of the file. */
export interface Span {
  start: number;
  end: number;
  kind: SpanKind;
  /** L2 tables and clusters: the L1 entry they belong to. */
  l1Index?: number;
  /** Clusters: the index in their L2 table. */
  slot?: number;
}

/** A readable name for a span, for messages. */
export function describeSpan(image: QcowImage, span: Span): string {
  const g = image.geometry;
  switch (span.kind) {
    case "header":
      return "header";
    case "backing":
      return "backing file name";
    case "l1":
      return "L1 table";
    case "l2":
      return `L2 table ${span.l1Index}`;
    default: {
      const guest = (span.l1Index! * g.l2Entries + span.slot!) * g.clusterBytes;
      return `${span.kind === "compressed" ? "compressed " : ""}cluster at guest offset ${guest}`;
    }
  }
}

/**
 * Calls `visit` for every referenced range, in L1 order, and `problem`
 * for every entry that cannot be used as it is. A cluster that lies inside
 * the file is visited even when it has a problem (misaligned, past the
 * virtual size): readers would read it, so nothing may free it.
 */
export async function visitReferences(
  file: ImageFile,
  image: QcowImage,
  visit: (span: Span) => void,
  problem: (message: string) => void = () => {},
): Promise<void> {
  const { header, geometry: g } = image;
  visit({ start: 0, end: header.xen ? 64 : 48, kind: "header" });
  if (header.backingFileOffset !== 0) {
    const start = header.backingFileOffset;
    visit({ start, end: start + header.backingFileSize, kind: "backing" });
  }
  visit({
    start: header.l1TableOffset,
    end: header.l1TableOffset + header.l1Entries * 8,
    kind: "l1",
  });
  const table = new Uint8Array(g.l2TableBytes);
  const view = new DataView(table.buffer);
  await image.l1.scan(async (i, offset) => {
    if (!Number.isFinite(offset) || offset % 512 !== 0) {
      problem(`L1 entry ${i}: L2 table offset ${offset} is not aligned to 512 bytes`);
      return;
    }
    if (offset + g.l2TableBytes > file.lengthBytes()) {
      problem(`L1 entry ${i}: L2 table ${i} at ${offset} lies past the end of the file`);
      return;
    }
    visit({ start: offset, end: offset + g.l2TableBytes, kind: "l2", l1Index: i });
    await file.read(offset, table);
    for (let k = 0; k < g.l2Entries; k += 1) {
      const hi = view.getUint32(k * 8);
      const lo = view.getUint32(k * 8 + 4);
      if (hi !== 0 || lo !== 0) {
        _visitCluster(file, image, i, k, decodeEntry(hi, lo, g.clusterBits), visit, problem);
      }
    }
  });
}

function _visitCluster(
  file: ImageFile,
  image: QcowImage,
  l1Index: number,
  slot: number,
  entry: ReturnType<typeof decodeEntry>,
  visit: (span: Span) => void,
  problem: (message: string) => void,
): void {
  const cluster = image.geometry.clusterBytes;
  const guest = (l1Index * image.geometry.l2Entries + slot) * cluster;
  const what = `cluster at guest offset ${guest}`;
  const fileBytes = file.lengthBytes();
  if (!Number.isFinite(entry.offsetBytes)) return problem(`${what}: offset out of range`);
  const end = entry.compressed
    ? entry.offsetBytes + entry.compressedBytes
    : entry.offsetBytes + cluster;
  if (entry.compressed && entry.compressedBytes === 0) return problem(`${what}: compressed size 0`);
  if (entry.offsetBytes < fileBytes) {
    const kind = entry.compressed ? "compressed" : "cluster";
    visit({ start: entry.offsetBytes, end: Math.min(end, fileBytes), kind, l1Index, slot });
  }
  if (guest >= image.header.sizeBytes) problem(`${what} lies past the virtual size`);
  if (entry.compressed) {
    if (end > fileBytes) {
      problem(`${what}: compressed data at ${entry.offsetBytes} past end of file`);
    }
    return;
  }
  if (entry.offsetBytes % cluster !== 0) {
    problem(`${what}: host offset ${entry.offsetBytes} is not cluster-aligned`);
  } else if (end > fileBytes) {
    problem(`${what}: host offset ${entry.offsetBytes} lies past the end of the file`);
  }
}
