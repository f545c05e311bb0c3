/**
 * Compressed clusters of qcow and qcow2: raw deflate (no zlib header) with
 * a 4 KiB window, as QEMU's `qemu-img convert -c` writes them. A cluster
 * inflates to exactly one cluster; anything else is corruption. node:zlib
 * is imported on first use: loading it costs every process about 30 ms of
 * start-up, and most never meet a compressed cluster.
 * @module
 */

/** QEMU's deflateInit2 parameters: window 2^12, memLevel 9. */
const deflate_window_bits = 12;
const deflate_mem_level = 9;

let zlib_module: Promise<typeof import("node:zlib")> | undefined;

/** node:zlib, loaded on the first call (every reader of compressed data comes here). */
export function zlib(): Promise<typeof import("node:zlib")> {
  return zlib_module ??= import("node:zlib");
}

/** The cluster in `packed`, or undefined when it does not inflate to `clusterBytes`. */
export async function inflateCluster(
  packed: Uint8Array,
  clusterBytes: number,
): Promise<Uint8Array | undefined> {
  const { constants, inflateRawSync } = await zlib();
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

/**
 * `cluster` deflated as QEMU does, or undefined when the result would not
 * be smaller than `limitBytes` (QEMU stores such a cluster uncompressed).
 */
export async function deflateCluster(
  cluster: Uint8Array,
  limitBytes: number,
): Promise<Uint8Array | undefined> {
  const { constants, deflateRawSync } = await zlib();
  const out = deflateRawSync(cluster, {
    windowBits: deflate_window_bits,
    memLevel: deflate_mem_level,
    level: constants.Z_DEFAULT_COMPRESSION,
  });
  if (out.byteLength >= limitBytes) return undefined;
  return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
}
