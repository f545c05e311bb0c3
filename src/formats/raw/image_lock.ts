/**
 * Image locking as QEMU does it (`block/file-posix.c`, raw_apply_lock_bytes
 * and raw_check_lock_bytes), so that blktap and QEMU never write one image
 * at once and each refuses what the other holds.
 *
 * QEMU names four permissions (bit i): consistent read (0), write (1),
 * write unchanged (2), resize (3). An opener holds a shared OFD lock on
 * byte `100 + i` for each permission it has, and on byte `200 + i` for each
 * permission it does not let others have. Then it checks: nobody may hold
 * `200 + i` for a permission it has, nor `100 + i` for one it does not
 * share. The locks live as long as the file is open.
 *
 * blktap takes what a QEMU guest device over a format driver takes:
 * - `write` (an image served or written read-write): has consistent read,
 *   write and resize; shares consistent read and write unchanged;
 * - `read` (served read-only, a backing file, a read-only extent): has
 *   consistent read; shares consistent read and write unchanged.
 *
 * So a reader and a writer exclude each other, readers share, and readers
 * that do not care (`qemu-img info -U`, blktap's `info`) take no lock.
 * @module
 */
import type { File } from "../../../ffi/file.ts";
import { ofdCanLock, ofdSetLock } from "../../../ffi/ofd_lock.ts";
import { BlockError } from "../driver.ts";

/** Byte of the first "permission held" lock (QEMU's RAW_LOCK_PERM_BASE). */
export const lock_perm_base_bytes = 100;
/** Byte of the first "permission not shared" lock (QEMU's RAW_LOCK_SHARED_BASE). */
export const lock_shared_base_bytes = 200;

/** QEMU's permission names, by bit (bdrv_perm_names). */
export const QEMU_PERMISSIONS = ["consistent read", "write", "write unchanged", "resize"] as const;

const CONSISTENT_READ = 1 << 0;
const WRITE = 1 << 1;
const WRITE_UNCHANGED = 1 << 2;
const RESIZE = 1 << 3;
const ALL = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;

/** How an image is held: `write` (read-write) or `read` (read-only). */
export type ImageLockMode = "read" | "write";

const PERMISSIONS: Record<ImageLockMode, { held: number; shared: number }> = {
  write: { held: CONSISTENT_READ | WRITE | RESIZE, shared: CONSISTENT_READ | WRITE_UNCHANGED },
  read: { held: CONSISTENT_READ, shared: CONSISTENT_READ | WRITE_UNCHANGED },
};

function bits(mask: number): number[] {
  return QEMU_PERMISSIONS.map((_, i) => i).filter((i) => (mask & (1 << i)) !== 0);
}

/**
 * Takes QEMU's locks on `file` for `mode`, or throws a {@linkcode BlockError}
 * (EPERM) naming the image and the permission another process holds, in
 * QEMU's words. On failure every lock taken is dropped again.
 */
export function lockImage(file: File, mode: ImageLockMode): void {
  const { held, shared } = PERMISSIONS[mode];
  const bytes = [
    ...bits(held).map((i) => lock_perm_base_bytes + i),
    ...bits(ALL & ~shared).map((i) => lock_shared_base_bytes + i),
  ];
  try {
    for (const byte of bytes) {
      if (!ofdSetLock(file, "read", byte, 1)) refuse(file, `Failed to lock byte ${byte}`);
    }
    // As raw_check_lock_bytes: would anybody else's lock stop a write lock here?
    for (const i of bits(held)) {
      if (!ofdCanLock(file, "write", lock_shared_base_bytes + i, 1)) {
        refuse(file, `Failed to get "${QEMU_PERMISSIONS[i]}" lock`);
      }
    }
    for (const i of bits(ALL & ~shared)) {
      if (!ofdCanLock(file, "write", lock_perm_base_bytes + i, 1)) {
        refuse(file, `Failed to get shared "${QEMU_PERMISSIONS[i]}" lock`);
      }
    }
  } catch (error) {
    for (const byte of bytes) ofdSetLock(file, "unlock", byte, 1);
    throw error;
  }
}

/**
 * Drops every lock {@linkcode lockImage} may have taken on `file`. Called
 * before the descriptor is closed: the kernel may release the file itself
 * later (a deferred fput after the last aio completion), and a lock that
 * outlives the close would refuse the next opener.
 */
export function unlockImage(file: File): void {
  const end = lock_shared_base_bytes + QEMU_PERMISSIONS.length;
  ofdSetLock(file, "unlock", lock_perm_base_bytes, end - lock_perm_base_bytes);
}

/**
 * How long {@linkcode lockImageWaiting} waits for a conflicting lock to go
 * away before refusing. Locks outlive their holder briefly: a SIGKILLed
 * disk process's file is released by the kernel's deferred fput after its
 * last aio completes (a restarted disk process must not fail on that), and
 * a descriptor copied into a child forked by the same process lives until
 * that child's exec.
 */
export const lock_conflict_wait_ms = 1000;
const lock_retry_ms = 20;

/** {@linkcode lockImage}, retried while a conflict may be one that is going away. */
export async function lockImageWaiting(file: File, mode: ImageLockMode): Promise<void> {
  for (let waited = 0;; waited += lock_retry_ms) {
    try {
      lockImage(file, mode);
      return;
    } catch (error) {
      if (!(error instanceof BlockError) || waited >= lock_conflict_wait_ms) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, lock_retry_ms));
  }
}

function refuse(file: File, what: string): never {
  throw new BlockError(
    "EPERM",
    `${file.path}: ${what}: the image is in use by another process (QEMU, qemu-nbd or another blktap)`,
  );
}
