/**
 * Refcount entries of every width qcow2 allows (refcount_order 0..6, that
 * is 1 to 64 bits). Sub-byte widths are packed from the least significant
 * bit of each byte; 16, 32 and 64 bits are big-endian.
 * @module
 */

/** The refcount at `index` of a refcount block's bytes. */
export function getRefcount(view: DataView, index: number, order: number): number {
  switch (order) {
    case 0:
      return (view.getUint8(index >>> 3) >> (index & 7)) & 1;
    case 1:
      return (view.getUint8(index >>> 2) >> (2 * (index & 3))) & 3;
    case 2:
      return (view.getUint8(index >>> 1) >> (4 * (index & 1))) & 0xf;
    case 3:
      return view.getUint8(index);
    case 4:
      return view.getUint16(index * 2);
    case 5:
      return view.getUint32(index * 4);
    default: {
      // Counts past 2^53 cannot be exact; they only ever mean "shared".
      return Math.min(
        view.getUint32(index * 8) * 2 ** 32 + view.getUint32(index * 8 + 4),
        Number.MAX_SAFE_INTEGER,
      );
    }
  }
}

/** Sets the refcount at `index`; the caller keeps `value` within the width. */
export function setRefcount(view: DataView, index: number, order: number, value: number): void {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const perByte = 8 >> order;
      const at = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      view.setUint8(at, (view.getUint8(at) & ~mask) | ((value << shift) & mask));
      return;
    }
    case 3:
      view.setUint8(index, value);
      return;
    case 4:
      view.setUint16(index * 2, value);
      return;
    case 5:
      view.setUint32(index * 4, value);
      return;
    default:
      view.setUint32(index * 8, Math.floor(value / 2 ** 32));
      view.setUint32(index * 8 + 4, value >>> 0);
  }
}
