/**
 * The vhd registry entry (alias `vpc`, QEMU's name): probe (the `conectix`
 * cookie at offset 0 or in the last 512 bytes), open (fixed, dynamic,
 * differencing), and the `info`, `create` and `check` hooks.
 * @module
 */
import { BlockError } from "../driver.ts";
import type { CreateOptions, FormatEntry, OpenContext } from "../format_entry.ts";
import type { ImageInfo } from "../inspect.ts";
import type { ImageFile, ImageOpenOptions } from "../image_file.ts";
import { openImageFile } from "../raw/open_file.ts";
import { RawDriver } from "../raw/raw.ts";
import { CreateOptionError, readCreateOptions } from "../create_options.ts";
import { exists, relativePath } from "../paths.ts";
import { dirname, resolveStoredName } from "../chain_policy.ts";
import {
  decodeFooter,
  DISK_DIFFERENCING,
  DISK_FIXED,
  diskTypeName,
  FOOTER_BYTES,
  hasFooterCookie,
  VhdFormatError,
} from "./footer.ts";
import { readVhdImage, type VhdImage } from "./image.ts";
import { DynamicVhdDriver } from "./vhd.ts";
import { createVhd, type VhdParentSpec } from "./create.ts";
import { hasRawParent, parentCandidates } from "./parent.ts";
import { checkVhd } from "./check.ts";

/** A fixed VHD: the file's first bytes are the disk; the footer follows. */
export class FixedVhdDriver extends RawDriver {
  readonly image: VhdImage;

  constructor(file: ImageFile, image: VhdImage) {
    super("vhd", file, undefined, image.sizeBytes);
    this.image = image;
  }

  /** The footer UUID (a child's parent UUID names it). */
  get vhdUuid(): Uint8Array {
    return this.image.footer.uuid;
  }
}

/** Opens `path` as a VHD of any subformat. */
export async function openVhd(
  path: string,
  options: ImageOpenOptions,
  context: OpenContext,
): Promise<RawDriver | DynamicVhdDriver> {
  const file = await context.openFile(path, options);
  try {
    const image = await readVhdImage(file);
    if (image.footer.diskType === DISK_FIXED) return new FixedVhdDriver(file, image);
    return await DynamicVhdDriver.openImage(file, image, options, context);
  } catch (error) {
    await file.close();
    if (error instanceof VhdFormatError) throw new BlockError("EINVAL", error.message);
    throw error;
  }
}

/**
 * Probe: the footer copy at the start (dynamic, differencing), or a valid
 * footer of a fixed disk in the last 512 bytes. As QEMU, the end footer
 * alone identifies only fixed disks: those name no parent and no header,
 * so a guest that writes one at the end of a raw disk gains nothing.
 */
export function probeVhd(head: Uint8Array, tail?: Uint8Array): boolean {
  if (hasFooterCookie(head)) return true;
  if (tail === undefined || tail.byteLength < FOOTER_BYTES) return false;
  try {
    return decodeFooter("", tail, "tail").diskType === DISK_FIXED;
  } catch {
    return false;
  }
}

function uuidText(bytes: Uint8Array): string {
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${
    hex.slice(20)
  }`;
}

/** Header facts for `blktap info` (the parent is located, not opened). */
export async function vhdInfo(path: string): Promise<ImageInfo> {
  const file = await openImageFile(path, { readOnly: true, engine: "sync" });
  try {
    const image = await readVhdImage(file);
    const { footer, header } = image;
    const g = footer.geometry;
    const details: Record<string, string | number | boolean> = {
      subformat: diskTypeName(footer.diskType),
      creator: `${footer.creatorApp.replace(/\0/g, "")} ${footer.creatorVersion >>> 16}.${
        footer.creatorVersion & 0xffff
      } (${footer.creatorOs.replace(/\0/g, "")})`,
      geometry: `${g.cylinders}/${g.heads}/${g.sectorsPerTrack}`,
      current_size: footer.currentSizeBytes,
      uuid: uuidText(footer.uuid),
    };
    if (image.endFooterProblem) details.end_footer = `invalid, using the copy at offset 0`;
    const info: ImageInfo = { format: "vhd", virtualSizeBytes: image.sizeBytes, details };
    if (!header) return info;
    info.clusterSizeBytes = image.blockBytes;
    details.block_size = image.blockBytes;
    details.allocated_blocks = image.bat!.filter((e) => e !== 0xffffffff).length;
    if (footer.diskType === DISK_DIFFERENCING) {
      const candidates = await parentCandidates(file, image);
      details.parent_name = header.parentName;
      details.parent_uuid = uuidText(header.parentUuid);
      details.parent_locators = candidates.map((c) => `${c.platform}:${c.name}`).join(", ");
      const found = candidates.find((c) => exists(resolveStoredName(c.name, path))) ??
        candidates[0];
      if (found) info.backingFile = found.name;
      info.backingFormat = hasRawParent(image) ? "raw" : "vhd";
    }
    return info;
  } finally {
    await file.close();
  }
}

/** Reads what a new differencing disk records of its parent. */
async function _parentSpec(path: string, options: CreateOptions): Promise<VhdParentSpec> {
  const format = options.backingFormat ?? "vhd";
  if (!["vhd", "vpc", "raw", "aio", "sync"].includes(format)) {
    throw new CreateOptionError(`vhd can only record a vhd or raw parent, not ${format}`);
  }
  const absolutePath = Deno.realPathSync(resolveStoredName(options.backingName!, path));
  const stat = Deno.statSync(absolutePath);
  const relative = relativePath(Deno.realPathSync(dirname(path)), absolutePath);
  const spec = {
    relativePath: relative,
    absolutePath,
    mtime: stat.mtime ?? new Date(),
    uuid: new Uint8Array(16),
    sizeBytes: stat.size,
  };
  if (format === "raw" || format === "aio" || format === "sync") return spec;
  const file = await openImageFile(absolutePath, { readOnly: true, engine: "sync" });
  try {
    const image = await readVhdImage(file);
    return { ...spec, uuid: image.footer.uuid, sizeBytes: image.sizeBytes };
  } finally {
    await file.close();
  }
}

/** `blktap create -f vhd`: `-o subformat=dynamic|fixed,block_size=SIZE,force_size=on|off`. */
async function createHook(path: string, options: CreateOptions): Promise<void> {
  const values = readCreateOptions("vhd", options.options, {
    subformat: ["dynamic", "fixed"],
    block_size: "size",
    force_size: "bool",
  });
  const subformat = (values.subformat as "dynamic" | "fixed" | undefined) ?? "dynamic";
  if (subformat === "fixed" && options.backingName !== undefined) {
    throw new CreateOptionError("vhd: a fixed image cannot have a backing file");
  }
  const parent = options.backingName === undefined ? undefined : await _parentSpec(path, options);
  try {
    await createVhd(path, {
      sizeBytes: options.sizeBytes,
      subformat,
      blockBytes: values.block_size as number | undefined,
      forceSize: values.force_size as boolean | undefined,
      parent,
    });
  } catch (error) {
    if (error instanceof RangeError) throw new CreateOptionError(`vhd: ${error.message}`);
    throw error;
  }
}

/** `vhd:PATH` (also `vpc:PATH`). */
export const VHD_FORMAT: FormatEntry = {
  name: "vhd",
  aliases: ["vpc"],
  probe: probeVhd,
  open: openVhd,
  info: vhdInfo,
  create: createHook,
  check: checkVhd,
};
