/**
 * Messages between ctrl and a disk process over the kick channel (JSON
 * lines; kicks are single bytes). The disk connects to ctrl's disk socket
 * and says hello; ctrl answers with the attach configuration.
 *
 *   disk -> ctrl  {t:"hello", minor, pid}
 *   ctrl -> disk  {t:"attach", ...AttachConfig}
 *   disk -> ctrl  {t:"ready", sizeBytes, capabilities} | {t:"failed", error}
 *   ctrl -> disk  {t:"call", seq, op:"stats"|"pause"|"resume"|"qos", ...}
 *                 (resume may carry {image, probedRaw}: a new image, explicit type)
 *   disk -> ctrl  {t:"reply", seq, ok, error?, ...result}
 * @module
 */
import type { QosSettings } from "./disk_server.ts";

/** Name of ctrl's socket for disk processes, inside the run dir. */
export const DISK_SOCKET_NAME = "disks.sock";

/** What a disk process serves, sent by ctrl on attach. */
export interface AttachConfig {
  minor: number;
  /** The ring device is the kernel module's /dev/blktapN of this minor (else `shmPath`). */
  kernelMinor?: number;
  /** The ring device (shared memory file), when not a kernel one. */
  shmPath: string;
  ringPages: number;
  poolPages: number;
  /** `type:path` (the type always given: a disk process never probes), or `null:SIZE`. */
  image: string;
  /** The format was probed as raw at create: refuse writes that would change that. */
  probedRaw: boolean;
  /** Folders backing files and extents may be in besides the image's own (`--allow-path`). */
  allowPaths: string[];
  readOnly: boolean;
  cache: "none" | "writeback";
  qos: QosSettings;
  /** The minor's stats file (shared memory) to count into; private counters without one. */
  statsPath?: string;
}
