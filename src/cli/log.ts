/**
 * Leveled logging to stderr, systemd-style: one line per event, with the
 * syslog priority prefix (`<3>` error ... `<7>` debug) when stderr is not a
 * terminal so journald keeps the level, and a plain level word otherwise.
 * @module
 */

/** Levels in increasing verbosity. */
export type LogLevel = "error" | "warn" | "info" | "debug";

const PRIORITY: Record<LogLevel, number> = { error: 3, warn: 4, info: 6, debug: 7 };
const ORDER: LogLevel[] = ["error", "warn", "info", "debug"];

let threshold: LogLevel = (Deno.env.get("BLKTAP_LOG_LEVEL") as LogLevel) ?? "info";
const encoder = new TextEncoder();

/** Sets the most verbose level printed. */
export function setLogLevel(level: LogLevel): void {
  if (!ORDER.includes(level)) throw new Error(`unknown log level '${level}'`);
  threshold = level;
}

/** The current level (passed on to child processes). */
export function logLevel(): LogLevel {
  return threshold;
}

/** A logger whose lines start with `tag`. */
export function logger(tag: string) {
  const write = (level: LogLevel, message: string) => {
    if (ORDER.indexOf(level) > ORDER.indexOf(threshold)) return;
    const prefix = Deno.stderr.isTerminal() ? `${level}: ` : `<${PRIORITY[level]}>`;
    Deno.stderr.writeSync(encoder.encode(`${prefix}${tag}: ${message}\n`));
  };
  return {
    error: (m: string) => write("error", m),
    warn: (m: string) => write("warn", m),
    info: (m: string) => write("info", m),
    debug: (m: string) => write("debug", m),
  };
}

/** The type of {@linkcode logger}'s result. */
export type Logger = ReturnType<typeof logger>;
