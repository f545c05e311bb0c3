/**
 * Creating qcow images in blktap's layout: header + Xen extension (+ backing
 * name) on the first page, L1 table at 4096. Standalone images use 4 KiB
 * clusters and 512-entry L2 tables (one table and its 2 MiB extent reserved
 * together); images with a backing file use 512-byte clusters and 4096-entry
 * tables, as QEMU and the seed do. A reserved (`-r`) image has every table
 * and cluster allocated up front, the data space preallocated.
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import { createImageFile } from "../raw/open_file.ts";
import {
  backing_name_bytes_max,
  encodeBlkx,
  encodeHeader,
  l1Checksum,
  l1EntriesFor,
  QCOW_HEADER_BYTES,
  XEN_FLAG_L1_BIG_ENDIAN,
  XEN_FLAG_SPARSE,
  XEN_HEADER_BYTES,
  XEN_L1_OFFSET_BYTES,
} from "./header.ts";

/** What to create. */
export interface QcowCreateOptions {
  sizeBytes: number;
  /** Backing file name as it will be stored (relative to the image's folder, or absolute). */
  backingName?: string;
  /** Backing file modification time (seconds), stored as the seed did. */
  backingMtime?: number;
  /** Allocate every cluster now (standalone images only). */
  reserve?: boolean;
}

/** The layout of a new image, before anything is written. */
export interface QcowLayout {
  clusterBits: number;
  l2Bits: number;
  l1Entries: number;
  l1Offset: number;
  /** L1 bytes rounded up to a page. */
  l1RegionBytes: number;
  /** First byte after the L1 region: where tables and data start. */
  dataStart: number;
  /** Header page: header, Xen extension, backing name. */
  head: Uint8Array;
  sparse: boolean;
}

/** Computes the layout and header page for `options`. */
export function planQcow(options: QcowCreateOptions): QcowLayout {
  const backed = options.backingName !== undefined;
  const clusterBits = backed ? 9 : 12;
  const l2Bits = backed ? 12 : 9;
  const l1Entries = l1EntriesFor(options.sizeBytes, clusterBits, l2Bits);
  const name = backed ? new TextEncoder().encode(options.backingName) : new Uint8Array();
  if (name.byteLength > backing_name_bytes_max) {
    throw new Error(`backing file name longer than ${backing_name_bytes_max} bytes`);
  }
  const head = new Uint8Array(XEN_L1_OFFSET_BYTES);
  const sparse = !options.reserve;
  encodeHeader({
    sizeBytes: options.sizeBytes,
    clusterBits,
    l2Bits,
    l1TableOffset: XEN_L1_OFFSET_BYTES,
    backingFileOffset: backed ? QCOW_HEADER_BYTES + XEN_HEADER_BYTES : 0,
    backingFileSize: name.byteLength,
    mtime: options.backingMtime ?? 0,
    xen: {
      checksum: l1Checksum(new Uint8Array(l1Entries * 8)),
      minClusterAlloc: backed ? 1 : 2 ** l2Bits,
      flags: (sparse ? XEN_FLAG_SPARSE : 0) | XEN_FLAG_L1_BIG_ENDIAN,
    },
  }, head);
  head.set(name, QCOW_HEADER_BYTES + XEN_HEADER_BYTES);
  const l1RegionBytes = Math.ceil((l1Entries * 8) / 4096) * 4096;
  // Every table this image will ever have owns its extent.
  if (!backed) encodeBlkx(XEN_L1_OFFSET_BYTES + l1RegionBytes, head);
  return {
    clusterBits,
    l2Bits,
    l1Entries,
    l1Offset: XEN_L1_OFFSET_BYTES,
    l1RegionBytes,
    dataStart: XEN_L1_OFFSET_BYTES + l1RegionBytes,
    head,
    sparse,
  };
}

/** Sets the Xen checksum in a header page for the given L1 table bytes. */
export function setHeadChecksum(head: Uint8Array, l1Bytes: Uint8Array): void {
  new DataView(head.buffer, head.byteOffset).setUint32(52, l1Checksum(l1Bytes));
}

/**
 * Creates `path` (which must not exist) as an empty or reserved image.
 * Written in dependency order: tables, then L1, then header; fdatasync.
 */
export async function createQcow(path: string, options: QcowCreateOptions): Promise<void> {
  if (options.reserve && options.backingName !== undefined) {
    throw new Error("a reserved image cannot have a backing file");
  }
  const layout = planQcow(options);
  await createImageFile(path, async (file) => {
    const l1Bytes = new Uint8Array(layout.l1RegionBytes);
    let end = layout.dataStart;
    if (options.reserve) end = await _reserveAll(file, layout, options.sizeBytes, l1Bytes);
    await file.truncate(end);
    await file.flush();
    await file.write(layout.l1Offset, l1Bytes);
    setHeadChecksum(layout.head, l1Bytes.subarray(0, layout.l1Entries * 8));
    await file.write(0, layout.head);
    await file.flush();
  });
}

/**
 * Allocates every L2 table with its extent and every cluster: table j at
 * `dataStart + j * (4 KiB + 2 MiB)`, its clusters right behind it. Fills
 * `l1Bytes`; returns the file length.
 */
async function _reserveAll(
  file: ImageFile,
  layout: QcowLayout,
  sizeBytes: number,
  l1Bytes: Uint8Array,
): Promise<number> {
  const clusterBytes = 2 ** layout.clusterBits;
  const l2Entries = 2 ** layout.l2Bits;
  const clusters = Math.ceil(sizeBytes / clusterBytes);
  const stride = l2Entries * 8 + l2Entries * clusterBytes;
  const l1View = new DataView(l1Bytes.buffer);
  const table = new Uint8Array(l2Entries * 8);
  const tableView = new DataView(table.buffer);
  let end = layout.dataStart;
  for (let j = 0; j < layout.l1Entries; j += 1) {
    const tableOffset = layout.dataStart + j * stride;
    const first = j * l2Entries;
    const count = Math.min(l2Entries, clusters - first);
    table.fill(0);
    for (let k = 0; k < count; k += 1) {
      _setU64(tableView, k * 8, tableOffset + 4096 + k * clusterBytes);
    }
    _setU64(l1View, j * 8, tableOffset);
    end = tableOffset + 4096 + count * clusterBytes;
    await file.allocate(tableOffset, end - tableOffset);
    await file.write(tableOffset, table);
  }
  return end;
}

function _setU64(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, Math.floor(value / 2 ** 32));
  view.setUint32(offset + 4, value >>> 0);
}
