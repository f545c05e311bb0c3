/**
 * The `ram` driver: a disk held in shared memory that several attachments
 * (disk processes, tools, tests) may serve at once — the seed's "shareable
 * RAM disk between VMs".
 *
 * Syntax: `ram:NAME[,size=SIZE][,load=PATH][,persist]`
 * - `NAME`: letters, digits, `_`, `-`, `.` (at most 64); names the segment
 *   `/dev/shm/blktap-ram-NAME` (`$BLKTAP_RAM_DIR` overrides the folder);
 * - `size=64M`: the size when the disk is created (suffixes K, M, G, T);
 *   when the disk exists, it must match or be left out;
 * - `load=PATH`: at creation, the disk is filled from that image (any
 *   format, `type:path` accepted; commas cannot appear in PATH); without
 *   `size`, the disk takes the image's size;
 * - `persist`: the disk survives its last detach (remove it with
 *   `rm /dev/shm/blktap-ram-NAME*`).
 *
 * Lifetime: the segment is removed when the last attachment closes, unless
 * `persist` was ever given. Attachments are counted by the kernel through
 * `flock` (see `attachments.ts`): an attacher that crashes releases its
 * lock. If every attacher crashed, the segment stays with its contents and
 * the next attach re-uses it — so a restarted disk process finds its data
 * — and the next clean last detach removes it.
 *
 * The memory is the data: reads and writes are copies, flush has nothing
 * to do (the disk is as volatile as the machine's RAM), and all attachments
 * see each other's completed writes at once (MAP_SHARED). Discard (and
 * write-zeroes that may deallocate) punches a hole in the segment: the
 * range reads as zeros and its pages go back to the system.
 * @module
 */
import { parseSizeBytes } from "../size.ts";
import { SysError } from "../../../ffi/errno.ts";
import type { File } from "../../../ffi/file.ts";
import { NativeMemory } from "../../../ffi/memory.ts";
import { createPrivateFile, openPrivateFile } from "../../../ffi/private_path.ts";
import {
  BlockDriverBase,
  BlockError,
  type DriverCapabilities,
  type ZeroOptions,
} from "../driver.ts";
import type { ImageOpenOptions } from "../image_file.ts";
import type { ImageInfo } from "../inspect.ts";
import type { FormatEntry } from "../format_entry.ts";
import type { BlockDriver } from "../driver.ts";
import {
  holdAttachment,
  lockRamDisk,
  markPersistent,
  noAttachments,
  ram_file_what,
  ramFileExists,
  type RamPaths,
  ramPaths,
  removeRamDisk,
} from "./attachments.ts";

/** A RAM disk spec, parsed. */
export interface RamSpec {
  name: string;
  sizeBytes?: number;
  load?: string;
  persist: boolean;
}

const ram_name_bytes_max = 64;
/** Copy unit when loading an image into a new RAM disk. */
const load_chunk_bytes = 4 << 20;

/** Parses `NAME[,size=SIZE][,load=PATH][,persist]`; throws EINVAL naming the problem. */
export function parseRamSpec(text: string): RamSpec {
  const [name, ...options] = text.split(",");
  if (!/^[A-Za-z0-9_.-]+$/.test(name) || name.length > ram_name_bytes_max || name.startsWith(".")) {
    throw new BlockError("EINVAL", `ram:${text}: invalid RAM disk name '${name}'`);
  }
  const spec: RamSpec = { name, persist: false };
  for (const option of options) {
    const eq = option.indexOf("=");
    const key = eq < 0 ? option : option.slice(0, eq);
    const value = eq < 0 ? undefined : option.slice(eq + 1);
    if (key === "persist" && value === undefined) spec.persist = true;
    else if (key === "size" && value) spec.sizeBytes = parseRamSize(text, value);
    else if (key === "load" && value) spec.load = value;
    else throw new BlockError("EINVAL", `ram:${text}: unknown option '${option}'`);
  }
  return spec;
}

