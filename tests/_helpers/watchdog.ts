/**
 * A per-case watchdog for fuzz loops: a case that hangs fails with its
 * name instead of stalling the test run.
 * @module
 */

/** Resolves as `work` does, or rejects naming `what` once `limitMs` passed first. */
export async function withWatchdog<T>(work: Promise<T>, limitMs: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${what}: no result after ${limitMs} ms (hang)`)),
      limitMs,
    );
  });
  try {
    return await Promise.race([work, expired]);
  } finally {
    clearTimeout(timer);
  }
}
