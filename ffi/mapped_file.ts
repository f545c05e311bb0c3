/**
 * A small file mapped shared between processes (ring devices, stats
 * files): created fresh, private to this user, or opened when it exists
 * with the size the caller expects. These files live in shared-memory
 * folders, so they are private files (./private_path.ts): created with
 * O_EXCL|O_NOFOLLOW and mode 0600, opened with O_NOFOLLOW and checked to
 * be a regular file of ours with mode 0600 — a symbolic link or another
 * user's file where one goes is refused, never followed or written.
 * @module
 */
import { SysError } from "./errno.ts";
import type { File } from "./file.ts";
import { NativeMemory } from "./memory.ts";
import { createPrivateFile, openPrivateFile } from "./private_path.ts";

/** A file of `sizeBytes` mapped with MAP_SHARED. */
export class MappedFile {
  readonly path: string;
  /** The whole file (valid until {@linkcode MappedFile.close}). */
  readonly bytes: Uint8Array;
  readonly #memory: NativeMemory;
  readonly #file: File;

  private constructor(path: string, file: File, sizeBytes: number) {
    this.path = path;
    this.#file = file;
    this.#memory = NativeMemory.mapShared(file.fd, sizeBytes, 0, path);
    this.bytes = this.#memory.bytes;
  }

  /**
   * Creates `path` with `sizeBytes` of zeros, mode 0600, and maps it. A
   * stale file of ours there (left by a process that died before recording
   * it) is replaced; anything else is refused, naming `what`.
   */
  static create(path: string, sizeBytes: number, what: string): MappedFile {
    const file = createReplacingOurs(path, what);
    try {
      file.truncate(sizeBytes);
      return new MappedFile(path, file, sizeBytes);
    } catch (error) {
      file.close();
      throw error;
    }
  }

  /** Maps the existing regular file `path`; throws, naming `what`, unless it has `sizeBytes`. */
  static open(path: string, sizeBytes: number, what: string): MappedFile {
    const file = openPrivateFile(path, what);
    try {
      const stat = file.stat();
      if (stat.kind !== "file" || stat.sizeBytes !== sizeBytes) {
        throw new Error(
          `${path}: ${what} is a ${stat.kind} of ${stat.sizeBytes} bytes, expected a file of ${sizeBytes}`,
        );
      }
      return new MappedFile(path, file, sizeBytes);
    } catch (error) {
      file.close();
      throw error;
    }
  }

  /** Unmaps and closes; the file stays. */
  close(): void {
    this.#memory.release();
    this.#file.close();
  }

  /** Removes the file (the mapping stays valid until closed). */
  unlink(): void {
    try {
      Deno.removeSync(this.path);
    } catch {
      // already gone
    }
  }
}

// openPrivateFile refuses what is not ours before anything is removed.
function createReplacingOurs(path: string, what: string): File {
  try {
    return createPrivateFile(path, what);
  } catch (error) {
    if (!(error instanceof SysError && error.code === "EEXIST")) throw error;
  }
  openPrivateFile(path, what).close();
  Deno.removeSync(path);
  return createPrivateFile(path, what);
}
