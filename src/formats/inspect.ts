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
}

/** Result of a structural check. */
export interface CheckReport {
  /** Problems that make data wrong or unsafe (exit 1). */
  corruptions: string[];
  /** Clusters allocated but referenced by nothing (harmless, reported). */
  leakedClusters: number;
  /** Set when the image cannot be checked at all (exit 2). */
  unusable?: string;
  /** What `--repair` fixed. */
  repaired?: string[];
}

/** Options of a check. */
export interface CheckOptions {
  /** Fix what can be fixed without risking data (leaks); never guesses. */
  repair: boolean;
}
