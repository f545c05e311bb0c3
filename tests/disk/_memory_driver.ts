/** A disk in a JavaScript array, for in-process tests of the data path. */
import { BlockDriverBase, type DriverCapabilities } from "../../src/formats/driver.ts";

export class MemoryDriver extends BlockDriverBase {
  readonly format = "memory";
  readonly path = "memory";
  readonly sizeBytes: number;
  readonly capabilities: DriverCapabilities = {
    canWrite: true,
    canFlush: true,
    canDiscard: true,
    canZero: false,
    canExtents: false,
    canMultiConn: true,
  };
  readonly bytes: Uint8Array;
  flushes = 0;
  /** Completion delay, to let requests overlap. */
  delayMs = 0;

  constructor(sizeBytes: number) {
    super();
    this.sizeBytes = sizeBytes;
    this.bytes = new Uint8Array(sizeBytes);
  }

  async #delay() {
    if (this.delayMs > 0) await new Promise((r) => setTimeout(r, Math.random() * this.delayMs));
  }

  protected async _read(offset: number, buffer: Uint8Array) {
    await this.#delay();
    buffer.set(this.bytes.subarray(offset, offset + buffer.byteLength));
  }

  protected async _write(offset: number, data: Uint8Array) {
    await this.#delay();
    this.bytes.set(data, offset);
  }

  protected override _discard(offset: number, length: number) {
    this.bytes.fill(0, offset, offset + length);
    return Promise.resolve();
  }

  protected _flush() {
    this.flushes += 1;
    return Promise.resolve();
  }

  close() {
    return Promise.resolve();
  }
}
