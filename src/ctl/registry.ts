/**
 * ctrl's state registry: the disks it serves, as JSON in the run dir,
 * replaced atomically (write a temporary file, fsync, rename) so a crash
 * leaves either the old or the new registry, never a torn one. A new ctrl
 * reads it to re-attach every disk.
 * @module
 */
import type { QosSettings } from "../disk/disk_server.ts";
import type { CounterTotals } from "../disk/counters.ts";

/**
 * A minor's history across disk-process restarts and ctrl restarts: the
 * counts of every disk process that is gone (the stats file holds the
 * current one's), and how many times one was restarted.
 */
export interface MinorLifetime {
  /** Disk processes restarted after dying (crashed or killed), since create. */
  restarts: number;
  /** Counts of the disk processes already folded in. */
  folded: CounterTotals;
  /** Generation of the last process folded in: a stats file still at it is counted already. */
  foldedGeneration: number;
}

/** One disk as ctrl remembers it. */
export interface MinorRecord {
  minor: number;
  /** Export name (`--name`, default `tapN`). */
  name: string;
  /**
   * `type:path` currently served, the path absolute. The format is decided
   * once, at create (probed when the user named none) and never probed
   * again. A bare path here comes from an older blktap: see `Ctrl`'s
   * re-attach.
   */
  image: string;
  /** The format was probed as raw: writes that would change that are refused. */
  probedRaw?: boolean;
  /** `--allow-path` folders given at create (ctrl's own are added when opening). */
  allowPaths?: string[];
  readOnly: boolean;
  cache: "none" | "writeback";
  qos: QosSettings;
  /**
   * A kernel minor: the module's minor (/dev/blktapN, /dev/tapdevN); `shmPath`
   * then only names its stats file.
   */
  kernelMinor?: number;
  shmPath: string;
  ringPages: number;
  poolPages: number;
  /** Guest-visible size once a disk process reported it. */
  sizeBytes: number;
  /** Paused by the user (a re-attached disk is paused again). */
  paused: boolean;
  /** Pid of the disk process last started, for a new ctrl to clean up. */
  pid?: number;
  /** The stats file the disk process counts into (absent in older registries: derived). */
  statsPath?: string;
  /** Totals since create (absent in older registries: from zero). */
  lifetime?: MinorLifetime;
}

/** The registry file's content. */
export interface RegistryData {
  version: 1;
  /** Random token naming this run dir's shared-memory files. */
  instance: string;
  minors: MinorRecord[];
}

/** Reads the registry; a missing file is an empty registry. */
export function loadRegistry(path: string): RegistryData | undefined {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
  const data = JSON.parse(text) as RegistryData;
  if (data.version !== 1 || !Array.isArray(data.minors)) {
    throw new Error(`${path}: not a blktap registry`);
  }
  return data;
}

/** Replaces the registry atomically. */
export function saveRegistry(path: string, data: RegistryData): void {
  const partial = `${path}.${Deno.pid}.tmp`;
  const file = Deno.openSync(partial, { write: true, create: true, truncate: true, mode: 0o600 });
  try {
    const bytes = new TextEncoder().encode(JSON.stringify(data, null, 2) + "\n");
    for (let done = 0; done < bytes.length;) done += file.writeSync(bytes.subarray(done));
    file.syncSync();
  } finally {
    file.close();
  }
  Deno.renameSync(partial, path);
}
