/**
 * What a `blktap` subcommand is, and the argument parsing they all share:
 * `node:util` `parseArgs` in strict mode, `--help` on every command, usage
 * errors as exit status 2.
 * @module
 */
import { parseArgs, type ParseArgsConfig } from "node:util";
import { parseSizeBytes } from "../formats/size.ts";

/** One subcommand of the `blktap` executable. */
export interface Command {
  /** As typed after `blktap`. */
  name: string;
  /** One line for `blktap --help`. */
  summary: string;
  /** Full help text, printed by `blktap NAME --help`. */
  usage: string;
  /** Runs the command; resolves to the process exit status. */
  run(argv: string[]): Promise<number>;
}

/** Wrong arguments: main prints the message and the usage, exits 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** `--help` was given: main prints the usage and exits 0. */
export class HelpRequested extends Error {}

type Options = NonNullable<ParseArgsConfig["options"]>;

/** Positional-argument bounds for {@linkcode parseCommandArgs}. */
export interface PositionalBounds {
  min: number;
  max: number;
}

/**
 * Parses `argv` against `options` (plus `-h/--help`), checking the number of
 * positionals. Throws {@linkcode UsageError} or {@linkcode HelpRequested}.
 */
export function parseCommandArgs<O extends Options>(
  argv: string[],
  options: O,
  positionals: PositionalBounds = { min: 0, max: 0 },
) {
  let parsed;
  try {
    parsed = parseArgs({
      args: attachNegativeValues(argv, options),
      options: { ...options, help: { type: "boolean", short: "h" } },
      allowPositionals: positionals.max > 0,
      strict: true,
    });
  } catch (error) {
    throw new UsageError(oneLine((error as Error).message));
  }
  if ((parsed.values as Record<string, unknown>).help) throw new HelpRequested();
  const count = parsed.positionals.length;
  if (count < positionals.min) throw new UsageError("missing arguments");
  if (count > positionals.max) {
    throw new UsageError(`unexpected argument '${parsed.positionals[positionals.max]}'`);
  }
  return parsed as unknown as {
    values: { [K in keyof O]?: O[K]["type"] extends "boolean" ? boolean : string };
    positionals: string[];
  };
}

/**
 * `--size -1` as `--size=-1`: parseArgs takes a value starting with '-' for
 * an option and calls it ambiguous, so a negative number would never reach
 * the option's own check (which says what the option expects).
 */
function attachNegativeValues(argv: string[], options: Options): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i += 1) {
    const name = argv[i].startsWith("--") ? argv[i].slice(2) : undefined;
    const next = argv[i + 1];
    if (name && options[name]?.type === "string" && next !== undefined && /^-[\d.]/.test(next)) {
      out.push(`${argv[i]}=${next}`);
      i += 1;
    } else out.push(argv[i]);
  }
  return out;
}

// parseArgs explains some errors over several lines: one line is enough.
function oneLine(message: string): string {
  const ambiguous = /^Option '([^']+)' argument is ambiguous/.exec(message);
  if (ambiguous) {
    const option = ambiguous[1];
    return `option '${option}' needs a value (write ${option}=VALUE for one starting with '-')`;
  }
  return message.split("\n")[0].replace(/\.$/, "");
}

/** Parses a non-negative integer option; throws UsageError naming the option. */
export function parseCount(value: string | undefined, option: string): number | undefined {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(Number(value))) {
    throw new UsageError(`${option} expects a non-negative integer, got '${value}'`);
  }
  return Number(value);
}

/**
 * Parses a size such as `512`, `64K`, `10G`, `1.5T` into bytes; a bad size
 * is a {@linkcode UsageError}. `bareUnitBytes` is the unit of a number
 * without suffix (the seed's qcow-create counts MiB).
 */
export function parseSize(text: string, bareUnitBytes = 1): number {
  try {
    return parseSizeBytes(text, bareUnitBytes);
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

/** Parses `HOST:PORT` (`:PORT` or `[::1]:PORT` too; host defaults to 127.0.0.1). */
export function parseHostPort(text: string, option: string): { hostname: string; port: number } {
  const colon = text.lastIndexOf(":");
  const portText = text.slice(colon + 1);
  if (colon < 0 || !/^\d+$/.test(portText) || Number(portText) > 65535) {
    throw new UsageError(`${option} expects HOST:PORT, got '${text}'`);
  }
  const hostname = text.slice(0, colon).replace(/^\[(.*)\]$/, "$1") || "127.0.0.1";
  return { hostname, port: Number(portText) };
}
