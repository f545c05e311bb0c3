/**
 * The `-o key=value,...` options of `blktap create` and `convert`, as each
 * format's `create` hook reads them: known keys with typed values; an
 * unknown key or a bad value is a {@linkcode CreateOptionError} naming it
 * (the CLI reports it as a usage error).
 * @module
 */
import { parseSizeBytes } from "./size.ts";

/** A bad `-o` option or a request the format cannot represent. */
export class CreateOptionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CreateOptionError";
  }
}

/** How an option's value is read: a size, a boolean, or one of some words. */
export type OptionKind = "size" | "bool" | readonly string[];

/** Typed values of the options that were given. */
export type OptionValues = Record<string, number | boolean | string>;

const TRUE = new Set(["on", "true", "yes", "1"]);
const FALSE = new Set(["off", "false", "no", "0"]);

/** Reads `options` for `format`; throws naming the first unknown key or bad value. */
export function readCreateOptions(
  format: string,
  options: Record<string, string>,
  known: Record<string, OptionKind>,
): OptionValues {
  const values: OptionValues = {};
  for (const [key, text] of Object.entries(options)) {
    const kind = known[key] ?? known[key.replaceAll("-", "_")];
    if (kind === undefined) {
      const names = Object.keys(known);
      const hint = names.length ? ` (known: ${names.join(", ")})` : " (it takes none)";
      throw new CreateOptionError(`${format}: unknown option '${key}'${hint}`);
    }
    values[key.replaceAll("-", "_")] = _value(key, text, kind);
  }
  return values;
}

function _value(key: string, text: string, kind: OptionKind): number | boolean | string {
  if (kind === "size") {
    try {
      return parseSizeBytes(text);
    } catch (error) {
      throw new CreateOptionError(`option ${key}: ${(error as Error).message}`);
    }
  }
  if (kind === "bool") {
    if (TRUE.has(text.toLowerCase())) return true;
    if (FALSE.has(text.toLowerCase())) return false;
    throw new CreateOptionError(`option ${key}: expected on or off, got '${text}'`);
  }
  if (!kind.includes(text)) {
    throw new CreateOptionError(`option ${key}: expected ${kind.join(" or ")}, got '${text}'`);
  }
  return text;
}

/** Parses `a=1,b=2` (several `-o` may be joined with commas); throws naming a malformed item. */
export function parseOptionList(text: string): Record<string, string> {
  const options: Record<string, string> = {};
  for (const item of text.split(",")) {
    if (item === "") continue;
    const eq = item.indexOf("=");
    if (eq <= 0) throw new CreateOptionError(`option '${item}' is not key=value`);
    options[item.slice(0, eq)] = item.slice(eq + 1);
  }
  return options;
}
