/**
 * Reads and large writes ctrl answers in the page cache of a raw image, so
 * they do not cross the ring: two processes and four wakeups for a copy the
 * kernel can make in place (nbdkit's file plugin answers such a read with
 * one `pread`, such a write with one `pwrite`).
 *
 * Only where the disk's bytes are the file's bytes at the same offsets and
 * the disk process reads and writes them through the page cache (a raw
 * image without O_DIRECT): then every write it answered is in the page
 * cache, and a discard it answered dropped the pages. Its `ready` message
 * names the descriptor ({@linkcode ServedDisk.pageCacheFd}); ctrl opens that
 * very file through `/proc/PID/fd/N` of the child it started (read-write
 * only for a writable minor) and keeps it only if it is the image the
 * minor's record names. Reads use RWF_NOWAIT: what is not cached goes over
 * the ring as before, so ctrl never waits for a device.
 *
 * A large write is copied into the page cache on another thread
 * ({@linkcode PageCache.writeBeside}; ext4 has no non-blocking buffered
 * write, and one may wait for writeback). It is the disk's write as much as
 * one the disk process made: the disk process's flush (fdatasync of the
 * same file) makes it durable, and a SIGKILLed disk process cannot lose it.
 *
 * A large read may instead be sent from the file to the client's socket
 * with sendfile ({@linkcode PageCache.lease}): the bytes never pass
 * through ctrl's memory. They are read when sent, not when the read was
 * answered: like any read, it may see a write that overlaps it in time.
 * @module
 */
import { File } from "../../ffi/file.ts";
import type { CachedSpan, Extent } from "../formats/driver.ts";
import { asDiskExtents } from "../formats/raw/raw.ts";

/** The page cache of one raw image: reads that never wait, writes beside the event loop. */
export class PageCache {
  /** Opened for writing: large writes may go here too ({@linkcode writeBeside}). */
  readonly writable: boolean;
  readonly #file: File;
  readonly #isBlockDevice: boolean;
  /** Reads and writes running on another thread: the descriptor stays open (its number unused) until they end. */
  #beside = 0;
  #closing = false;
  /** cachestat(2) failed (a kernel before 6.5): no leases. */
  #noLeases = false;

  private constructor(file: File, isBlockDevice: boolean, writable: boolean) {
    this.#file = file;
    this.writable = writable;
    this.#isBlockDevice = isBlockDevice;
  }

  /**
   * Opens `servedPath` (the disk process's descriptor, `/proc/PID/fd/N`),
   * read-write only when `writable`; throws unless it is the same file as `imagePath` (the
   * disk process is less trusted than ctrl: it parses guest data).
   */
  static open(servedPath: string, imagePath: string, writable = false): PageCache {
    const file = File.open(servedPath, { write: writable });
    let isBlockDevice: boolean;
    try {
      const opened = Deno.statSync(`/proc/self/fd/${file.fd}`);
      const image = Deno.statSync(imagePath);
      if (opened.dev !== image.dev || opened.ino !== image.ino) {
        throw new Error(`${servedPath} is not ${imagePath}`);
      }
      if (!opened.isFile && !opened.isBlockDevice) {
        throw new Error(`${imagePath} is not a file or block device`);
      }
      isBlockDevice = opened.isBlockDevice === true;
    } catch (error) {
      file.close();
      throw error;
    }
    return new PageCache(file, isBlockDevice, writable);
  }

  /**
   * Fills `buffer` from `offsetBytes` if all of it is cached; false (its
   * contents unspecified) otherwise. Throws on an I/O error.
   */
  read(offsetBytes: number, buffer: Uint8Array): boolean {
    return this.#file.preadCached(buffer, offsetBytes) === buffer.byteLength;
  }

  /**
   * {@linkcode read} on another thread, so the copy of a large read runs
   * beside the event loop (which copies the previous one into the socket).
   */
  async readBeside(offsetBytes: number, buffer: Uint8Array): Promise<boolean> {
    return await this.#runBeside(() => this.#file.preadCachedBeside(buffer, offsetBytes)) ===
      buffer.byteLength;
  }

  /**
   * Writes all of `data` at `offsetBytes` into the page cache, on another
   * thread (a page-cache write may wait for writeback). Throws on an error.
   */
  writeBeside(offsetBytes: number, data: Uint8Array): Promise<void> {
    return this.#runBeside(() => this.#file.pwriteAllBeside(data, offsetBytes));
  }

  // Keeps the descriptor open while `work` runs on another thread.
  async #runBeside<T>(work: () => Promise<T>): Promise<T> {
    this.#beside += 1;
    try {
      return await work();
    } finally {
      this.#beside -= 1;
      if (this.#closing && this.#beside === 0) this.#file.close();
    }
  }

  /**
   * A lease on `lengthBytes` at `offsetBytes` if all of it is cached now,
   * for sending straight from the file; the file stays open until the
   * lease is sent or dropped. A lease not yet sent when this closes is
   * refused then ({@linkcode CachedSpan.send} returns false).
   */
  lease(offsetBytes: number, lengthBytes: number): CachedSpan | undefined {
    if (this.#closing || this.#noLeases || this.#isBlockDevice) return undefined;
    try {
      if (!this.#file.allCached(offsetBytes, lengthBytes)) return undefined;
    } catch {
      this.#noLeases = true;
      return undefined;
    }
    this.#beside += 1;
    let ended = false;
    const end = () => {
      if (ended) return;
      ended = true;
      this.#beside -= 1;
      if (this.#closing && this.#beside === 0) this.#file.close();
    };
    return {
      lengthBytes,
      send: async (socket, head, waitMs) => {
        try {
          if (this.#closing) return false;
          await socket.sendFile(head, this.#file, offsetBytes, lengthBytes, waitMs);
          return true;
        } finally {
          end();
        }
      },
      drop: end,
    };
  }

  /**
   * The disk's extents in the range, as its raw driver reports them (the
   * file's data and holes; a block device is all data).
   */
  blockStatus(offsetBytes: number, lengthBytes: number): Extent[] {
    if (this.#isBlockDevice) return [{ offsetBytes, lengthBytes, hole: false, zero: false }];
    return asDiskExtents(this.#file.runs(offsetBytes, offsetBytes + lengthBytes));
  }

  /** Closes the file once reads running beside have ended; no read may start after. */
  close(): void {
    this.#closing = true;
    if (this.#beside === 0) this.#file.close();
  }
}
