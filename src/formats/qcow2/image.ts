/**
 * What is read of a qcow2 image before serving or checking it: the header
 * cluster, the active L1 table and the refcount table.
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import {
  decodeHeader,
  geometryOf,
  type Qcow2Geometry,
  type Qcow2Header,
  V2_HEADER_BYTES,
} from "./header.ts";

/** An image's header and top-level tables. */
export interface Qcow2Image {
  header: Qcow2Header;
  geometry: Qcow2Geometry;
  /** The header cluster as stored (at most the file's length). */
  head: Uint8Array;
  /** The active L1 table as stored (zeros past the end of the file). */
  l1Bytes: Uint8Array;
  /** The refcount table as stored. */
  reftableBytes: Uint8Array;
}

/** Bytes read first: enough for the header fields (cluster_bits among them). */
const probe_bytes = 4096;

/** Reads and validates the header, L1 table and refcount table of `file`. */
export async function readQcow2Image(file: ImageFile): Promise<Qcow2Image> {
  const fileBytes = file.lengthBytes();
  let head = new Uint8Array(Math.min(probe_bytes, fileBytes));
  await file.read(0, head);
  if (head.byteLength >= V2_HEADER_BYTES) {
    const clusterBits = new DataView(head.buffer).getUint32(20);
    const clusterBytes = clusterBits >= 9 && clusterBits <= 21 ? 2 ** clusterBits : 0;
    if (clusterBytes > head.byteLength && fileBytes > head.byteLength) {
      head = new Uint8Array(Math.min(clusterBytes, fileBytes));
      await file.read(0, head);
    }
  }
  const header = decodeHeader(file.path, head, fileBytes);
  const geometry = geometryOf(header);
  const l1Bytes = new Uint8Array(header.l1Size * 8);
  await file.read(header.l1TableOffset, l1Bytes);
  const reftableBytes = new Uint8Array(header.refcountTableClusters * geometry.clusterBytes);
  await file.read(header.refcountTableOffset, reftableBytes);
  return { header, geometry, head, l1Bytes, reftableBytes };
}
