/**
 * The `vmdk` driver: VMware virtual disks as QEMU and VMware write them.
 *
 * - monolithicSparse (one `KDMV` sparse extent with an embedded
 *   descriptor): read and write;
 * - monolithicFlat, twoGbMaxExtentFlat, vmfs (a text descriptor naming raw
 *   FLAT extents): read and write;
 * - twoGbMaxExtentSparse (a descriptor naming several sparse extents): read
 *   and write;
 * - streamOptimized (compressed grains with markers): read-only.
 *
 * Delta links (a descriptor with a `parentCID` other than `ffffffff`) are
 * refused with a clear "unsupported" error, as are VMFS sparse (`COWD`),
 * seSparse and raw device maps. Grain allocation and its crash ordering are
 * described in `sparse_extent.ts`; `check.ts` holds the structural check.
 * @module
 */
import {
  BlockDriverBase,
  BlockError,
  type DriverCapabilities,
  type Extent,
  imageFormatCapabilities,
} from "../driver.ts";
import type { ImageFile, ImageOpenOptions } from "../image_file.ts";
import type { ImageInfo } from "../inspect.ts";
import { openImageFile } from "../raw/open_file.ts";
import { resolveStoredName } from "../chain_policy.ts";
import {
  type Descriptor,
  DescriptorError,
  looksLikeDescriptor,
  parseDescriptor,
  refuseDeltaLink,
} from "./descriptor.ts";
import { type ExtentRun, pushRun, readSparseHeader, SparseExtent } from "./sparse_extent.ts";
import { checkSparse, SparseFindings } from "./sparse_check.ts";
import {
  descriptor_bytes_max,
  hasSparseMagic,
  HeaderError,
  SECTOR_BYTES,
} from "./sparse_header.ts";

/** One extent as the driver serves it. */
interface ServedExtent {
  /** Guest offset of the extent's first byte. */
  startBytes: number;
  sizeBytes: number;
  type: string;
  access: string;
  file?: ImageFile;
  /** Byte offset of the extent inside a FLAT file. */
  flatOffsetBytes: number;
  sparse?: SparseExtent;
}

/** A guest range and where it lives, for `blktap map`. */
export interface MappedRun extends ExtentRun {
  /** The extent file holding the bytes, when they are in one. */
  hostPath?: string;
}

const UNSUPPORTED_CREATE_TYPES = new Set([
  "vmfssparse",
  "vmfsraw",
  "vmfsrawdevicemap",
  "vmfspassthroughrawdevicemap",
  "fulldevice",
  "partitioneddevice",
  "sesparse",
]);

/** Opens the files of a vmdk image (descriptor, extents). */
export type OpenVmdkFile = (path: string, options: ImageOpenOptions) => Promise<ImageFile>;
type OpenFile = OpenVmdkFile;

/** Decodes descriptor bytes as latin1 text, stopping at the first NUL. */
export function descriptorText(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return new TextDecoder("latin1").decode(nul >= 0 ? bytes.subarray(0, nul) : bytes);
}

/** A vmdk image opened for serving. */
export class VmdkDriver extends BlockDriverBase {
  readonly format = "vmdk";
  readonly path: string;
  readonly sizeBytes: number;
  readonly capabilities: DriverCapabilities;
  readonly createType: string;
  readonly descriptor?: Descriptor;
  readonly #extents: ServedExtent[];
  readonly #files: ImageFile[];
  /** What the open recovered in extents whose last writer died. */
  readonly recovered: string[] = [];

  constructor(
    path: string,
    extents: ServedExtent[],
    files: ImageFile[],
    createType: string,
    writable: boolean,
    descriptor?: Descriptor,
  ) {
    super();
    this.path = path;
    this.#extents = extents;
    this.#files = files;
    this.createType = createType;
    this.descriptor = descriptor;
    const last = extents[extents.length - 1];
    this.sizeBytes = last.startBytes + last.sizeBytes;
    this.capabilities = imageFormatCapabilities(writable);
  }

  /** The sparse extents, for `check` and `info`. */
  get sparseExtents(): SparseExtent[] {
    return this.#extents.flatMap((e) => (e.sparse ? [e.sparse] : []));
  }

