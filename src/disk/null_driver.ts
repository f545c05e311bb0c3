/**
 * `null:SIZE`: a disk that stores nothing (reads leave the buffer as is,
 * writes are dropped), like Linux null_blk. It measures the ring and the
 * disk process without any storage underneath (bench/ring.sh).
 * @module
 */
import { BlockDriverBase, type DriverCapabilities } from "../formats/driver.ts";
import { parseSizeBytes } from "../formats/size.ts";

/** The `null` backend. */
export class NullDriver extends BlockDriverBase {
  readonly format = "null";
  readonly path: string;
  readonly sizeBytes: number;
  readonly capabilities: DriverCapabilities;

  constructor(sizeBytes: number, readOnly = false) {
    super();
    this.path = `null:${sizeBytes}`;
    this.sizeBytes = sizeBytes;
    this.capabilities = {
      canWrite: !readOnly,
      canFlush: true,
      canDiscard: !readOnly,
      canZero: true,
      canExtents: false,
      canMultiConn: true,
    };
  }

  protected _read(): Promise<void> {
    return Promise.resolve();
  }

  protected _write(): Promise<void> {
    return Promise.resolve();
  }

  protected _flush(): Promise<void> {
    return Promise.resolve();
  }

  protected override _discard(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** True for a `null:SIZE` image spec. */
export function isNullSpec(spec: string): boolean {
  return spec.startsWith("null:");
}

/** Opens `null:SIZE` (SIZE as `1G`, `512M`, ...). */
export function openNull(spec: string, readOnly = false): NullDriver {
  return new NullDriver(parseSizeBytes(spec.slice("null:".length)), readOnly);
}
