/**
 * The `sync` file layer: blocking pread/pwrite through the page cache, as
 * the seed's synchronous driver. Simple and alignment-free; for file
 * systems or devices where libaio is unwanted.
 * @module
 */
import { FdImageFile } from "./fd_image_file.ts";

/** An image file served by blocking system calls. */
export class SyncFile extends FdImageFile {
  read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    this.file.preadFull(buffer, offsetBytes);
    return Promise.resolve();
  }

  write(offsetBytes: number, data: Uint8Array): Promise<void> {
    this.length = Math.max(this.length, offsetBytes + data.byteLength);
    this.file.pwriteAll(data, offsetBytes);
    return Promise.resolve();
  }

  flush(): Promise<void> {
    if (this.writable) this.file.fdatasync();
    return Promise.resolve();
  }
}
