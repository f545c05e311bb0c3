/**
 * What the SIGKILL test and its writer agree on: the bytes of write i, and
 * how a log of issued (`w`) and answered (`a`) writes is read back.
 * @module
 */
import { Random } from "../../_helpers/random.ts";

/** The bytes of write `i` of a writer started with `seed` (zeros now and then). */
export function killWriteData(seed: number, i: number, length: number): Uint8Array {
  const rng = new Random((seed * 31 + i * 7919) >>> 0);
  return rng.next() < 0.1 ? new Uint8Array(length) : rng.bytes(length);
}

/** One write of the log. */
export interface LoggedWrite {
  index: number;
  offset: number;
  length: number;
  answered: boolean;
}

/** The writes of a log in issue order; a torn last line is ignored. */
export function parseKillLog(text: string): LoggedWrite[] {
  const writes = new Map<number, LoggedWrite>();
  for (const line of text.split("\n")) {
    const w = /^w (\d+) (\d+) (\d+)$/.exec(line);
    if (w) {
      const [index, offset, length] = [Number(w[1]), Number(w[2]), Number(w[3])];
      writes.set(index, { index, offset, length, answered: false });
    }
    const a = /^a (\d+)$/.exec(line);
    if (a && writes.has(Number(a[1]))) writes.get(Number(a[1]))!.answered = true;
  }
  return [...writes.values()].sort((x, y) => x.index - y.index);
}
