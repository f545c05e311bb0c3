/**
 * Allocation at the end of an image file, for formats that never reuse
 * space while open (qcow, vmdk). New clusters, grains and tables are taken
 * from `endBytes` upwards. Space is never reused while the image is open,
 * and what lies past the end when it was opened reads as zeros (a fresh
 * file extension, or reclaimed at open), so a crash can show nothing but
 * zeros or the bytes written there.
 *
 * The file grows in chunks (doubling up to a maximum per mode), each
 * made durable with one fdatasync before anything may point into it:
 * metadata that reaches the disk before the file's new length would point
 * past its end (`check` calls that corrupt). The unused rest of the last
 * chunk is cut at close; after a crash it is a hole that the next
 * read-write open cuts.
 * @module
 */
import type { ImageFile } from "./image_file.ts";
import type { GroupSync } from "./group_commit.ts";

/**
 * Growth steps: the first is the minimum of its mode, each later one
 * doubles up to the maximum. Sparse growth costs no disk space: large
 * steps, few fdatasyncs. Preallocated growth takes disk space until it is
 * used or cut: small steps.
 */
export const sparse_growth_chunk_bytes_min = 64 << 20;
export const sparse_growth_chunk_bytes_max = 1 << 30;
export const preallocated_growth_chunk_bytes_min = 4 << 20;
export const preallocated_growth_chunk_bytes_max = 64 << 20;

/** How the file grows: a sparse extension, or preallocated (fallocate). */
export type GrowthMode = "sparse" | "preallocate";

/** The free space at the end of one image file. */
export class AppendSpace {
  /** When set, the first growth of every file (tests lower it: growth and its barrier happen often). */
  static growthChunkBytesMin: number | undefined;
  readonly #file: ImageFile;
  readonly #sync: GroupSync;
  #mode: GrowthMode;
  #endBytes: number;
  #durableBytes: number;
  #chunkBytes: number;
  #growing: Promise<void> | undefined;

  /**
   * `startBytes`: where allocation begins (at least the file's length).
   * The file's length at open must already be durable.
   */
  constructor(file: ImageFile, sync: GroupSync, startBytes: number, mode: GrowthMode) {
    this.#file = file;
    this.#sync = sync;
    this.#mode = mode;
    this.#endBytes = startBytes;
    this.#durableBytes = file.lengthBytes();
    this.#chunkBytes = AppendSpace.growthChunkBytesMin ??
      (mode === "sparse" ? sparse_growth_chunk_bytes_min : preallocated_growth_chunk_bytes_min);
  }

  /** Where the next allocation goes (before alignment). */
  get endBytes(): number {
    return this.#endBytes;
  }

  /** Takes `lengthBytes` at the end, starting at a multiple of `alignBytes`. */
  take(lengthBytes: number, alignBytes: number): number {
    const offset = Math.ceil(this.#endBytes / alignBytes) * alignBytes;
    this.#endBytes = offset + lengthBytes;
    return offset;
  }

  /** Resolves once the file is durably at least `endBytes` long. */
  async durable(endBytes: number): Promise<void> {
    while (endBytes > this.#durableBytes) {
      this.#growing ??= this.#grow(endBytes).finally(() => (this.#growing = undefined));
      await this.#growing;
    }
  }

  async #grow(endBytes: number): Promise<void> {
    const target = Math.max(endBytes, this.#durableBytes + this.#chunkBytes);
    const max = this.#mode === "sparse"
      ? sparse_growth_chunk_bytes_max
      : preallocated_growth_chunk_bytes_max;
    this.#chunkBytes = Math.min(2 * this.#chunkBytes, max);
    const length = this.#file.lengthBytes();
    if (target > length) await this.#extend(length, target);
    await this.#sync.sync();
    this.#durableBytes = Math.max(this.#durableBytes, target);
  }

  async #extend(from: number, to: number): Promise<void> {
    if (this.#mode === "preallocate") {
      try {
        return await this.#file.allocate(from, to - from);
      } catch {
        this.#mode = "sparse"; // not a regular file, or no fallocate
      }
    }
    await this.#file.truncate(to);
  }

  /** Cuts what the growth reserved past the last allocation (at close). */
  async trim(): Promise<void> {
    await this.#growing?.catch(() => {});
    if (this.#file.lengthBytes() > this.#endBytes) await this.#file.truncate(this.#endBytes);
    this.#durableBytes = Math.min(this.#durableBytes, this.#endBytes);
  }
}
