/**
 * The qcow registry entry: probe (magic `QFI\xfb`, version 1), open, and
 * the `info` and `check` hooks used by `blktap info` and `blktap check`.
 * @module
 */
import type { ImageInfo } from "../inspect.ts";
import type { CreateOptions, FormatEntry } from "../format_entry.ts";
import { CreateOptionError, readCreateOptions } from "../create_options.ts";
import { resolveStoredName } from "../chain_policy.ts";
import { createQcow } from "./create.ts";
import { openImageFile } from "../raw/open_file.ts";
import { isQcowHeader, XEN_FLAG_L1_BIG_ENDIAN, XEN_FLAG_SPARSE } from "./header.ts";
import { QcowDriver } from "./qcow.ts";
import { hasExtentLayout, isDirty, readQcowImage } from "./qcow_image.ts";
import { checkQcow } from "./check.ts";

/** Header facts of a qcow file (its chain is not opened). */
export async function qcowInfo(path: string): Promise<ImageInfo> {
  const file = await openImageFile(path, { readOnly: true, engine: "sync" });
  try {
    const image = await readQcowImage(file);
    const { header, geometry } = image;
    let tables = 0;
    await image.l1.scan(() => {
      tables += 1;
    });
    const details: Record<string, string | number | boolean> = {
      version: 1,
      l2_entries: geometry.l2Entries,
      l1_entries: header.l1Entries,
      l1_table_offset: header.l1TableOffset,
      allocated_l2_tables: tables,
    };
    if (header.xen) {
      details.xen_extended_header = true;
      details.min_cluster_alloc = header.xen.minClusterAlloc;
      details.sparse = (header.xen.flags & XEN_FLAG_SPARSE) !== 0;
      details.l1_big_endian = (header.xen.flags & XEN_FLAG_L1_BIG_ENDIAN) !== 0;
      details.l1_checksum_valid = image.checksumValid;
      // New L2 tables reserve their 2 MiB extent (blktap's layout) only in a trusted image.
      details.extent_layout = hasExtentLayout(image);
      // Open read-write now, or its last writer died (reclaimed at the next read-write open).
      details.dirty = isDirty(image);
      if (header.extentTablesFromBytes !== undefined) {
        details.extent_tables_from = header.extentTablesFromBytes;
      }
    }
    return {
      format: "qcow",
      virtualSizeBytes: header.virtualSizeBytes,
      clusterSizeBytes: geometry.clusterBytes,
      backingFile: image.backingName,
      details,
    };
  } finally {
    await file.close();
  }
}

/**
 * `blktap create -f qcow`: blktap's layout (as `qcow-create`), the size in
 * whole sectors; `-o preallocation=full` reserves every cluster (the
 * seed's `-r`). qcow cannot record a backing format.
 */
/** The `-o` options qcow takes (create and convert). */
export const QCOW_CREATE_OPTIONS = { preallocation: ["off", "full"] } as const;

async function createHook(path: string, options: CreateOptions): Promise<void> {
  const values = readCreateOptions("qcow", options.options, QCOW_CREATE_OPTIONS);
  const reserve = values.preallocation === "full";
  if (reserve && options.backingName !== undefined) {
    throw new CreateOptionError("qcow: preallocation=full cannot be combined with a backing file");
  }
  let backingMtime: number | undefined;
  if (options.backingName !== undefined) {
    const stat = Deno.statSync(resolveStoredName(options.backingName, path));
    backingMtime = Math.floor((stat.mtime?.getTime() ?? 0) / 1000);
  }
  const sizeBytes = Math.ceil(options.sizeBytes / 512) * 512;
  if (sizeBytes < 512) throw new CreateOptionError("qcow: size must be at least 512 bytes");
  await createQcow(path, { sizeBytes, backingName: options.backingName, backingMtime, reserve });
}

/** `qcow:PATH`: QEMU's qcow version 1, with blktap's Xen extension. */
export const QCOW_FORMAT: FormatEntry = {
  name: "qcow",
  probe: isQcowHeader,
  open: (path, options, context) => QcowDriver.open(path, options, context),
  info: qcowInfo,
  create: createHook,
  check: checkQcow,
};
