/**
 * Open file description byte-range locks (`fcntl` F_OFD_SETLK/F_OFD_GETLK),
 * the kind QEMU locks images with. They belong to the open file, not to
 * the process: two descriptors opened separately conflict even inside one
 * process, and closing the descriptor releases them (also when the
 * process is killed). The QEMU permission protocol on top of them is in
 * `src/formats/raw/image_lock.ts`.
 * @module
 */
import { check, SysError } from "./errno.ts";
import type { File } from "./file.ts";
import { shim } from "./shim.ts";

const F_RDLCK = 0;
const F_WRLCK = 1;
const F_UNLCK = 2;
const OP_SETLK = 0;
const OP_GETLK = 1;
const EACCES = 13;
const EAGAIN = 11;

/** A shared (read) lock, an exclusive (write) lock, or none. */
export type OfdLockType = "read" | "write" | "unlock";

const TYPES: Record<OfdLockType, number> = { read: F_RDLCK, write: F_WRLCK, unlock: F_UNLCK };

/**
 * Takes (or drops, with `unlock`) a lock on `[startBytes, startBytes +
 * lengthBytes)` of `file` without waiting. Returns false when another open
 * file holds a conflicting lock; other failures throw {@linkcode SysError}.
 */
export function ofdSetLock(
  file: File,
  type: OfdLockType,
  startBytes: number,
  lengthBytes: number,
): boolean {
  const result = Number(
    shim.shim_ofd_lock(file.fd, OP_SETLK, TYPES[type], BigInt(startBytes), BigInt(lengthBytes)),
  );
  if (result === -EAGAIN || result === -EACCES) return false;
  check(result, "fcntl(F_OFD_SETLK)", file.path);
  return true;
}

/**
 * True when `file` could take a `type` lock on the range now, i.e. no other
 * open file holds a conflicting one (this file's own locks never conflict).
 */
export function ofdCanLock(
  file: File,
  type: Exclude<OfdLockType, "unlock">,
  startBytes: number,
  lengthBytes: number,
): boolean {
  const result = check(
    shim.shim_ofd_lock(file.fd, OP_GETLK, TYPES[type], BigInt(startBytes), BigInt(lengthBytes)),
    "fcntl(F_OFD_GETLK)",
    file.path,
  );
  return result === F_UNLCK;
}

export { SysError };
