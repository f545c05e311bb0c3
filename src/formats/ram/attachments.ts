/**
 * Who is attached to a shared RAM disk, tracked with `flock(2)` so that the
 * kernel does the bookkeeping — a crashed attacher cannot leave a stale
 * count behind, because its locks die with its descriptors.
 *
 * Per disk NAME, in the RAM disk folder (`/dev/shm`, or `$BLKTAP_RAM_DIR`):
 * - `blktap-ram-NAME` — the segment (a tmpfs file, mapped MAP_SHARED);
 * - `blktap-ram-NAME.users` — every attachment holds a *shared* lock on
 *   its own descriptor of this file for as long as it is attached;
 * - `blktap-ram-NAME.lock` — an *exclusive* lock on it serialises attach
 *   and detach (short critical sections only);
 * - `blktap-ram-NAME.persist` — present when the disk must outlive its
 *   last attachment.
 *
 * "Am I the last?" is asked by trying a non-blocking exclusive lock on a
 * fresh descriptor of `.users` after dropping one's own shared lock: it
 * succeeds exactly when no attachment is left. The `.lock` file can be
 * deleted by the last detacher while another process waits on it, so the
 * locker checks after locking that the path still names the inode it
 * locked, and retries otherwise.
 *
 * The folder is shared (`/dev/shm`): every one of these files is a private
 * file (ffi/private_path.ts), created with O_EXCL|O_NOFOLLOW and mode 0600
 * and opened with O_NOFOLLOW, checked to be a regular file of ours with
 * mode 0600. A symbolic link or another user's file where one of them goes
 * is refused, never followed: the disk is shared between processes of one
 * user by name, on purpose, and with nobody else.
 * @module
 */
import { SysError } from "../../../ffi/errno.ts";
import {
  asFsFile,
  createPrivateFile,
  openOrCreatePrivateFile,
  openPrivateFile,
} from "../../../ffi/private_path.ts";

/** What a RAM disk's files are called in refusals. */
export const ram_file_what = "RAM disk file";

/** Folder of the RAM disk files. */
export function ramDirectory(): string {
  return Deno.env.get("BLKTAP_RAM_DIR") ?? "/dev/shm";
}

/** The files of RAM disk `name`. */
export interface RamPaths {
  segment: string;
  users: string;
  lock: string;
  persist: string;
}

/** Paths of RAM disk `name` (already validated). */
export function ramPaths(name: string): RamPaths {
  const base = `${ramDirectory()}/blktap-ram-${name}`;
  return {
    segment: base,
    users: `${base}.users`,
    lock: `${base}.lock`,
    persist: `${base}.persist`,
  };
}

/** Takes the attach/detach mutex of a RAM disk; returns its release function. */
export function lockRamDisk(paths: RamPaths): () => void {
  for (;;) {
    const file = asFsFile(openOrCreatePrivateFile(paths.lock, ram_file_what));
    file.lockSync(true);
    let current: Deno.FileInfo | undefined;
    try {
      current = Deno.lstatSync(paths.lock);
    } catch {
      current = undefined;
    }
    if (current && current.ino === file.statSync().ino) {
      return () => {
        file.unlockSync();
        file.close();
      };
    }
    file.close(); // the last detacher removed it while we waited: lock the new one
  }
}

/** True when no attachment holds `.users` (call with the mutex held). */
export function noAttachments(paths: RamPaths): boolean {
  let probe: Deno.FsFile;
  try {
    probe = asFsFile(openPrivateFile(paths.users, ram_file_what));
  } catch (error) {
    if (error instanceof SysError && error.code === "ENOENT") return true;
    throw error;
  }
  try {
    const free = probe.tryLockSync(true);
    if (free) probe.unlockSync();
    return free;
  } finally {
    probe.close();
  }
}

/** Registers one attachment (call with the mutex held); close the file to detach. */
export function holdAttachment(paths: RamPaths): Deno.FsFile {
  const file = asFsFile(openOrCreatePrivateFile(paths.users, ram_file_what));
  file.lockSync(false);
  return file;
}

/** True when something (a file, or a symbolic link: never followed) is at `path`. */
export function ramFileExists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/** Marks a RAM disk as persistent (call with the mutex held). */
export function markPersistent(paths: RamPaths): void {
  try {
    createPrivateFile(paths.persist, ram_file_what).close();
  } catch (error) {
    if (!(error instanceof SysError && error.code === "EEXIST")) throw error;
    openPrivateFile(paths.persist, ram_file_what).close(); // one of ours, or refused
  }
}

/** Removes a RAM disk's files (call with the mutex held, the lock file last). */
export function removeRamDisk(paths: RamPaths): void {
  for (const path of [paths.segment, paths.users, paths.persist, paths.lock]) {
    try {
      Deno.removeSync(path);
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
  }
}
