/**
 * What a qcow file says about itself, read at open by the driver, `check`
 * and `info`: header, Xen extension, backing name, L1 table, and whether
 * blktap's Xen checksum matches the L1 table.
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import {
  decodeHeader,
  geometryOf,
  QcowFormatError,
  type QcowGeometry,
  type QcowHeader,
  XEN_FLAG_DIRTY,
  XEN_FLAG_L1_BIG_ENDIAN,
} from "./header.ts";
import { L1Table } from "./l1_table.ts";

/** Bytes read at open for the header, its extension and the backing name. */
const head_bytes = 4096;

/** An opened qcow file's metadata. */
export interface QcowImage {
  header: QcowHeader;
  geometry: QcowGeometry;
  backingName?: string;
  /** The L1 table (paged when large). */
  l1: L1Table;
  /** The Xen checksum matches the L1 table. */
  checksumValid: boolean;
  /** The first page (header, extension, backing name), as stored. */
  head: Uint8Array;
}

/** Reads and validates header, backing name and L1 table of an open file. */
export async function readQcowImage(file: ImageFile): Promise<QcowImage> {
  const fileBytes = file.lengthBytes();
  const head = new Uint8Array(Math.min(head_bytes, fileBytes));
  await file.read(0, head);
  const header = decodeHeader(file.path, head, fileBytes);
  const geometry = geometryOf(header);
  let backingName: string | undefined;
  if (header.backingFileOffset !== 0) {
    const name = new Uint8Array(header.backingFileSize);
    await file.read(header.backingFileOffset, name);
    backingName = new TextDecoder().decode(name).replace(/\0.*$/s, "");
    if (backingName === "") throw new QcowFormatError(file.path, "empty backing file name");
  }
  const bigEndian = !header.xen || (header.xen.flags & XEN_FLAG_L1_BIG_ENDIAN) !== 0;
  const l1 = await L1Table.open(file, header.l1TableOffset, header.l1Entries, bigEndian);
  const checksumValid = header.xen !== undefined && header.xen.checksum === await l1.checksum();
  return { header, geometry, backingName, l1, checksumValid, head };
}

/** True when the Xen header says a writer has the image open, or died with it open. */
export function isDirty(image: QcowImage): boolean {
  return image.header.xen !== undefined && (image.header.xen.flags & XEN_FLAG_DIRTY) !== 0;
}

/** Why L1 entry `index` (`offsetBytes`) cannot be an L2 table of a file of `fileBytes`, if it cannot. */
export function l1EntryProblem(
  image: QcowImage,
  fileBytes: number,
  index: number,
  offsetBytes: number,
): string | undefined {
  if (offsetBytes % 512 === 0 && offsetBytes + image.geometry.l2TableBytes <= fileBytes) {
    return undefined;
  }
  return `L1 entry ${index} points at ${offsetBytes}, not an L2 table inside the file (${fileBytes} bytes)`;
}

/** Whether new L2 tables of this image reserve their 2 MiB extent (blktap's layout). */
export function hasExtentLayout(image: QcowImage): boolean {
  const xen = image.header.xen;
  return xen !== undefined && image.checksumValid && image.header.backingFileOffset === 0 &&
    xen.minClusterAlloc === image.geometry.l2Entries;
}
