/**
 * Write-through of metadata blocks (L1, L2, refcount blocks and table) with
 * coalescing: a caller that changed a block in memory asks for it to reach
 * the file; when a write of that block is already in flight, the caller
 * waits for it and then one more write carries every change made
 * meanwhile. The caller's promise resolves once a write that started
 * after its change completed, so an answered request's metadata is in the
 * file (the page cache is enough; FLUSH makes it durable).
 *
 * Deferred (an `unordered` open: a new image its tool deletes on failure):
 * changed blocks are only remembered, and {@linkcode MetadataWriter.writeBack}
 * writes them all at once, sorted by offset, adjacent blocks joined into
 * writes of up to `writeback_run_bytes_max` — at FLUSH and close (before
 * their fdatasync), when half a slice cache holds dirty slices, and before
 * a cluster holding a pending block is freed or read raw. Memory stays
 * bounded: a pending block is either a dirty slice, pinned in its bounded
 * cache until written back (at most half of each cache: 16 MiB of L2 and
 * 2 MiB of refcount slices by default), or a block of the L1 or refcount
 * table, which are in memory anyway; it is copied only while its write runs.
 * Nothing orders these writes against the data they map: an unordered
 * image is consistent only after its final flush; a crash before that
 * leaves an image its tool removes (convert does so on any failure).
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import { joinBytes } from "../join_bytes.ts";

/** Largest single write of joined adjacent blocks at a deferred write-back. */
export const writeback_run_bytes_max = 1 << 20;

interface BlockState {
  /** Bumped by every change request. */
  version: number;
  /** Version the last completed write carried. */
  written: number;
  running?: Promise<void>;
}

/** A deferred block: its content when captured, and a call once that write has ended. */
interface PendingBlock {
  capture: () => Uint8Array;
  settled?: () => void;
}

/** Per-file coalescing writer keyed by the block's file offset. */
export class MetadataWriter {
  readonly #file: ImageFile;
  readonly #blocks = new Map<number, BlockState>();
  /** Deferred blocks by file offset (deferred mode only). */
  #pending = new Map<number, PendingBlock>();
  /** The write-back running or last run: write-backs never overlap (a later one carries newer bytes). */
  #writingBack: Promise<void> = Promise.resolve();
  #failure?: Error;
  /** Blocks are written at {@linkcode writeBack}, not at once. */
  readonly deferred: boolean;
  /** Block writes issued (for tests and stats); a joined run of deferred blocks counts once. */
  writes = 0;

  constructor(file: ImageFile, options: { deferred?: boolean } = {}) {
    this.#file = file;
    this.deferred = options.deferred ?? false;
  }

  /**
   * Writes the block at `fileOffsetBytes`, whose current content `capture`
   * returns (a copy: the memory may change while the write is in flight).
   * Deferred: remembers it and resolves at once; `settled` is called when
   * the write-back that captured it has ended.
   */
  persist(
    fileOffsetBytes: number,
    capture: () => Uint8Array,
    settled?: () => void,
  ): Promise<void> {
    if (this.deferred) {
      this.#pending.set(fileOffsetBytes, { capture, settled });
      return Promise.resolve();
    }
    const written = this.#writeThrough(fileOffsetBytes, capture);
    // No extra promise step when nothing waits for the end (the crash simulator replays interleavings).
    return settled ? written.finally(settled) : written;
  }

  /** Deferred blocks not yet written back. */
  get pendingBlocks(): number {
    return this.#pending.size;
  }

  /** True when a deferred block lies in file bytes `[startBytes, endBytes)`. */
  pendingWithin(startBytes: number, endBytes: number): boolean {
    for (const offset of this.#pending.keys()) {
      if (offset >= startBytes && offset < endBytes) return true;
    }
    return false;
  }

  /**
   * Writes every deferred block (nothing when not deferred): captured at
   * once, sorted, adjacent ones joined. Resolves when they are in the file;
   * blocks deferred meanwhile wait for the next write-back.
   */
  writeBack(): Promise<void> {
    const run = this.#writingBack.catch(() => {}).then(() => {
      // A failed write-back lost blocks: every later one (the final flush) fails too.
      if (this.#failure) throw this.#failure;
      return this.#writePending();
    });
    this.#writingBack = run;
    return run;
  }

  async #writePending(): Promise<void> {
    if (this.#pending.size === 0) return;
    const blocks = [...this.#pending].sort((a, b) => a[0] - b[0]);
    this.#pending = new Map();
    const captured = blocks.map(([offset, b]) => ({ offset, bytes: b.capture() }));
    const writes: Promise<void>[] = [];
    for (let i = 0; i < captured.length;) {
      let end = captured[i].offset + captured[i].bytes.byteLength;
      let j = i + 1;
      while (
        j < captured.length && captured[j].offset === end &&
        end + captured[j].bytes.byteLength - captured[i].offset <= writeback_run_bytes_max
      ) {
        end += captured[j].bytes.byteLength;
        j += 1;
      }
      const parts = captured.slice(i, j).map((c) => c.bytes);
      this.writes += 1;
      writes.push(this.#file.write(captured[i].offset, joinBytes(parts)));
      i = j;
    }
    try {
      await Promise.all(writes);
    } catch (error) {
      this.#failure ??= error as Error;
      throw error;
    } finally {
      await Promise.allSettled(writes);
      for (const [, b] of blocks) b.settled?.();
    }
  }

  async #writeThrough(fileOffsetBytes: number, capture: () => Uint8Array): Promise<void> {
    let state = this.#blocks.get(fileOffsetBytes);
    if (!state) {
      state = { version: 0, written: 0 };
      this.#blocks.set(fileOffsetBytes, state);
    }
    const wanted = ++state.version;
    try {
      while (state.written < wanted) {
        if (state.running) {
          await state.running.catch(() => {});
          continue;
        }
        const carried = state.version;
        const bytes = capture();
        this.writes += 1;
        const run = this.#file.write(fileOffsetBytes, bytes).then(() => {
          state!.written = Math.max(state!.written, carried);
        });
        state.running = run;
        try {
          await run;
        } finally {
          state.running = undefined;
        }
      }
    } finally {
      if (!state.running && state.written >= state.version) this.#blocks.delete(fileOffsetBytes);
    }
  }

  /**
   * Resolves when the writes running now have ended (a cache waits so for
   * pinned tables); deferred: when every pending block is written back.
   */
  async idle(): Promise<void> {
    if (this.deferred) return await this.writeBack();
    const running = [...this.#blocks.values()].flatMap((s) => (s.running ? [s.running] : []));
    if (running.length === 0) await new Promise((resolve) => setTimeout(resolve, 1));
    else await Promise.allSettled(running);
  }

  /** Blocks with writes pending or in flight. */
  get busyBlocks(): number {
    return this.#blocks.size;
  }
}
