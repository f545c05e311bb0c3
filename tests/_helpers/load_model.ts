/**
 * What every sector of a disk must hold after runs of the exercise front
 * end (`TestFrontend`, `blktap exercise`), composed from the models the runs
 * return, so a test can check the whole disk afterwards by another way than
 * the front end itself: the image file read by QEMU, or a driver's bytes.
 * @module
 */
import assert from "node:assert/strict";
import {
  type ModelRun,
  sectorPattern,
  TAG_DISCARDED,
  TAG_INITIAL,
  TAG_UNKNOWN,
  TAG_ZERO,
  tagAt,
} from "../../src/frontends/exercise/test_frontend.ts";

const sector_bytes = 512;

/** The expected content of a disk that started all zeros. */
export class DiskModel {
  /** Per sector: a write tag, TAG_ZERO, TAG_DISCARDED or TAG_UNKNOWN. */
  readonly tags: Uint32Array;
  /** For discarded sectors: what they held before (zeros are allowed too). */
  readonly before: Uint32Array;

  constructor(sizeBytes: number) {
    this.tags = new Uint32Array(Math.floor(sizeBytes / sector_bytes)).fill(TAG_ZERO);
    this.before = new Uint32Array(this.tags.length);
  }

  /** Applies one run's final model (runs over sectors it did not change keep what was there). */
  apply(runs: ModelRun[]): void {
    for (const [first, count, tag, before] of runs) {
      assert.ok(first + count <= this.tags.length, `model run ${first}+${count} past the disk`);
      for (let i = 0; i < count; i += 1) this.#set(first + i, tagAt(tag, i), before, i);
    }
  }

  #set(sector: number, tag: number, before: number | undefined, i: number): void {
    if (tag !== TAG_DISCARDED) {
      this.tags[sector] = tag;
      return;
    }
    const was = tagAt(before!, i);
    // Discarded in that run: zeros, or what it held before the run's discard
    // (which, for a sector the run had not written, is what earlier runs left).
    if (was === TAG_INITIAL && this.tags[sector] === TAG_DISCARDED) return;
    this.before[sector] = was === TAG_INITIAL ? this.tags[sector] : was;
    this.tags[sector] = TAG_DISCARDED;
  }

  /** Asserts `disk` (the whole disk's bytes) holds exactly what the model says; returns the sectors checked. */
  assertMatches(disk: Uint8Array, what: string): number {
    assert.equal(disk.byteLength, this.tags.length * sector_bytes, `${what}: size`);
    const zero = new Uint8Array(sector_bytes);
    const counts = { written: 0, discarded: 0, mismatches: 0, unknown: 0 };
    let first: string | undefined;
    for (let sector = 0; sector < this.tags.length; sector += 1) {
      const tag = this.tags[sector];
      const discarded = tag === TAG_DISCARDED;
      const content = discarded ? this.before[sector] : tag;
      const got = disk.subarray(sector * sector_bytes, (sector + 1) * sector_bytes);
      if (discarded) counts.discarded += 1;
      else if (tag !== TAG_ZERO) counts.written += 1;
      if (discarded && equalBytes(got, zero)) continue;
      if (content === TAG_UNKNOWN) {
        counts.unknown += 1;
        continue;
      }
      const expected = content === TAG_ZERO ? zero : sectorPattern(sector, content);
      if (!equalBytes(got, expected)) {
        counts.mismatches += 1;
        first ??= `sector ${sector}: expected ${discarded ? "zeros or " : ""}${
          content === TAG_ZERO ? "zeros" : `write tag ${content}`
        }`;
      }
    }
    assert.equal(
      counts.mismatches,
      0,
      `${what}: ${counts.mismatches} sectors differ; first ${first}`,
    );
    assert.equal(counts.unknown, 0, `${what}: ${counts.unknown} sectors of unknown content`);
    assert.ok(counts.written > 0, `${what}: the model holds no written sector`);
    return this.tags.length;
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  for (let i = 0; i < a.byteLength; i += 1) if (a[i] !== b[i]) return false;
  return true;
}
