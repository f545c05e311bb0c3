/**
 * A minor's counters in a small shared-memory file, so they outlive the
 * disk process that counts them: ctrl creates the file in its private
 * shared-memory directory beside the ring device, the disk process maps it
 * and counts there directly ({@linkcode DiskCounters} over the mapping), and
 * when that process dies — SIGKILL included, when it cannot report — ctrl
 * still reads what it counted and folds it into the totals since create
 * before the next process starts. Nothing here depends on how requests
 * arrive (NBD through ctrl's ring, or a kernel ring device).
 *
 * Layout (host byte order, one 4 KiB page):
 *
 *   0  u32  magic "BKST"          4  u32  layout version (1)
 *   8  f64  generation: which disk process the counters belong to; ctrl
 *           sets it when it zeroes them for a new process
 *  16  f64  pid of the disk process (written by it when it attaches)
 *  24  f64  when ctrl zeroed the counters (ms since the epoch)
 *  32  f64 × counter_cells: the counters (see counters.ts)
 * @module
 */
import { MappedFile } from "../../ffi/mapped_file.ts";
import { counter_cells, DiskCounters } from "./counters.ts";

/** Size of a stats file. */
export const stats_file_bytes = 4096;
const stats_magic = 0x54534b42; // "BKST" little-endian
const stats_version = 1;
const header_bytes = 32;

/** The stats file of a minor whose ring device is `ringDevicePath`. */
export function statsPathFor(ringDevicePath: string): string {
  return `${ringDevicePath}.stats`;
}

/** A mapped stats file. */
export class StatsFile {
  readonly path: string;
  /** Counting into the file. */
  readonly counters: DiskCounters;
  readonly #mapped: MappedFile;
  readonly #header: Float64Array;
  readonly #words: Uint32Array;

  private constructor(mapped: MappedFile) {
    this.path = mapped.path;
    this.#mapped = mapped;
    const { buffer, byteOffset } = mapped.bytes;
    this.#words = new Uint32Array(buffer, byteOffset, 2);
    this.#header = new Float64Array(buffer, byteOffset, header_bytes / 8);
    this.counters = new DiskCounters(
      new Float64Array(buffer, byteOffset + header_bytes, counter_cells),
    );
  }

  /** Creates (or replaces) the file, private to this user, with zero counters of `generation`. */
  static create(path: string, generation: number): StatsFile {
    const stats = new StatsFile(MappedFile.create(path, stats_file_bytes, "stats file"));
    stats.#words[0] = stats_magic;
    stats.#words[1] = stats_version;
    stats.reset(generation);
    return stats;
  }

  /** Maps an existing stats file; throws unless it is one (size, magic, version). */
  static open(path: string): StatsFile {
    const stats = new StatsFile(MappedFile.open(path, stats_file_bytes, "stats file"));
    if (stats.#words[0] !== stats_magic || stats.#words[1] !== stats_version) {
      stats.close();
      throw new Error(`${path}: not a stats file (magic or version)`);
    }
    return stats;
  }

  /** Opens the file at `path`, or creates it with `generation` when it is missing or not one. */
  static openOrCreate(path: string, generation: number): StatsFile {
    try {
      return StatsFile.open(path);
    } catch {
      return StatsFile.create(path, generation);
    }
  }

  /** Which disk process the counters belong to (ctrl's numbering). */
  get generation(): number {
    return this.#header[1];
  }

  /** The disk process counting here (0 before one attached). */
  get pid(): number {
    return this.#header[2];
  }

  set pid(pid: number) {
    this.#header[2] = pid;
  }

  /** When the counters were zeroed for their process (ms since the epoch). */
  get sinceMs(): number {
    return this.#header[3];
  }

  /** Zeroes the counters for a new disk process numbered `generation`. */
  reset(generation: number): void {
    this.counters.reset();
    this.#header[2] = 0;
    this.#header[3] = Date.now();
    this.#header[1] = generation;
  }

  /** Unmaps and closes; the file stays. */
  close(): void {
    this.#mapped.close();
  }

  /** Removes the file (mappings stay valid until closed). */
  unlink(): void {
    this.#mapped.unlink();
  }
}
