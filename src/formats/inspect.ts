/**
 * What `blktap info` and `blktap check` learn from a format: facts read
 * from its headers, and the result of a structural check. Formats provide
 * them through the optional `info` and `check` hooks of their registry entry.
 * @module
 */

/** Facts about one image file (not its chain). */
export interface ImageInfo {
  /** Registry name (`qcow`, `vmdk`, `aio`...). */
  format: string;
  virtualSizeBytes: number;
  /** Allocation unit of the format, when it has one. */
  clusterSizeBytes?: number;
  /** Backing file name as stored in the image. */
  backingFile?: string;
  /** Backing format when the image says, else probed. */
  backingFormat?: string;
  /** Format-specific details (version, subformat, flags), shown as they are. */
  details?: Record<string, string | number | boolean>;
  /** Internal snapshots (qcow2), as `qemu-img info` lists them. */
  snapshots?: SnapshotInfo[];
}

/** One internal snapshot of an image. */
export interface SnapshotInfo {
  id: string;
  name: string;
  /** Saved VM state (0 when none). */
  vmStateBytes: number;
  /** When it was taken (seconds since the epoch, and nanoseconds). */
  dateSeconds: number;
  dateNanoseconds: number;
  /** Guest time at the snapshot (nanoseconds). */
  vmClockNanoseconds: number;
  /** Virtual size at the snapshot, when recorded. */
  diskSizeBytes?: number;
}

/** Result of a structural check. */
export interface CheckReport {
  /** Problems that make data wrong or unsafe (exit 1); may be cut short, see `corruptionCount`. */
  corruptions: string[];
  /** How many corruptions there are when `corruptions` lists only the first (qemu-img's count). */
  corruptionCount?: number;
  /** Refcounts or tables that could not be read (qemu-img's check-errors): not verified. */
  checkErrors?: number;
  /** Clusters allocated but referenced by nothing (harmless, reported). */
  leakedClusters: number;
  /** Set when the image cannot be checked at all (exit 2). */
  unusable?: string;
  /** What `--repair` fixed. */
  repaired?: string[];
  /** Allocation figures as `qemu-img check` prints them, where the format has clusters. */
  clusterStats?: {
    totalClusters: number;
    allocatedClusters: number;
    fragmentedClusters: number;
    compressedClusters: number;
    imageEndOffsetBytes: number;
  };
}

/** Options of a check. */
export interface CheckOptions {
  /** Fix what can be fixed without risking data (leaks); never guesses. */
  repair: boolean;
}
