/**
 * A fault-injecting {@linkcode ImageFile} for crash simulation (DESIGN.md
 * §8): it keeps what a flush made durable apart from what was written
 * since, and produces the file a crash could leave — every unflushed
 * write dropped, applied, or torn at 512-byte sectors, in any order.
 * @module
 */
import type { FileExtent, ImageFile } from "../../src/formats/image_file.ts";
import type { Random } from "./random.ts";

type Op =
  | { kind: "write"; offset: number; data: Uint8Array }
  | { kind: "length"; length: number };

const sector_bytes = 512;

function grow(bytes: Uint8Array, length: number): Uint8Array {
  if (length <= bytes.byteLength) return bytes;
  const out = new Uint8Array(Math.max(length, bytes.byteLength * 2));
  out.set(bytes);
  return out;
}

/** In-memory file with durable and volatile states. */
export class FaultFile implements ImageFile {
  readonly path: string;
  readonly writable = true;
  #durable: Uint8Array;
  #durableLength: number;
  #current: Uint8Array;
  #length: number;
  #pending: Op[] = [];
  /** Called before every I/O: the test takes crash snapshots from here. */
  onIo?: () => void;

  constructor(path: string, initial: Uint8Array) {
    this.path = path;
    this.#durable = initial.slice();
    this.#durableLength = initial.byteLength;
    this.#current = initial.slice();
    this.#length = initial.byteLength;
  }

  lengthBytes(): number {
    return this.#length;
  }

  async read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    this.onIo?.();
    await Promise.resolve();
    buffer.fill(0);
    const end = Math.min(this.#length, offsetBytes + buffer.byteLength);
    if (end > offsetBytes) buffer.set(this.#current.subarray(offsetBytes, end));
  }

  async write(offsetBytes: number, data: Uint8Array): Promise<void> {
    this.onIo?.();
    const copy = data.slice();
    await Promise.resolve();
    this.#apply(offsetBytes, copy);
    this.#pending.push({ kind: "write", offset: offsetBytes, data: copy });
  }

  #apply(offset: number, data: Uint8Array): void {
    this.#current = grow(this.#current, offset + data.byteLength);
    this.#current.set(data, offset);
    this.#length = Math.max(this.#length, offset + data.byteLength);
  }

  async flush(): Promise<void> {
    this.onIo?.();
    await Promise.resolve();
    this.#durable = this.#current.slice(0, this.#length);
    this.#durableLength = this.#length;
    this.#pending = [];
  }

  truncate(lengthBytes: number): Promise<void> {
    this.onIo?.();
    this.#current = grow(this.#current, lengthBytes);
    this.#current.fill(0, lengthBytes);
    this.#length = lengthBytes;
    this.#pending.push({ kind: "length", length: lengthBytes });
    return Promise.resolve();
  }

  punchHole(offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.write(offsetBytes, new Uint8Array(lengthBytes));
  }

  allocate(offsetBytes: number, lengthBytes: number): Promise<void> {
    if (offsetBytes + lengthBytes > this.#length) return this.truncate(offsetBytes + lengthBytes);
    return Promise.resolve();
  }

  extents(offsetBytes: number, lengthBytes: number): Promise<FileExtent[]> {
    const end = Math.min(this.#length, offsetBytes + lengthBytes);
    return Promise.resolve(
      end > offsetBytes ? [{ offsetBytes, lengthBytes: end - offsetBytes, data: true }] : [],
    );
  }

  allocatedBytes(): number {
    return this.#length;
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  /** The bytes a crash now could leave on disk. */
  crashImage(rng: Random): Uint8Array {
    let bytes: Uint8Array = this.#durable.slice(0, this.#durableLength);
    let length = this.#durableLength;
    const order = this.#pending.map((op, i) => ({ op, key: rng.next(), i }));
    order.sort((a, b) => a.key - b.key);
    for (const { op } of order) {
      const fate = rng.next();
      if (op.kind === "length") {
        // A size change is durable or not as a whole.
        if (fate < 0.5) length = op.length;
        continue;
      }
      if (fate < 0.33) continue; // dropped
      bytes = grow(bytes, op.offset + op.data.byteLength);
      if (fate < 0.66) {
        bytes.set(op.data, op.offset);
        length = Math.max(length, op.offset + op.data.byteLength);
        continue;
      }
      // Torn: a random subset of its sectors made it.
      for (let s = 0; s < op.data.byteLength; s += sector_bytes) {
        if (rng.next() < 0.5) continue;
        bytes.set(
          op.data.subarray(s, Math.min(s + sector_bytes, op.data.byteLength)),
          op.offset + s,
        );
        length = Math.max(length, op.offset + Math.min(s + sector_bytes, op.data.byteLength));
      }
    }
    const out = new Uint8Array(length);
    out.set(bytes.subarray(0, Math.min(length, bytes.byteLength)));
    return out;
  }
}
