/**
 * The parts of an {@linkcode ImageFile} that are plain system calls on a
 * descriptor (length, holes, preallocation, `du`), shared by the `aio` and
 * `sync` file layers, which differ only in how they read, write and flush.
 * @module
 */
import { unlockImage } from "./image_lock.ts";
import { File } from "../../../ffi/file.ts";
import { SysError } from "../../../ffi/errno.ts";
import type { FileExtent, ImageFile } from "../image_file.ts";

/** Base of descriptor-backed image files. */
export abstract class FdImageFile implements ImageFile {
  protected readonly file: File;
  readonly writable: boolean;
  /** Logical length: the largest end of any write issued, or the length at open. */
  protected length: number;
  /** Block device: no holes, no truncation; discard is a no-op. */
  protected readonly isBlockDevice: boolean;

  constructor(file: File, writable: boolean) {
    this.file = file;
    this.writable = writable;
    const { sizeBytes, kind } = file.stat();
    this.length = sizeBytes;
    this.isBlockDevice = kind === "block-device";
  }

  get path(): string {
    return this.file.path;
  }

  get canPunchHoles(): boolean {
    return !this.isBlockDevice;
  }

  lengthBytes(): number {
    return this.length;
  }

  get pageCacheFd(): number | undefined {
    return this.file.direct ? undefined : this.file.fd;
  }

  abstract read(offsetBytes: number, buffer: Uint8Array): Promise<void>;
  abstract write(offsetBytes: number, data: Uint8Array): Promise<void>;
  abstract flush(): Promise<void>;

  truncate(lengthBytes: number): Promise<void> {
    this.file.truncate(lengthBytes);
    this.length = lengthBytes;
    return Promise.resolve();
  }

  punchHole(offsetBytes: number, lengthBytes: number): Promise<void> {
    if (this.isBlockDevice) return Promise.resolve();
    this.file.punchHole(offsetBytes, lengthBytes);
    return Promise.resolve();
  }

  allocate(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.file.allocate(offsetBytes, lengthBytes);
    this.length = Math.max(this.length, offsetBytes + lengthBytes);
    return Promise.resolve();
  }

  /** Zeroes a range keeping it allocated; false where the file system cannot. */
  zeroRange(offsetBytes: number, lengthBytes: number): boolean {
    try {
      this.file.zeroRange(offsetBytes, lengthBytes);
      return true;
    } catch (error) {
      if (error instanceof SysError && (error.code === "EOPNOTSUPP" || error.code === "EINVAL")) {
        return false;
      }
      throw error;
    }
  }

  extents(offsetBytes: number, lengthBytes: number): Promise<FileExtent[]> {
    const end = Math.min(offsetBytes + lengthBytes, this.length);
    if (this.isBlockDevice) {
      return Promise.resolve(
        end > offsetBytes ? [{ offsetBytes, lengthBytes: end - offsetBytes, data: true }] : [],
      );
    }
    return Promise.resolve(this.file.runs(offsetBytes, end));
  }

  allocatedBytes(): number {
    return this.file.allocatedBytes();
  }

  close(): Promise<void> {
    unlockImage(this.file);
    this.file.close();
    return Promise.resolve();
  }
}
