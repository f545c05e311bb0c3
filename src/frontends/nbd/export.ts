/**
 * What the NBD server serves: named exports, each a {@linkcode BlockDriver}
 * (a ring front end inside `blktap ctrl`, or a driver opened in-process by
 * `blktap serve` and the tests), and the transmission flags it advertises.
 * @module
 */
import type { BlockDriver } from "../../formats/driver.ts";
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from "./protocol.ts";

/** One export, found by name. */
export interface NbdExport {
  /** As given in NBD_OPT_GO / NBD_OPT_EXPORT_NAME ("" is the default export). */
  name: string;
  /** Shown by `nbdinfo --list` (NBD_INFO_DESCRIPTION). */
  description?: string;
  driver: BlockDriver;
  /** Refuse writes with EPERM even when the driver could write. */
  readOnly: boolean;
}

/** True when the export takes no writes (by configuration or by its driver). */
export function isReadOnly(nbdExport: NbdExport): boolean {
  return nbdExport.readOnly || !nbdExport.driver.capabilities.canWrite;
}

/**
 * The transmission flags of an export: what its driver does, read from
 * its capabilities, and nothing more. FLUSH (and FUA, a flush after the
 * write) when flush makes writes durable; on a writable export
 * WRITE_ZEROES always (written as zeros where nothing faster exists), TRIM
 * when discard deallocates, FAST_ZERO when zeroing writes no data; DF only
 * with structured replies (proto.md requires it clear otherwise);
 * multi-conn when one connection's flush covers every connection's writes.
 * CACHE is never advertised: no driver has a cache a hint could warm.
 */
export function transmissionFlags(nbdExport: NbdExport, structuredReplies: boolean): number {
  const caps = nbdExport.driver.capabilities;
  let flags = NBD_FLAG_HAS_FLAGS;
  if (caps.canFlush) flags |= NBD_FLAG_SEND_FLUSH;
  if (isReadOnly(nbdExport)) {
    flags |= NBD_FLAG_READ_ONLY;
  } else {
    flags |= NBD_FLAG_SEND_WRITE_ZEROES;
    if (caps.canFlush) flags |= NBD_FLAG_SEND_FUA;
    if (caps.canDiscard) flags |= NBD_FLAG_SEND_TRIM;
    if (caps.canZero) flags |= NBD_FLAG_SEND_FAST_ZERO;
  }
  if (structuredReplies) flags |= NBD_FLAG_SEND_DF;
  if (caps.canMultiConn) flags |= NBD_FLAG_CAN_MULTI_CONN;
  return flags;
}
