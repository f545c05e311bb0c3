/**
 * Promises started now and awaited later (after other awaits) must not
 * count as unhandled when they fail meanwhile: Deno ends the process on an
 * unhandled rejection. The caller still sees the failure when it awaits.
 * @module
 */

/** Marks `promise` as observed and returns it unchanged. */
export function observed<T>(promise: Promise<T>): Promise<T> {
  promise.catch(() => {});
  return promise;
}
