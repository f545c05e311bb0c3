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
  TAG_INITIAL,
  TAG_UNKNOWN,
  TAG_ZERO,
} from "../../src/frontends/exercise/test_frontend.ts";

const sector_bytes = 512;

/** The expected content of a disk that started all zeros. */
export class DiskModel {
  /** Per sector: a write tag, TAG_ZERO or TAG_UNKNOWN. */
  readonly tags: Uint32Array;

  constructor(sizeBytes: number) {
    this.tags = new Uint32Array(Math.floor(sizeBytes / sector_bytes)).fill(TAG_ZERO);
  }

  /** Applies one run's final model (runs over sectors it did not change keep what was there). */
  apply(runs: ModelRun[]): void {
    for (const [first, count, tag] of runs) {
      assert.ok(first + count <= this.tags.length, `model run ${first}+${count} past the disk`);
      if (tag === TAG_INITIAL) continue;
      for (let i = 0; i < count; i += 1) this.tags[first + i] = tag < TAG_ZERO ? tag + i : tag;
    }
  }

  /** Asserts `disk` (the whole disk's bytes) holds exactly what the model says; returns the sectors checked. */
  assertMatches(disk: Uint8Array, what: string): number {
    assert.equal(disk.byteLength, this.tags.length * sector_bytes, `${what}: size`);
    const zero = new Uint8Array(sector_bytes);
    let written = 0;
    let mismatches = 0;
    let unknown = 0;
    let first: string | undefined;
    for (let sector = 0; sector < this.tags.length; sector += 1) {
      const tag = this.tags[sector];
      if (tag === TAG_UNKNOWN) {
        unknown += 1;
        continue;
      }
      if (tag !== TAG_ZERO) written += 1;
      const expected = tag === TAG_ZERO ? zero : sectorPattern(sector, tag);
      const got = disk.subarray(sector * sector_bytes, (sector + 1) * sector_bytes);
      if (!equalBytes(got, expected)) {
        mismatches += 1;
        first ??= `sector ${sector}: expected ${tag === TAG_ZERO ? "zeros" : `write tag ${tag}`}`;
      }
    }
    assert.equal(
      mismatches,
      0,
      `${what}: ${mismatches} sectors differ from the model; first ${first}`,
    );
    assert.equal(unknown, 0, `${what}: ${unknown} sectors of unknown content (failed requests)`);
    assert.ok(written > 0, `${what}: the model holds no written sector`);
    return this.tags.length;
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  for (let i = 0; i < a.byteLength; i += 1) if (a[i] !== b[i]) return false;
  return true;
}
