/**
 * Compressed clusters: raw deflate (no zlib header) with a 4 KiB window, as
 * QEMU's `qemu-img convert -c` writes them. A cluster inflates to exactly
 * one cluster; anything else is corruption.
 * @module
 */
import { constants, inflateRawSync } from "node:zlib";

/** The cluster in `packed`, or undefined when it does not inflate to `clusterBytes`. */
export function inflateCluster(packed: Uint8Array, clusterBytes: number): Uint8Array | undefined {
  try {
    // QEMU accepts a stream that fills the cluster without its end marker.
    const out = inflateRawSync(packed, {
      finishFlush: constants.Z_SYNC_FLUSH,
      maxOutputLength: clusterBytes,
    });
    if (out.byteLength !== clusterBytes) return undefined;
    return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
  } catch {
    return undefined;
  }
}
