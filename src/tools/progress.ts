/**
 * A progress bar for long copies, drawn on stderr only when it is a
 * terminal (scripts and tests see nothing). Redraws at most every 100 ms.
 * @module
 */

const redraw_interval_ms = 100;
const bar_width_chars = 30;

/** Progress of a job measured in bytes. */
export class Progress {
  readonly #label: string;
  readonly #totalBytes: number;
  readonly #enabled: boolean;
  #lastDrawMs = 0;
  #encoder = new TextEncoder();

  constructor(label: string, totalBytes: number, enabled = Deno.stderr.isTerminal()) {
    this.#label = label;
    this.#totalBytes = Math.max(1, totalBytes);
    this.#enabled = enabled;
  }

  /** Reports `doneBytes` of the total. */
  update(doneBytes: number): void {
    if (!this.#enabled) return;
    const now = performance.now();
    if (now - this.#lastDrawMs < redraw_interval_ms) return;
    this.#lastDrawMs = now;
    this.#draw(doneBytes);
  }

  /** Draws 100% and ends the line. */
  finish(): void {
    if (!this.#enabled) return;
    this.#draw(this.#totalBytes);
    Deno.stderr.writeSync(this.#encoder.encode("\n"));
  }

  #draw(doneBytes: number): void {
    const fraction = Math.min(1, doneBytes / this.#totalBytes);
    const filled = Math.round(fraction * bar_width_chars);
    const bar = "#".repeat(filled) + " ".repeat(bar_width_chars - filled);
    const percent = (fraction * 100).toFixed(1).padStart(5);
    const line = `\r${this.#label} [${bar}] ${percent}%`;
    Deno.stderr.writeSync(this.#encoder.encode(line));
  }
}
