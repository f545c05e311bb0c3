/**
 * The qcow registry entry: probe (magic `QFI\xfb`, version 1), open, and
 * the `info` and `check` hooks used by `blktap info` and `blktap check`.
 * @module
 */
import type { ImageInfo } from "../inspect.ts";
import type { FormatEntry } from "../format_entry.ts";
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

/** `qcow:PATH`: QEMU's qcow version 1, with blktap's Xen extension. */
export const QCOW_FORMAT: FormatEntry = {
  name: "qcow",
  probe: isQcowHeader,
  open: (path, options, context) => QcowDriver.open(path, options, context),
  info: qcowInfo,
  check: checkQcow,
};
