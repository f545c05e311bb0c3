/**
 * Creates monolithicSparse images laid out as QEMU lays them out: header,
 * embedded descriptor (sectors 1..20), redundant grain directory and its
 * grain tables, grain directory and its grain tables, grains from the
 * grain-aligned end of that metadata. All grain tables are preallocated,
 * so serving the image never has to allocate one.
 * @module
 */
import { File } from "../../../ffi/file.ts";
import { formatDescriptor } from "./descriptor.ts";
import {
  encodeSparseHeader,
  FLAG_NL_DETECT,
  FLAG_REDUNDANT_GRAIN_TABLE,
  grain_directory_entries_max,
  grain_sectors_max,
  SECTOR_BYTES,
  type SparseHeader,
} from "./sparse_header.ts";

/** Options of {@linkcode createVmdk}. */
export interface CreateVmdkOptions {
  /** Grain size (default 64 KiB, a power of two of at least 4 KiB). */
  grainBytes?: number;
  /**
   * Reserve every grain table now (default, as QEMU does), or leave the
   * directories empty and let writes allocate tables as they need them.
   */
  preallocateTables?: boolean;
}

const default_grain_bytes = 64 * 1024;
const grain_table_entries = 512;
const descriptor_offset_sectors = 1;
const descriptor_sectors = 20;

function basename(path: string): string {
  return path.slice(path.lastIndexOf("/") + 1);
}

function randomCid(): string {
  const bytes = crypto.getRandomValues(new Uint32Array(1));
  return (bytes[0] || 1).toString(16).padStart(8, "0");
}

function tableBytes(entries: number[]): Uint8Array {
  const bytes = new Uint8Array(Math.ceil((entries.length * 4) / SECTOR_BYTES) * SECTOR_BYTES);
  const view = new DataView(bytes.buffer);
  entries.forEach((entry, i) => view.setUint32(i * 4, entry, true));
  return bytes;
}

/**
 * Creates a new monolithicSparse image of `sizeBytes` (a multiple of 512)
 * at `path`; fails if the file exists.
 */
export function createVmdk(path: string, sizeBytes: number, options: CreateVmdkOptions = {}) {
  const grainBytes = options.grainBytes ?? default_grain_bytes;
  const grainSectors = grainBytes / SECTOR_BYTES;
  if (
    !Number.isInteger(grainSectors) || grainSectors < 8 || grainSectors > grain_sectors_max ||
    (grainSectors & (grainSectors - 1)) !== 0
  ) {
    throw new Error(`${path}: invalid grain size ${grainBytes}`);
  }
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % SECTOR_BYTES !== 0) {
    throw new Error(`${path}: vmdk size must be a positive multiple of 512 bytes`);
  }
  const capacitySectors = sizeBytes / SECTOR_BYTES;
  const grains = Math.ceil(capacitySectors / grainSectors);
  const tableCount = Math.ceil(grains / grain_table_entries);
  if (tableCount > grain_directory_entries_max) throw new Error(`${path}: image too large`);
  const preallocate = options.preallocateTables ?? true;
  const tableSectors = preallocate ? (grain_table_entries * 4) / SECTOR_BYTES : 0;
  const directorySectors = Math.ceil((tableCount * 4) / SECTOR_BYTES);
  const redundantOffset = descriptor_offset_sectors + descriptor_sectors;
  const directoryOffset = redundantOffset + directorySectors + tableSectors * tableCount;
  const metadataEnd = directoryOffset + directorySectors + tableSectors * tableCount;
  if (metadataEnd > 0xffffffff) throw new Error(`${path}: image too large`);
  const header: SparseHeader = {
    version: 1,
    flags: FLAG_NL_DETECT | FLAG_REDUNDANT_GRAIN_TABLE,
    capacitySectors,
    grainSectors,
    descriptorOffsetSectors: descriptor_offset_sectors,
    descriptorSectors: descriptor_sectors,
    grainTableEntries: grain_table_entries,
    redundantDirectoryOffsetSectors: redundantOffset,
    directoryOffsetSectors: directoryOffset,
    overheadSectors: Math.ceil(metadataEnd / grainSectors) * grainSectors,
    uncleanShutdown: false,
    compressAlgorithm: 0,
  };
  const descriptor = new TextEncoder().encode(formatDescriptor({
    cid: randomCid(),
    createType: "monolithicSparse",
    capacitySectors,
    extents: [{
      access: "RW",
      sizeSectors: capacitySectors,
      type: "SPARSE",
      fileName: basename(path),
      offsetSectors: 0,
    }],
  }));
  if (descriptor.byteLength > descriptor_sectors * SECTOR_BYTES) {
    throw new Error(`${path}: file name too long for the embedded descriptor`);
  }
  const tablesAt = (first: number) =>
    Array.from(
      { length: tableCount },
      (_, i) => preallocate ? first + directorySectors + i * tableSectors : 0,
    );
  const file = File.open(path, { write: true, createNew: true });
  try {
    file.pwriteAll(encodeSparseHeader(header), 0);
    file.pwriteAll(descriptor, descriptor_offset_sectors * SECTOR_BYTES);
    file.pwriteAll(tableBytes(tablesAt(redundantOffset)), redundantOffset * SECTOR_BYTES);
    file.pwriteAll(tableBytes(tablesAt(directoryOffset)), directoryOffset * SECTOR_BYTES);
    // Grain tables are zeros: a hole reads as zeros, so extending the file writes them.
    file.truncate(header.overheadSectors * SECTOR_BYTES);
    file.fdatasync();
  } catch (error) {
    file.close();
    Deno.removeSync(path);
    throw error;
  }
  file.close();
}
