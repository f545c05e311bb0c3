/**
 * The sector bitmaps of partly written VHD blocks, loaded on demand and
 * bounded in number. A bitmap in use is pinned and never evicted, so a
 * change made to it is the one written back; unpinned bitmaps match the
 * file and may be dropped at any time. Bit order is the specification's:
 * sector 0 of a block is the most significant bit of byte 0.
 * @module
 */

interface Slot {
  bits: Uint8Array;
  pins: number;
}

/** True when the bit of `sector` is set. */
export function testBit(bits: Uint8Array, sector: number): boolean {
  return (bits[sector >>> 3] & (0x80 >>> (sector & 7))) !== 0;
}

/** Sets the bits of sectors `[first, end)`. */
export function setBits(bits: Uint8Array, first: number, end: number): void {
  for (let s = first; s < end; s += 1) bits[s >>> 3] |= 0x80 >>> (s & 7);
}

/** True when every sector in `[first, end)` has its bit set. */
export function allSet(bits: Uint8Array, first: number, end: number): boolean {
  for (let s = first; s < end; s += 1) {
    if ((s & 7) === 0 && s + 8 <= end) {
      if (bits[s >>> 3] !== 0xff) return false;
      s += 7;
    } else if (!testBit(bits, s)) return false;
  }
  return true;
}

/** The end of the run of sectors from `first` (before `end`) whose bits equal `first`'s. */
export function runEnd(bits: Uint8Array, first: number, end: number): number {
  const set = testBit(bits, first);
  let s = first + 1;
  while (s < end && testBit(bits, s) === set) s += 1;
  return s;
}

/** A bounded cache of block bitmaps with pinning. */
export class BitmapCache {
  readonly #slots = new Map<number, Slot>();
  readonly #loading = new Map<number, Promise<Uint8Array>>();
  readonly #load: (block: number) => Promise<Uint8Array>;
  readonly #entriesMax: number;

  constructor(entriesMax: number, load: (block: number) => Promise<Uint8Array>) {
    this.#entriesMax = Math.max(1, entriesMax);
    this.#load = load;
  }

  /** The bitmap of `block`, pinned until {@linkcode release}. */
  async acquire(block: number): Promise<Uint8Array> {
    for (;;) {
      const slot = this.#slots.get(block);
      if (slot) {
        slot.pins += 1;
        this.#slots.delete(block); // most recently used last
        this.#slots.set(block, slot);
        return slot.bits;
      }
      let loading = this.#loading.get(block);
      if (!loading) {
        loading = this.#load(block).finally(() => this.#loading.delete(block));
        this.#loading.set(block, loading);
        const bits = await loading;
        this.#insert(block, bits);
        continue;
      }
      await loading;
    }
  }

  /** Installs the bitmap of a newly allocated block (unpinned). */
  insert(block: number, bits: Uint8Array): void {
    this.#slots.delete(block);
    this.#insert(block, bits);
  }

  /** Unpins; a bitmap no one uses may then be evicted. */
  release(block: number): void {
    const slot = this.#slots.get(block);
    if (slot && slot.pins > 0) slot.pins -= 1;
  }

  /** Forgets an unpinned bitmap (its block became full: no lookup needs it). */
  drop(block: number): void {
    const slot = this.#slots.get(block);
    if (slot && slot.pins === 0) this.#slots.delete(block);
  }

  #insert(block: number, bits: Uint8Array): void {
    if (!this.#slots.has(block)) this.#slots.set(block, { bits, pins: 0 });
    for (const [other, slot] of this.#slots) {
      if (this.#slots.size <= this.#entriesMax) break;
      if (slot.pins === 0 && other !== block) this.#slots.delete(other);
    }
  }
}
