/**
 * The qcow2 registry entry: probe (magic `QFI\xfb`, version 2 or 3), open,
 * and the `info`, `check` and `create` hooks.
 * @module
 */
import type { ImageInfo } from "../inspect.ts";
import type { FormatEntry } from "../format_entry.ts";
import { openImageFile } from "../raw/open_file.ts";
import {
  COMPAT_LAZY_REFCOUNTS,
  featureName,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTENDED_L2,
  isQcow2Header,
  type Qcow2Header,
  unsupportedFeature,
} from "./header.ts";
import { readQcow2Image } from "./image.ts";
import { readSnapshots } from "./snapshots.ts";
import { Qcow2Driver } from "./qcow2.ts";
import { checkQcow2 } from "./check.ts";
import { createQcow2 } from "./create.ts";

/** Header facts of a qcow2 file, as `qemu-img info` shows them (its chain is not opened). */
export async function qcow2Info(path: string): Promise<ImageInfo> {
  const file = await openImageFile(path, { readOnly: true, engine: "sync" });
  try {
    const image = await readQcow2Image(file);
    const h = image.header;
    // A broken snapshot table is shown, not fatal: the image's own data is still there.
    let table: Awaited<ReturnType<typeof readSnapshots>> = { snapshots: [], lengthBytes: 0 };
    let tableError: string | undefined;
    try {
      table = await readSnapshots(file, h.snapshotsOffset, h.nbSnapshots);
    } catch (error) {
      tableError = (error as Error).message;
    }
    const info: ImageInfo = {
      format: "qcow2",
      virtualSizeBytes: h.sizeBytes,
      clusterSizeBytes: image.geometry.clusterBytes,
      backingFile: h.backingName,
      details: _details(h, image.geometry.refcountBits),
    };
    if (h.backingFormat) info.backingFormat = h.backingFormat;
    if (tableError) info.details!.snapshot_table_error = tableError;
    if (table.snapshots.length > 0) {
      info.snapshots = table.snapshots.map((s) => ({
        id: s.id,
        name: s.name,
        vmStateBytes: s.vmStateBytes,
        dateSeconds: s.dateSeconds,
        dateNanoseconds: s.dateNanoseconds,
        vmClockNanoseconds: s.vmClockNanoseconds,
        diskSizeBytes: s.diskSizeBytes,
      }));
    }
    return info;
  } finally {
    await file.close();
  }
}

function _details(h: Qcow2Header, refcountBits: number): Record<string, string | number | boolean> {
  const details: Record<string, string | number | boolean> = {
    compat: h.version === 3 ? "1.1" : "0.10",
  };
  if (h.version === 3) {
    details.compression_type = h.compressionType === 0
      ? "zlib"
      : h.compressionType === 1
      ? "zstd"
      : String(h.compressionType);
    details.lazy_refcounts = (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n;
  }
  details.refcount_bits = refcountBits;
  details.corrupt = (h.incompatible & INCOMPAT_CORRUPT) !== 0n;
  details.dirty = (h.incompatible & INCOMPAT_DIRTY) !== 0n;
  details.extended_l2 = (h.incompatible & INCOMPAT_EXTENDED_L2) !== 0n;
  details.l1_size = h.l1Size;
  details.snapshots = h.nbSnapshots;
  const features: string[] = [];
  for (const [type, mask] of [[0, h.incompatible], [1, h.compatible], [2, h.autoclear]] as const) {
    for (let bit = 0; bit < 64; bit += 1) {
      if ((mask >> BigInt(bit)) & 1n) {
        features.push(
          featureName(h, type, bit) ??
            `${["incompatible", "compatible", "autoclear"][type]} bit ${bit}`,
        );
      }
    }
  }
  if (features.length > 0) details.features = features.join(", ");
  if (h.dataFileName !== undefined) details.data_file = h.dataFileName;
  if (h.cryptMethod !== 0) details.encrypted = true;
  const problem = unsupportedFeature(h);
  if (problem) details.unsupported = problem;
  return details;
}

/** `qcow2:PATH`: QEMU's qcow2, versions 2 and 3. */
export const QCOW2_FORMAT: FormatEntry = {
  name: "qcow2",
  probe: isQcow2Header,
  open: (path, options, context) => Qcow2Driver.open(path, options, context),
  info: qcow2Info,
  check: checkQcow2,
  create: createQcow2,
};
