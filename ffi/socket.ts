/**
 * A descriptor of our own for a connection's socket, for what a `Deno.Conn`
 * cannot do: set the send buffer's size, and send a file's bytes with
 * sendfile(2) from another thread, never copied through user memory.
 *
 * It is a duplicate (F_DUPFD_CLOEXEC) of the descriptor Deno owns, so its
 * number stays ours until {@linkcode SocketFd.close}, whatever Deno closes
 * meanwhile; the socket stays open while either is, so the connection's
 * owner must close both.
 * @module
 */
import { check } from "./errno.ts";
import type { File } from "./file.ts";
import { shim } from "./shim.ts";

/** Our own descriptor of one socket. */
export class SocketFd {
  readonly fd: number;
  /** Sends running on another thread: the descriptor stays open until they end. */
  #sending = 0;
  #closing = false;
  #closed = false;

  private constructor(fd: number) {
    this.fd = fd;
  }

  /**
   * Duplicates descriptor `fd` if it is the socket whose inode is `inode`
   * (checked on the duplicate, so a number reused meanwhile is refused);
   * throws otherwise.
   */
  static adopt(fd: number, inode: bigint): SocketFd {
    return new SocketFd(check(shim.shim_dup_socket(fd, inode), "dup socket", `fd ${fd}`));
  }

  /** Asks for a send buffer of `bytes`; returns what the kernel granted. */
  setSendBufferBytes(bytes: number): number {
    this.#assertOpen();
    return check(shim.shim_socket_sndbuf(this.fd, bytes), "setsockopt SO_SNDBUF");
  }

  /**
   * Writes `head` then `lengthBytes` of `file` from `offsetBytes`, on
   * another thread; waits for room at most `waitMs` at a time. Throws if
   * not all was written (some may have been: the connection is then unusable).
   */
  async sendFile(
    head: Uint8Array,
    file: File,
    offsetBytes: number,
    lengthBytes: number,
    waitMs: number,
  ): Promise<void> {
    this.#assertOpen();
    this.#sending += 1;
    try {
      const n = await shim.shim_send_file(
        this.fd,
        head,
        head.byteLength,
        file.fd,
        BigInt(offsetBytes),
        lengthBytes,
        waitMs,
      );
      const sent = check(n, "sendfile", file.path);
      if (sent !== head.byteLength + lengthBytes) throw new Error(`sendfile: short (${sent})`);
    } finally {
      this.#sending -= 1;
      if (this.#closing && this.#sending === 0) this.#close();
    }
  }

  /** Ends the connection both ways now: a send waiting for room returns. */
  cut(): void {
    if (!this.#closed) shim.shim_shutdown(this.fd);
  }

  /** Cuts the connection and closes the descriptor once sends running have ended. */
  close(): void {
    if (this.#closing) return;
    this.#closing = true;
    this.cut();
    if (this.#sending === 0) this.#close();
  }

  #close(): void {
    this.#closed = true;
    shim.shim_close(this.fd);
  }

  #assertOpen(): void {
    if (this.#closing) throw new Error("socket descriptor is closed");
  }
}
