/**
 * The raw drivers: a disk whose bytes are the file's bytes. `aio` (libaio,
 * the default for raw images) and `sync` (blocking) differ only in their
 * file layer. Discard punches holes (files only: a block device offers no
 * discard), write-zeroes uses fallocate, block status comes from
 * SEEK_DATA/SEEK_HOLE.
 * @module
 */
import {
  BlockDriverBase,
  BlockError,
  type DriverCapabilities,
  type Extent,
  writeZeroChunks,
  type ZeroOptions,
} from "../driver.ts";
import type { FileExtent, ImageFile, ImageOpenOptions } from "../image_file.ts";
import type { CreateOptions, FormatEntry, OpenContext } from "../format_entry.ts";
import { CreateOptionError, readCreateOptions } from "../create_options.ts";
import { ProbeGuard } from "./probe_guard.ts";
import { createImageFile, type FileEngine, openImageFile } from "./open_file.ts";
import type { FdImageFile } from "./fd_image_file.ts";

/**
 * A raw image served from an {@linkcode ImageFile}. With a `guard` (the
 * format was probed, not named), requests reaching the first bytes go
 * through a {@linkcode ProbeGuard}.
 */
export class RawDriver extends BlockDriverBase {
  readonly format: string;
  readonly sizeBytes: number;
  readonly capabilities: DriverCapabilities;
  readonly #file: ImageFile;
  readonly #guard: ProbeGuard | undefined;

  /**
   * `guard`: the probe guard of a probed raw image. `sizeBytes`: the disk is
   * the file's first bytes (a fixed VHD keeps its footer behind them).
   */
  constructor(
    format: string,
    file: ImageFile,
    guard?: ProbeGuard,
    sizeBytes = file.lengthBytes(),
  ) {
    super();
    this.format = format;
    this.#file = file;
    this.#guard = guard;
    this.sizeBytes = sizeBytes;
    this.capabilities = {
      canWrite: file.writable,
      canFlush: true,
      canDiscard: file.writable && file.canPunchHoles !== false,
      canZero: file.writable,
      canExtents: true,
      canMultiConn: true,
    };
  }

  get path(): string {
    return this.#file.path;
  }

  get pageCacheFd(): number | undefined {
    return this.#file.pageCacheFd;
  }

  protected _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    return this.#file.read(offsetBytes, buffer);
  }

  // Requests that change bytes pass here: those reaching a guarded head wait their turn.
  #guarded(
    offsetBytes: number,
    lengthBytes: number,
    buffers: Uint8Array[] | undefined,
    apply: () => Promise<void>,
  ): Promise<void> {
    const guard = this.#guard;
    if (!guard?.touchesHead(offsetBytes, lengthBytes)) return apply();
    return guard.run(offsetBytes, lengthBytes, buffers, apply);
  }

  protected _write(offsetBytes: number, data: Uint8Array): Promise<void> {
    return this.#guarded(
      offsetBytes,
      data.byteLength,
      [data],
      () => this.#file.write(offsetBytes, data),
    );
  }

  protected _flush(): Promise<void> {
    return this.#file.flush();
  }

  // Scattered ring pages, consecutive on disk: one vectored request.
  protected override _readv(offsetBytes: number, buffers: Uint8Array[]): Promise<void> {
    return this.#file.readv?.(offsetBytes, buffers) ?? super._readv(offsetBytes, buffers);
  }

  protected override _writev(offsetBytes: number, buffers: Uint8Array[]): Promise<void> {
    const lengthBytes = buffers.reduce((n, b) => n + b.byteLength, 0);
    return this.#guarded(
      offsetBytes,
      lengthBytes,
      buffers,
      () => this.#writevFile(offsetBytes, buffers),
    );
  }

  #writevFile(offsetBytes: number, buffers: Uint8Array[]): Promise<void> {
    if (this.#file.writev) return this.#file.writev(offsetBytes, buffers);
    let at = offsetBytes;
    return Promise.all(buffers.map((b) => {
      const done = this.#file.write(at, b);
      at += b.byteLength;
      return done;
    })).then(() => {});
  }

  protected override _discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.#guarded(
      offsetBytes,
      lengthBytes,
      undefined,
      () => this.#file.punchHole(offsetBytes, lengthBytes),
    );
  }

  protected override _writeZeroes(
    offsetBytes: number,
    lengthBytes: number,
    options: ZeroOptions,
  ): Promise<void> {
    return this.#guarded(offsetBytes, lengthBytes, undefined, async () => {
      if (options.mayTrim && this.capabilities.canDiscard) {
        await this.#file.punchHole(offsetBytes, lengthBytes);
        return;
      }
      const fdFile = this.#file as Partial<FdImageFile>;
      if (fdFile.zeroRange?.(offsetBytes, lengthBytes)) return;
      // Straight to the file: through _write it would wait for the guard it is inside.
      const write = (at: number, data: Uint8Array) => this.#file.write(at, data);
      await writeZeroChunks(this.path, offsetBytes, lengthBytes, options, write);
    });
  }

  protected override async _blockStatus(
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<Extent[]> {
    return asDiskExtents(await this.#file.extents(offsetBytes, lengthBytes));
  }

  close(): Promise<void> {
    return this.#file.close();
  }
}

/** A raw disk's extents: its file's, a hole reading as zeros. */
export function asDiskExtents(runs: FileExtent[]): Extent[] {
  return runs.map((run) => ({
    offsetBytes: run.offsetBytes,
    lengthBytes: run.lengthBytes,
    hole: !run.data,
    zero: !run.data,
  }));
}

/**
 * `blktap create -f raw`: a sparse file of the size, or with
 * `-o preallocation=falloc` its space reserved (as `qemu-img create`).
 */
async function createRaw(path: string, options: CreateOptions): Promise<void> {
  const values = readCreateOptions("raw", options.options, { preallocation: ["off", "falloc"] });
  if (options.backingName !== undefined) {
    throw new CreateOptionError("raw images cannot have a backing file");
  }
  await createImageFile(path, async (file) => {
    if (values.preallocation === "falloc" && options.sizeBytes > 0) {
      await file.allocate(0, options.sizeBytes);
    } else await file.truncate(options.sizeBytes);
    await file.flush();
  });
}

function rawFormat(name: string, engine: FileEngine, aliases: string[] = []): FormatEntry {
  return {
    name,
    aliases,
    async open(path: string, options: ImageOpenOptions, context: OpenContext) {
      const file = await openImageFile(path, { ...options, engine });
      if (!options.probedRaw || !file.writable) return new RawDriver(name, file);
      if (!context.probeHead) {
        await file.close();
        throw new BlockError("EINVAL", `${path}: probed raw image opened without the probes`);
      }
      return new RawDriver(name, file, new ProbeGuard(file, context.probeHead));
    },
    create: createRaw,
  };
}

/** `aio:PATH` (also `raw:PATH`): raw image through libaio. */
export const AIO_FORMAT: FormatEntry = rawFormat("aio", "aio", ["raw"]);
/** `sync:PATH`: raw image through blocking system calls. */
export const SYNC_FORMAT: FormatEntry = rawFormat("sync", "sync");
