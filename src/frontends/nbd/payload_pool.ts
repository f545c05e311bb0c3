/**
 * Payload buffers for NBD requests that the driver does not lend: the data
 * part is page-aligned (so the `aio` driver can DMA into it with O_DIRECT,
 * no bounce copy) and preceded by headroom where the reply header is
 * written, so a READ reply leaves in one socket write. Freed buffers are
 * kept per power-of-two size class, within a byte budget.
 * @module
 */

const page_bytes = 4096;
/** Room before the data for the largest reply header (structured OFFSET_DATA: 28 bytes). */
export const payload_headroom_bytes = 64;
const class_bytes_min = 4096;
const pooled_bytes_max = 256 << 20;
const pooled_buffers_per_class_max = 256;

/** A pooled buffer: `data` is the payload, `frame` = headroom + data. */
export interface Payload {
  /** `payload_headroom_bytes` + `lengthBytes`; the header goes at the end of the headroom. */
  readonly frame: Uint8Array;
  /** The payload bytes, page-aligned when the platform tells us addresses. */
  readonly data: Uint8Array;
  /** Size class (capacity of the whole data region). */
  readonly classBytes: number;
  /** The whole aligned region, reused for any length up to `classBytes`. */
  readonly region: Uint8Array;
}

function sizeClass(lengthBytes: number): number {
  let size = class_bytes_min;
  while (size < lengthBytes) size *= 2;
  return size;
}

function addressOf(bytes: Uint8Array): number | undefined {
  try {
    return Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes)));
  } catch {
    return undefined; // no FFI permission: alignment only matters to the aio driver
  }
}

// Carves a region whose data part (after the headroom) starts on a page.
function allocateRegion(classBytes: number): Uint8Array {
  const raw = new Uint8Array(classBytes + 2 * page_bytes);
  const address = addressOf(raw) ?? 0;
  let start = (page_bytes - (address % page_bytes)) % page_bytes;
  if (start < payload_headroom_bytes) start += page_bytes;
  return raw.subarray(start - payload_headroom_bytes, start + classBytes);
}

/** A bounded free list of payload buffers shared by every connection of a server. */
export class PayloadPool {
  readonly #free = new Map<number, Uint8Array[]>();
  #pooledBytes = 0;

  /** A buffer whose `data` is exactly `lengthBytes`. */
  take(lengthBytes: number): Payload {
    const classBytes = sizeClass(lengthBytes);
    let region = this.#free.get(classBytes)?.pop();
    if (region) this.#pooledBytes -= region.byteLength;
    else region = allocateRegion(classBytes);
    return {
      region,
      classBytes,
      frame: region.subarray(0, payload_headroom_bytes + lengthBytes),
      data: region.subarray(payload_headroom_bytes, payload_headroom_bytes + lengthBytes),
    };
  }

  /** Gives a buffer back; it must not be used afterwards. */
  give(payload: Payload): void {
    const list = this.#free.get(payload.classBytes) ?? [];
    if (
      list.length >= pooled_buffers_per_class_max ||
      this.#pooledBytes + payload.region.byteLength > pooled_bytes_max
    ) return;
    list.push(payload.region);
    this.#free.set(payload.classBytes, list);
    this.#pooledBytes += payload.region.byteLength;
  }
}