  // Calls `fn` for each extent piece of a guest range (in order).
  #pieces(offsetBytes: number, lengthBytes: number) {
    const pieces: { extent: ServedExtent; offset: number; done: number; length: number }[] = [];
    let done = 0;
    for (const extent of this.#extents) {
      if (done >= lengthBytes) break;
      const position = offsetBytes + done;
      const end = extent.startBytes + extent.sizeBytes;
      if (position >= end) continue;
      const length = Math.min(end - position, lengthBytes - done);
      pieces.push({ extent, offset: position - extent.startBytes, done, length });
      done += length;
    }
    return pieces;
  }

  protected async _read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    await Promise.all(
      this.#pieces(offsetBytes, buffer.byteLength).map(({ extent, offset, done, length }) => {
        const target = buffer.subarray(done, done + length);
        if (extent.sparse) return extent.sparse.read(offset, target);
        if (extent.file) return extent.file.read(extent.flatOffsetBytes + offset, target);
        target.fill(0);
        return Promise.resolve();
      }),
    );
  }

  protected async _write(offsetBytes: number, data: Uint8Array): Promise<void> {
    await Promise.all(
      this.#pieces(offsetBytes, data.byteLength).map(({ extent, offset, done, length }) => {
        const source = data.subarray(done, done + length);
        if (extent.access !== "RW" || (!extent.sparse && !extent.file)) {
          throw new BlockError(
            "EPERM",
            `${this.path}: ${extent.access} ${extent.type} extent is not writable`,
          );
        }
        if (extent.sparse) return extent.sparse.write(offset, source);
        return extent.file!.write(extent.flatOffsetBytes + offset, source);
      }),
    );
  }

  protected async _flush(): Promise<void> {
    if (!this.capabilities.canWrite) return;
    // Sparse extents order their metadata after their data; flat files just sync.
    const sparseFiles = new Set(this.sparseExtents.map((e) => e.file));
    await Promise.all([
      ...this.sparseExtents.map((e) => e.flush()),
      ...this.#files.filter((f) => !sparseFiles.has(f)).map((f) => f.flush()),
    ]);
  }

  /** Allocation runs with their host offsets (QEMU's `map` view). */
  async mapRuns(offsetBytes: number, lengthBytes: number): Promise<MappedRun[]> {
    this.checkRange(offsetBytes, lengthBytes);
    const runs: MappedRun[] = [];
    for (const { extent, offset, length } of this.#pieces(offsetBytes, lengthBytes)) {
      const shift = (run: ExtentRun): MappedRun => ({
        ...run,
        offsetBytes: run.offsetBytes + extent.startBytes,
        hostPath: run.hostOffsetBytes === undefined ? undefined : extent.file?.path,
      });
      let pieceRuns: MappedRun[];
      if (extent.sparse) {
        pieceRuns = (await extent.sparse.status(offset, length)).map(shift);
      } else if (extent.file) {
        pieceRuns = (await flatRuns(extent, offset, length)).map(shift);
      } else {
        pieceRuns = [shift({ offsetBytes: offset, lengthBytes: length, kind: "zero" })];
      }
      for (const run of pieceRuns) {
        if (runs[runs.length - 1]?.hostPath === run.hostPath) pushRun(runs, run);
        else runs.push(run);
      }
    }
    return runs;
  }

  protected override async _blockStatus(
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<Extent[]> {
    const extents: Extent[] = [];
    for (const run of await this.mapRuns(offsetBytes, lengthBytes)) {
      const hole = run.kind === "hole";
      const zero = hole || run.kind === "zero" || run.kind === "flat-hole";
      const last = extents[extents.length - 1];
      if (last && last.hole === hole && last.zero === zero) {
        last.lengthBytes += run.lengthBytes;
      } else {
        extents.push({ offsetBytes: run.offsetBytes, lengthBytes: run.lengthBytes, hole, zero });
      }
    }
    return extents;
  }

  /**
   * Makes everything durable, cuts reserved space and marks the extents
   * cleanly closed, then closes the files.
   */
  async close(): Promise<void> {
    try {
      await this._flush();
      for (const extent of this.sparseExtents) {
        if (!extent.writable) continue;
        await extent.trimReserve();
        await extent.markOpen(false);
      }
    } finally {
      for (const file of this.#files) await file.close();
    }
  }
}

// A flat extent's runs: the file's data, and its holes (stored, reading as zeros).
async function flatRuns(extent: ServedExtent, offset: number, length: number) {
  const runs: ExtentRun[] = [];
  const base = extent.flatOffsetBytes;
  let position = offset;
  for (const e of await extent.file!.extents(base + offset, length)) {
    const start = e.offsetBytes - base;
    const kind = e.data ? "data" : "flat-hole";
    pushRun(runs, {
      offsetBytes: start,
      lengthBytes: e.lengthBytes,
      kind,
      hostOffsetBytes: e.offsetBytes,
    });
    position = start + e.lengthBytes;
  }
  if (position < offset + length) {
    // Past the end of the file: reads as zeros.
    const run: ExtentRun = {
      offsetBytes: position,
      lengthBytes: offset + length - position,
      kind: "flat-hole",
    };
    run.hostOffsetBytes = base + position;
    pushRun(runs, run);
  }
  return runs;
}

async function readDescriptorAt(file: ImageFile, offsetBytes: number, lengthBytes: number) {
  const bytes = new Uint8Array(Math.min(lengthBytes, descriptor_bytes_max));
  await file.read(offsetBytes, bytes);
  return parseDescriptor(descriptorText(bytes));
}

/** Everything needed to assemble a driver; files opened so far are closed on failure. */
interface Assembly {
  path: string;
  options: ImageOpenOptions;
  openFile: OpenFile;
  files: ImageFile[];
  /** What recovery did in extents whose last writer died. */
  recovered: string[];
}

/**
 * Before a sparse extent is written: when its last writer died (the
 * header's `uncleanShutdown`), the redundant side is made to match and
 * what that writer allocated and never linked is reclaimed, durably. (The
 * extent marks itself open before its first allocation.)
 */
async function openForWriting(extent: SparseExtent, recovered: string[]): Promise<void> {
  if (!extent.uncleanShutdown) return;
  const findings = new SparseFindings();
  await checkSparse(extent, findings, true);
  if (findings.corruptions.length === 0) await extent.markOpen(false);
  else await extent.flush();
  extent.restartSpace();
  recovered.push(
    ...findings.repaired,
    `${extent.file.path}: recovered after an unclean shutdown` +
      (findings.corruptions.length > 0 ? ` (not cleared: ${findings.corruptions[0]})` : ""),
  );
}

async function openSparseFile(a: Assembly, file: ImageFile): Promise<VmdkDriver> {
  const header = await readSparseHeader(file);
  if (header.capacitySectors === 0 && header.descriptorOffsetSectors !== 0) {
    // A descriptor stored in a sparse header without extent of its own.
    const descriptor = await readDescriptorAt(
      file,
      header.descriptorOffsetSectors * SECTOR_BYTES,
      Math.max(header.descriptorSectors * SECTOR_BYTES, SECTOR_BYTES),
    );
    return await openDescribed(a, descriptor);
  }
  let descriptor: Descriptor | undefined;
  if (header.descriptorOffsetSectors !== 0 && header.descriptorSectors !== 0) {
    descriptor = await readDescriptorAt(
      file,
      header.descriptorOffsetSectors * SECTOR_BYTES,
      header.descriptorSectors * SECTOR_BYTES,
    );
    refuseDeltaLink(descriptor, a.path);
  }
  const sparse = await SparseExtent.open(file);
  if (!a.options.readOnly && sparse.writable) await openForWriting(sparse, a.recovered);
  if (!a.options.readOnly && !sparse.writable) {
    throw new BlockError(
      "EPERM",
      `${a.path}: ${
        sparse.layout.compressed ? "streamOptimized" : "version 3"
      } vmdk images are read-only in blktap; open with read-only`,
    );
  }
  if (sparse.sizeBytes === 0) throw new HeaderError("capacity is zero");
  const createType = sparse.layout.compressed
    ? "streamOptimized"
    : (descriptor?.createType ?? "monolithicSparse");
  const extent: ServedExtent = {
    startBytes: 0,
    sizeBytes: sparse.sizeBytes,
    type: "SPARSE",
    access: "RW",
    file,
    flatOffsetBytes: 0,
    sparse,
  };
  return new VmdkDriver(a.path, [extent], a.files, createType, !a.options.readOnly, descriptor);
}

async function openDescribed(a: Assembly, descriptor: Descriptor): Promise<VmdkDriver> {
  refuseDeltaLink(descriptor, a.path);
  if (UNSUPPORTED_CREATE_TYPES.has(descriptor.createType.toLowerCase())) {
    throw new DescriptorError(`${a.path}: unsupported vmdk createType '${descriptor.createType}'`);
  }
  if (descriptor.extents.length === 0) throw new DescriptorError("descriptor has no extents");
  const extents: ServedExtent[] = [];
  let start = 0;
  for (const line of descriptor.extents) {
    const sizeBytes = line.sizeSectors * SECTOR_BYTES;
    const extent: ServedExtent = {
      startBytes: start,
      sizeBytes,
      type: line.type,
      access: line.access,
      flatOffsetBytes: line.offsetSectors * SECTOR_BYTES,
    };
    if (line.type !== "ZERO") {
      if (line.access === "NOACCESS") throw new DescriptorError(`NOACCESS extent in ${a.path}`);
      const name = line.fileName!;
      const extentPath = resolveStoredName(name, a.path);
      const readOnly = a.options.readOnly || line.access === "RDONLY";
      const file = await a.openFile(extentPath, { ...a.options, readOnly });
      a.files.push(file);
      extent.file = file;
      if (line.type === "SPARSE") {
        if (!hasSparseMagic(await readHead(file, 4))) {
          throw new DescriptorError(`${extentPath}: SPARSE extent is not a KDMV sparse file`);
        }
        extent.sparse = await SparseExtent.open(file, sizeBytes);
        if (!readOnly && extent.sparse.writable) await openForWriting(extent.sparse, a.recovered);
        if (!readOnly && !extent.sparse.writable) {
          throw new BlockError("EPERM", `${extentPath}: read-only sparse extent; open read-only`);
        }
      } else if (line.type !== "FLAT" && line.type !== "VMFS") {
        throw new DescriptorError(`${a.path}: unsupported extent type ${line.type}`);
      }
    }
    extents.push(extent);
    start += sizeBytes;
    if (!Number.isSafeInteger(start)) throw new DescriptorError("extents too large");
  }
  return new VmdkDriver(
    a.path,
    extents,
    a.files,
    descriptor.createType,
    !a.options.readOnly,
    descriptor,
  );
}

async function readHead(file: ImageFile, bytes: number): Promise<Uint8Array> {
  const head = new Uint8Array(Math.min(bytes, file.lengthBytes()));
  await file.read(0, head);
  return head;
}

// Every open error names the image, also when an extent file failed.
function describeError(path: string, error: unknown): Error {
  if (!(error instanceof Error)) return new BlockError("EIO", `${path}: ${String(error)}`);
  const message = error.message.startsWith(path) ? error.message : `${path}: ${error.message}`;
  if (error instanceof DescriptorError && /unsupported/.test(error.message)) {
    return new BlockError("EOPNOTSUPP", message);
  }
  if (error instanceof HeaderError || error instanceof DescriptorError) {
    return new BlockError("EINVAL", message);
  }
  if (message === error.message) return error;
  return new BlockError(error instanceof BlockError ? error.code : "EIO", message);
}

/** Opens a vmdk image (descriptor file or sparse file) for serving. */
export async function openVmdk(
  path: string,
  options: ImageOpenOptions = {},
  openFile: OpenFile = openImageFile,
): Promise<VmdkDriver> {
  const assembly: Assembly = { path, options, openFile, files: [], recovered: [] };
  try {
    const file = await openFile(path, options);
    assembly.files.push(file);
    const head = await readHead(file, 64);
    if (head.byteLength < 4) throw new HeaderError("file is too small for a vmdk image");
    let driver: VmdkDriver;
    if (hasSparseMagic(head)) {
      driver = await openSparseFile(assembly, file);
    } else {
      if (!looksLikeDescriptor(head)) throw new HeaderError("not a vmdk image");
      const descriptor = await readDescriptorAt(file, 0, file.lengthBytes());
      // The descriptor file itself holds no data: release it now.
      assembly.files.splice(assembly.files.indexOf(file), 1);
      await file.close();
      driver = await openDescribed(assembly, descriptor);
    }
    driver.recovered.push(...assembly.recovered);
    return driver;
  } catch (error) {
    for (const file of assembly.files) await file.close().catch(() => {});
    throw describeError(path, error);
  }
}

/** Header facts for `blktap info`. */
export async function vmdkInfo(path: string): Promise<ImageInfo> {
  const driver = await openVmdk(path, { readOnly: true, cache: "writeback" });
  try {
    const sparse = driver.sparseExtents;
    const details: Record<string, string | number | boolean> = {
      createType: driver.createType,
      extents: driver.descriptor?.extents.length ?? 1,
    };
    if (driver.descriptor) {
      details.cid = driver.descriptor.cid;
      details.parentCid = driver.descriptor.parentCid;
    }
    if (sparse.length > 0) {
      details.version = sparse[0].layout.header.version;
      details.compressed = sparse[0].layout.compressed;
      details.redundantGrainDirectory = sparse[0].layout.redundant;
    }
    return {
      format: "vmdk",
      virtualSizeBytes: driver.sizeBytes,
      clusterSizeBytes: sparse[0]?.layout.grainBytes,
      details,
    };
  } finally {
    await driver.close();
  }
}