function parseRamSize(text: string, value: string): number {
  let bytes: number;
  try {
    bytes = parseSizeBytes(value);
  } catch {
    throw new BlockError("EINVAL", `ram:${text}: invalid size '${value}'`);
  }
  if (bytes <= 0) throw new BlockError("EINVAL", `ram:${text}: size must be positive`);
  return bytes;
}

/** A RAM disk attachment. */
export class RamDriver extends BlockDriverBase {
  readonly format = "ram";
  readonly path: string;
  readonly sizeBytes: number;
  readonly capabilities: DriverCapabilities;
  readonly #paths: RamPaths;
  readonly #memory: NativeMemory;
  /** The segment, kept open to punch holes in it. */
  readonly #segment: File;
  readonly #attachment: Deno.FsFile;
  #closed = false;

  constructor(
    name: string,
    paths: RamPaths,
    segment: File,
    memory: NativeMemory,
    attachment: Deno.FsFile,
    writable: boolean,
  ) {
    super();
    this.path = `ram:${name}`;
    this.#paths = paths;
    this.#segment = segment;
    this.#memory = memory;
    this.#attachment = attachment;
    this.sizeBytes = memory.bytes.byteLength;
    this.capabilities = {
      canWrite: writable,
      canFlush: true,
      canDiscard: writable,
      canZero: writable,
      canExtents: false,
      canMultiConn: true,
    };
  }

  protected _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    buffer.set(this.#memory.bytes.subarray(offsetBytes, offsetBytes + buffer.byteLength));
    return Promise.resolve();
  }

  protected _write(offsetBytes: number, data: Uint8Array): Promise<void> {
    this.#memory.bytes.set(data, offsetBytes);
    return Promise.resolve();
  }

  protected _flush(): Promise<void> {
    return Promise.resolve();
  }

