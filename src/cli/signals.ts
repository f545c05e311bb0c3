/**
 * Foreground daemons (`ctrl`, `serve`) stop on SIGINT or SIGTERM.
 * @module
 */

/** Resolves with the first of SIGINT/SIGTERM, then stops listening for them. */
export function waitForStopSignal(): Promise<Deno.Signal> {
  return new Promise((resolve) => {
    const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
    const handlers = signals.map((signal) => {
      const handler = () => {
        signals.forEach((s, i) => Deno.removeSignalListener(s, handlers[i]));
        resolve(signal);
      };
      Deno.addSignalListener(signal, handler);
      return handler;
    });
  });
}
