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
import { QcowFormatError, XEN_FLAG_DIRTY } from "./header.ts";
import { isDirty, type QcowImage, readQcowImage } from "./qcow_image.ts";
import { describeSpan, type Span, visitReferences } from "./references.ts";
import { extentsHold, findLeaks, type Leaks, reclaimLeaks } from "./reclaim.ts";

/** Corruptions listed individually before they are only counted. */
const corruptions_listed_max = 50;

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
  return checkOnFile(path, options.repair, (file) => checkQcowFile(file, options));
}

/** Checks an open image file (writable when repairing). */
export async function checkQcowFile(file: ImageFile, options: CheckOptions): Promise<CheckReport> {
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
  const spans: Span[] = [];
  await visitReferences(file, image, (span) => spans.push(span), (m) => findings.add(m));
  _findOverlaps(image, spans, findings);
  const leaks = await findLeaks(file, image);
  const report: CheckReport = {
    corruptions: findings.finish(),
    leakedClusters: leaks.clusters,
  };
  if (options.repair && report.corruptions.length === 0) {
    report.repaired = await _repair(file, image, leaks);
    report.leakedClusters = 0;
  }
  return report;
}

/**
 * What is safe to fix: leaked clusters (nothing references them), a stale
 * Xen L1 checksum (left by a crash: it is written at a clean close) once
 * every extent the layout reserves is verified, and the dirty flag of a
 * writer that died.
 */
async function _repair(file: ImageFile, image: QcowImage, leaks: Leaks): Promise<string[]> {
  const repaired: string[] = [];
  const before = file.lengthBytes();
  await reclaimLeaks(file, leaks);
  if (leaks.ranges.length > 0) repaired.push(`punched out ${leaks.clusters} leaked clusters`);
  else if (file.lengthBytes() < before) repaired.push("cut unused space at the end of the file");
  const xen = image.header.xen;
  if (xen && !image.checksumValid && await extentsHold(file, image)) {
    _setU32(image.head, 52, await image.l1.checksum());
    repaired.push("restored the Xen L1 checksum (extent layout verified)");
  }
  if (isDirty(image)) {
    _setU32(image.head, 60, xen!.flags & ~XEN_FLAG_DIRTY);
    repaired.push("cleared the dirty flag of a writer that died");
  }
  if (repaired.length > 0) {
    await file.flush();
    await file.write(0, image.head.subarray(0, 64));
    await file.flush();
  }
  return repaired;
}

function _setU32(bytes: Uint8Array, offset: number, value: number): void {
  new DataView(bytes.buffer, bytes.byteOffset).setUint32(offset, value >>> 0);
}

function _findOverlaps(image: QcowImage, spans: Span[], findings: _Findings): void {
  spans.sort((a, b) => a.start - b.start || a.end - b.end);
  let reach = spans[0];
  for (let i = 1; i < spans.length; i += 1) {
    const s = spans[i];
    if (s.start < reach.end) {
      const verb = s.start === reach.start ? "is referenced twice" : "overlaps";
      const other = describeSpan(image, reach);
      findings.add(
        `${describeSpan(image, s)} at ${s.start} ${verb}${
          verb === "overlaps" ? ` ${other} at ${reach.start}` : ` (also ${other})`
        }`,
      );
    }
    if (s.end > reach.end) reach = s;
  }
}
