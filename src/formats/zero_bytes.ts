/**
 * Zero detection for cluster-sized buffers: the hot loop of img2qcow and of
 * the write path's "do not allocate zeros" rule.
 * @module
 */

/** True when every byte of `bytes` is zero. */
export function isZeroBytes(bytes: Uint8Array): boolean {
  const head = (4 - (bytes.byteOffset % 4)) % 4;
  const words = Math.floor((bytes.byteLength - head) / 4);
  for (let i = 0; i < head && i < bytes.byteLength; i += 1) if (bytes[i] !== 0) return false;
  if (words > 0) {
    const view = new Int32Array(bytes.buffer, bytes.byteOffset + head, words);
    if (!_zeroWords(view)) return false;
  }
  for (let i = head + words * 4; i < bytes.byteLength; i += 1) if (bytes[i] !== 0) return false;
  return true;
}

function _zeroWords(u: Int32Array): boolean {
  const n = u.length;
  let i = 0;
  for (; i + 8 <= n; i += 8) {
    if ((u[i] | u[i + 1] | u[i + 2] | u[i + 3] | u[i + 4] | u[i + 5] | u[i + 6] | u[i + 7]) !== 0) {
      return false;
    }
  }
  for (; i < n; i += 1) if (u[i] !== 0) return false;
  return true;
}
