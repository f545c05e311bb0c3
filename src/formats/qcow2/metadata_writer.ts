/**
 * Write-through of metadata blocks (L1, L2, refcount blocks and table) with
 * coalescing: a caller that changed a block in memory asks for it to reach
 * the file; when a write of that block is already in flight, the caller
 * waits for it and then one more write carries every change made
 * meanwhile. The caller's promise resolves once a write that started
 * after its change completed, so an answered request's metadata is in the
 * file (the page cache is enough; FLUSH makes it durable).
 * @module
 */
import type { ImageFile } from "../image_file.ts";

interface BlockState {
  /** Bumped by every change request. */
  version: number;
  /** Version the last completed write carried. */
  written: number;
  running?: Promise<void>;
}

/** Per-file coalescing writer keyed by the block's file offset. */
export class MetadataWriter {
  readonly #file: ImageFile;
  readonly #blocks = new Map<number, BlockState>();
  /** Block writes issued (for tests and stats). */
  writes = 0;

  constructor(file: ImageFile) {
    this.#file = file;
  }

  /**
   * Writes the block at `fileOffsetBytes`, whose current content `capture`
   * returns (a copy: the memory may change while the write is in flight).
   */
  async persist(fileOffsetBytes: number, capture: () => Uint8Array): Promise<void> {
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

  /** Resolves when the writes running now have ended (a cache waits so for pinned tables). */
  async idle(): Promise<void> {
    const running = [...this.#blocks.values()].flatMap((s) => (s.running ? [s.running] : []));
    if (running.length === 0) await new Promise((resolve) => setTimeout(resolve, 1));
    else await Promise.allSettled(running);
  }

  /** Blocks with writes pending or in flight. */
  get busyBlocks(): number {
    return this.#blocks.size;
  }
}