  // tmpfs frees the whole pages of the range and zeroes the partial ones;
  // every attachment's mapping reads zeros there at once.
  protected override _discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.#segment.punchHole(offsetBytes, lengthBytes);
    return Promise.resolve();
  }

  protected override _writeZeroes(
    offsetBytes: number,
    lengthBytes: number,
    options: ZeroOptions,
  ): Promise<void> {
    if (options.mayTrim) return this._discard(offsetBytes, lengthBytes);
    this.#memory.bytes.fill(0, offsetBytes, offsetBytes + lengthBytes);
    return Promise.resolve();
  }

  /** Detaches; the last detach removes the segment unless it persists. */
  close(): Promise<void> {
    if (this.#closed) return Promise.resolve();
    this.#closed = true;
    this.#memory.release();
    this.#segment.close();
    const release = lockRamDisk(this.#paths);
    try {
      this.#attachment.close(); // drops our shared lock
      if (noAttachments(this.#paths) && !ramFileExists(this.#paths.persist)) {
        removeRamDisk(this.#paths);
      }
    } finally {
      release();
    }
    return Promise.resolve();
  }
}

/** Opens the image named by `load=` (read-only). */
type OpenSource = (spec: string) => Promise<BlockDriver>;

async function loadImage(spec: RamSpec, memory: NativeMemory, openSource: OpenSource) {
  const image: BlockDriver = await openSource(spec.load!);
  try {
    const length = Math.min(image.sizeBytes, memory.bytes.byteLength);
    for (let done = 0; done < length; done += load_chunk_bytes) {
      const chunk = Math.min(load_chunk_bytes, length - done);
      await image.read(done, memory.bytes.subarray(done, done + chunk));
    }
  } finally {
    await image.close();
  }
}

async function imageSize(load: string, openSource: OpenSource): Promise<number> {
  const image = await openSource(load);
  const size = image.sizeBytes;
  await image.close();
  return size;
}

// Creates the segment (mutex held); removes it again if loading fails.
async function createSegment(spec: RamSpec, paths: RamPaths, openSource: OpenSource) {
  const sizeBytes = spec.sizeBytes ??
    (spec.load ? await imageSize(spec.load, openSource) : undefined);
  if (sizeBytes === undefined) {
    throw new BlockError("EINVAL", `ram:${spec.name}: does not exist yet: give size=SIZE`);
  }
  const file = createPrivateFile(paths.segment, ram_file_what);
  try {
    file.truncate(sizeBytes);
    if (spec.load) {
      const memory = NativeMemory.mapShared(file.fd, sizeBytes, 0, paths.segment);
      try {
        await loadImage(spec, memory, openSource);
      } finally {
        memory.release();
      }
    }
  } catch (error) {
    file.close();
    Deno.removeSync(paths.segment);
    throw error;
  }
  file.close();
}

/** Attaches to (creating if needed) the RAM disk `spec`. */
export async function openRam(
  text: string,
  options: ImageOpenOptions,
  openSource: OpenSource,
): Promise<RamDriver> {
  const spec = parseRamSpec(text);
  const paths = ramPaths(spec.name);
  const release = lockRamDisk(paths);
  let attachment: Deno.FsFile | undefined;
  try {
    if (!ramFileExists(paths.segment)) await createSegment(spec, paths, openSource);
    const file = openPrivateFile(paths.segment, ram_file_what);
    try {
      const { sizeBytes } = file.stat();
      if (spec.sizeBytes !== undefined && spec.sizeBytes !== sizeBytes) {
        throw new BlockError(
          "EINVAL",
          `ram:${spec.name}: exists with size ${sizeBytes}, not ${spec.sizeBytes}`,
        );
      }
      if (spec.persist) markPersistent(paths);
      attachment = holdAttachment(paths);
      const memory = NativeMemory.mapShared(file.fd, sizeBytes, 0, paths.segment);
      return new RamDriver(spec.name, paths, file, memory, attachment, !options.readOnly);
    } catch (error) {
      file.close();
      throw error;
    }
  } catch (error) {
    attachment?.close();
    cleanUpFailedAttach(paths);
    throw error;
  } finally {
    release();
  }
}

// After a failed first attach, the helper files go unless the disk lives on.
// Never masks the attach's own error (a refused file may be why it failed).
function cleanUpFailedAttach(paths: RamPaths): void {
  try {
    if (noAttachments(paths) && !ramFileExists(paths.persist) && !ramFileExists(paths.segment)) {
      removeRamDisk(paths);
    }
  } catch {
    // the attach's error says what is wrong
  }
}

function segmentSize(spec: RamSpec, paths: RamPaths): number {
  let file: File;
  try {
    file = openPrivateFile(paths.segment, ram_file_what);
  } catch (error) {
    if (error instanceof SysError && error.code === "ENOENT") {
      throw new BlockError("EINVAL", `ram:${spec.name}: no such RAM disk`);
    }
    throw error;
  }
  try {
    return file.stat().sizeBytes;
  } finally {
    file.close();
  }
}

/** Facts about an existing RAM disk, without attaching (an attach could end its life). */
export function ramInfo(text: string): Promise<ImageInfo> {
  const spec = parseRamSpec(text);
  const paths = ramPaths(spec.name);
  let sizeBytes: number;
  try {
    sizeBytes = segmentSize(spec, paths);
  } catch (error) {
    return Promise.reject(error);
  }
  const release = lockRamDisk(paths);
  try {
    return Promise.resolve({
      format: "ram",
      virtualSizeBytes: sizeBytes,
      details: {
        segment: paths.segment,
        attached: !noAttachments(paths),
        persist: ramFileExists(paths.persist),
      },
    });
  } finally {
    release();
  }
}

/** `ram:NAME[,size=SIZE][,load=PATH][,persist]`. */
export const RAM_FORMAT: FormatEntry = {
  name: "ram",
  fileless: true,
  open: (path, options, context) =>
    openRam(path, options, (spec) => {
      if (!context.openSource) throw new BlockError("EINVAL", `ram:${path}: cannot load here`);
      return context.openSource(spec);
    }),
  info: ramInfo,
};
