/**
 * Finding the parent of a differencing VHD from its locators. Candidates
 * are tried relative first (`W2ru`), then absolute (`W2ku`), then `MacX`,
 * so an image moved with its parent still opens. The parent's format is
 * decided by the header, never probed: a null parent UUID means a raw
 * parent (Xen's convention), anything else a VHD whose footer UUID must
 * match, as Hyper-V requires.
 * @module
 */
import type { BlockDriver } from "../driver.ts";
import type { ImageFile } from "../image_file.ts";
import type { OpenContext } from "../format_entry.ts";
import { VhdFormatError } from "./footer.ts";
import {
  decodeLocatorPath,
  locator_bytes_max,
  PLATFORM_MACX,
  PLATFORM_W2KU,
  PLATFORM_W2RU,
  platformName,
} from "./dynamic_header.ts";
import type { VhdImage } from "./image.ts";

/** One way the image names its parent. */
export interface ParentCandidate {
  name: string;
  platform: string;
}

const preference = [PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX];

/** Parent names from the locators, in the order they are tried; duplicates removed. */
export async function parentCandidates(
  file: ImageFile,
  image: VhdImage,
): Promise<ParentCandidate[]> {
  const candidates: ParentCandidate[] = [];
  for (const code of preference) {
    for (const locator of image.header?.locators ?? []) {
      if (locator.platformCode !== code) continue;
      const length = Math.min(locator.dataLengthBytes, locator_bytes_max);
      const start = locator.dataOffsetBytes;
      if (length === 0 || start + length > image.dataEndBytes) continue;
      const payload = new Uint8Array(length);
      await file.read(start, payload);
      const name = decodeLocatorPath(code, payload);
      if (name && !candidates.some((c) => c.name === name)) {
        candidates.push({ name, platform: platformName(code) });
      }
    }
  }
  return candidates;
}

/** True when the parent UUID is all zeros: the parent is a raw image. */
export function hasRawParent(image: VhdImage): boolean {
  return image.header!.parentUuid.every((b) => b === 0);
}

/** A driver that knows its VHD footer UUID (both VHD drivers). */
export interface VhdIdentity {
  readonly vhdUuid: Uint8Array;
}

function sameUuid(a: Uint8Array, b: Uint8Array): boolean {
  return a.byteLength === b.byteLength && a.every((x, i) => x === b[i]);
}

/**
 * Opens the parent read-only through `context.openBacking`, trying each
 * candidate; fails naming every candidate and why it was refused.
 */
export async function openParent(
  file: ImageFile,
  image: VhdImage,
  context: OpenContext,
): Promise<BlockDriver> {
  const candidates = await parentCandidates(file, image);
  if (candidates.length === 0) {
    throw new VhdFormatError(file.path, "differencing disk without a parent locator naming a path");
  }
  const raw = hasRawParent(image);
  const failures: string[] = [];
  for (const candidate of candidates) {
    let parent: BlockDriver;
    try {
      parent = await context.openBacking(candidate.name, file.path, raw ? "raw" : "vhd");
    } catch (error) {
      failures.push(`${candidate.platform} '${candidate.name}': ${(error as Error).message}`);
      continue;
    }
    const identity = (parent as Partial<VhdIdentity>).vhdUuid;
    if (raw || identity === undefined || sameUuid(identity, image.header!.parentUuid)) {
      return parent;
    }
    await parent.close();
    failures.push(
      `${candidate.platform} '${candidate.name}': its UUID is not the parent UUID the header records`,
    );
  }
  throw new VhdFormatError(file.path, `cannot open the parent: ${failures.join("; ")}`);
}
