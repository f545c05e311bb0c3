/**
 * Sizes as users write them (`512`, `64K`, `10G`, `1.5T`), shared by the
 * CLI and by image specs that carry a size (`ram:NAME,size=64M`).
 * @module
 */

const SIZE_UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
};

/**
 * Parses a size into bytes; throws RangeError naming the text.
 * `bareUnitBytes` is the unit of a number without suffix (the seed's
 * qcow-create counts MiB).
 */
export function parseSizeBytes(text: string, bareUnitBytes = 1): number {
  const match = /^(\d+(?:\.\d+)?)\s*([bkmgtp]?)(?:i?b)?$/i.exec(text.trim());
  if (!match) throw new RangeError(`invalid size '${text}' (examples: 512M, 10G)`);
  const unit = match[2] === "" ? bareUnitBytes : SIZE_UNITS[match[2].toLowerCase()];
  const bytes = Math.round(Number(match[1]) * unit);
  if (!Number.isSafeInteger(bytes)) throw new RangeError(`size '${text}' is too large`);
  return bytes;
}
