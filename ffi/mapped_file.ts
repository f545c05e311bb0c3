/**
 * A small file mapped shared between processes (ring devices, stats
 * files): created fresh, private to this user, or opened when it exists
 * with the size the caller expects.
 * @module
 */
import { File } from "./file.ts";
import { NativeMemory } from "./memory.ts";

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

  /** Creates (or replaces) `path` with `sizeBytes` of zeros, mode 0600, and maps it. */
  static create(path: string, sizeBytes: number): MappedFile {
    try {
      Deno.removeSync(path);
    } catch {
      // absent
    }
    const file = File.open(path, { write: true, createNew: true, mode: 0o600 });
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
    const file = File.open(path, { write: true });
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
