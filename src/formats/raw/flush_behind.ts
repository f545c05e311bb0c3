/**
 * Flush-behind for a file a tool writes through and flushes once at the
 * end (img2qcow, convert): once enough has been written since the last, a
 * background fdatasync starts (one at a time), so the disk — and the
 * hypervisor's cache beneath a virtual disk, which every flush must drain —
 * works during the copy instead of all in the final flush. On the bench
 * machine that final flush (or qemu-img's `sync`) is about half of a 2 GiB
 * conversion. Durability is unchanged: only the caller's final flush
 * vouches for the data; a background failure is reported by it.
 * @module
 */

/** Starts background flushes as writes add up; {@linkcode settle} before the real flush. */
export class FlushBehind {
  readonly #sync: () => Promise<void>;
  readonly #thresholdBytes: number;
  #unflushedBytes = 0;
  #running: Promise<void> | undefined;
  #error: unknown;
  #failed = false;

  /** `sync` is the file's fdatasync; one starts per `thresholdBytes` written. */
  constructor(sync: () => Promise<void>, thresholdBytes: number) {
    this.#sync = sync;
    this.#thresholdBytes = thresholdBytes;
  }

  /** Counts `bytes` written (completed); may start a background flush. */
  wrote(bytes: number): void {
    this.#unflushedBytes += bytes;
    if (this.#unflushedBytes < this.#thresholdBytes || this.#running) return;
    this.#unflushedBytes = 0;
    this.#running = this.#sync()
      .catch((error) => {
        // The next fdatasync would not report it (the kernel reports a
        // writeback error once per open file): kept for settle.
        if (!this.#failed) [this.#failed, this.#error] = [true, error];
      })
      .finally(() => {
        this.#running = undefined;
      });
  }

  /** Waits for the background flush; throws the first one that failed (every time). */
  async settle(): Promise<void> {
    await this.#running;
    if (this.#failed) throw this.#error;
  }

  /** Waits for the background flush, whatever its outcome (before the file closes). */
  async idle(): Promise<void> {
    await this.#running;
  }
}
