/**
 * Splitting a guest request at the boundaries of a format's mapping unit
 * (a qcow L2 table's span, a VHD block), the pieces run concurrently.
 * @module
 */

/**
 * Runs `piece` for every part of `bytes` (guest bytes at `offsetBytes`)
 * inside one `unitBytes`-aligned unit, all at once; resolves when all did.
 */
export async function perUnit(
  offsetBytes: number,
  bytes: Uint8Array,
  unitBytes: number,
  piece: (unit: number, offsetBytes: number, bytes: Uint8Array) => Promise<void>,
): Promise<void> {
  const tasks: Promise<void>[] = [];
  const end = offsetBytes + bytes.byteLength;
  for (let pos = offsetBytes; pos < end;) {
    const unit = Math.floor(pos / unitBytes);
    const pieceEnd = Math.min(end, (unit + 1) * unitBytes);
    tasks.push(piece(unit, pos, bytes.subarray(pos - offsetBytes, pieceEnd - offsetBytes)));
    pos = pieceEnd;
  }
  await Promise.all(tasks);
}
