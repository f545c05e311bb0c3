/**
 * One buffer from several: the byte-joining every layer needs (a write's
 * pieces, a socket's queued chunks).
 * @module
 */

/**
 * `parts` as one buffer: the only part itself, a view when the parts are
 * consecutive slices of one buffer (no copy), else a new buffer.
 */
export function joinBytes(parts: Uint8Array[]): Uint8Array {
  if (parts.length === 1) return parts[0];
  const first = parts[0];
  let contiguous = parts.length > 0;
  for (let i = 1; i < parts.length && contiguous; i += 1) {
    const prev = parts[i - 1];
    contiguous = parts[i].buffer === first.buffer &&
      parts[i].byteOffset === prev.byteOffset + prev.byteLength;
  }
  const total = parts.reduce((n, p) => n + p.byteLength, 0);
  if (contiguous) return new Uint8Array(first.buffer, first.byteOffset, total);
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}
