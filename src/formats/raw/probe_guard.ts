/**
 * The probe guard of a raw image whose format was probed, not named (QEMU's
 * raw driver does the same when `bs->probed`, block/raw-format.c): a guest
 * must not turn its disk into something that probes as another format,
 * for whoever opens the file by probing next (QEMU, an older blktap, a
 * tool) would then follow the header to host files (CVE-2008-2004).
 *
 * Every write, write-zeroes or discard that touches the first
 * {@linkcode probe_head_bytes} is checked on what that head would hold
 * afterwards, with the same probes `probeFormat` uses; one that would make
 * it probe as another format fails with EPERM and changes nothing. Such
 * requests run one at a time, so two cannot together build a header.
 * @module
 */
import { BlockError } from "../driver.ts";
import type { ImageFile } from "../image_file.ts";

/** Bytes at the start of a file the format probes read (`probeFormat`, this guard). */
export const probe_head_bytes = 4096;

/** The format a head probes as, undefined for raw. */
export type HeadProbe = (head: Uint8Array) => string | undefined;

/** Serializes and checks the requests of a probed raw image that reach its head. */
export class ProbeGuard {
  readonly #file: ImageFile;
  readonly #probe: HeadProbe;
  #tail: Promise<void> = Promise.resolve();

  constructor(file: ImageFile, probe: HeadProbe) {
    this.#file = file;
    this.#probe = probe;
  }

  /** True when `[offsetBytes, +lengthBytes)` reaches into the probed head. */
  touchesHead(offsetBytes: number, lengthBytes: number): boolean {
    return lengthBytes > 0 && offsetBytes < probe_head_bytes;
  }

  /**
   * Runs `apply` (the request itself) after checking that the head, with
   * `buffers` written from `offsetBytes` (or zeros over `lengthBytes` when
   * `buffers` is undefined), still probes as raw. Throws EPERM otherwise.
   */
  run(
    offsetBytes: number,
    lengthBytes: number,
    buffers: Uint8Array[] | undefined,
    apply: () => Promise<void>,
  ): Promise<void> {
    const turn = this.#tail.then(async () => {
      const head = new Uint8Array(Math.min(probe_head_bytes, this.#file.lengthBytes()));
      await this.#file.read(0, head);
      overlay(head, offsetBytes, lengthBytes, buffers);
      const format = this.#probe(head);
      if (format !== undefined) {
        throw new BlockError(
          "EPERM",
          `${this.#file.path}: write to the first ${probe_head_bytes} bytes refused: it would ` +
            `make this image, probed as raw when attached, probe as ${format} (attach it as ` +
            `aio:${this.#file.path} to lift the restriction)`,
        );
      }
      await apply();
    });
    this.#tail = turn.catch(() => {});
    return turn;
  }
}

// Puts what the request leaves at [offset, offset+length) into `head`.
function overlay(
  head: Uint8Array,
  offsetBytes: number,
  lengthBytes: number,
  buffers: Uint8Array[] | undefined,
): void {
  if (!buffers) {
    head.fill(0, offsetBytes, Math.min(head.byteLength, offsetBytes + lengthBytes));
    return;
  }
  let at = offsetBytes;
  for (const buffer of buffers) {
    if (at >= head.byteLength) return;
    head.set(buffer.subarray(0, head.byteLength - at), at);
    at += buffer.byteLength;
  }
}
