/**
 * The persistent dirty bitmaps of a qcow2 image (bitmaps extension): only
 * the space they take, which `check` counts and a writer frees. We keep no
 * bitmap up to date, so before the first write the autoclear bit that
 * vouches for them is cleared (QEMU then drops them as inconsistent) and
 * their clusters are given back, so nothing leaks.
 *
 * ```
 * directory entry: 0 bitmap_table_offset u64  8 bitmap_table_size u32
 *   12 flags u32  16 type u8  17 granularity_bits u8  18 name_size u16
 *   20 extra_data_size u32  24 extra data, name, padding to 8
 * table entry: bits 9..55 data cluster offset (0: all zeros or all ones)
 * ```
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import { offsetField } from "./entries.ts";
import type { Qcow2Header } from "./header.ts";

/** One range the bitmaps occupy, or a table entry that is not a valid cluster. */
export type BitmapSpace =
  | { offsetBytes: number; lengthBytes: number }
  | { unaligned: number };

/** The ranges of the bitmap directory, tables and data clusters (the file's own bytes only). */
export async function bitmapSpace(
  file: ImageFile,
  header: Qcow2Header,
  clusterBytes: number,
  fileBytes = file.lengthBytes(),
): Promise<BitmapSpace[]> {
  const b = header.bitmaps;
  if (!b) return [];
  const space: BitmapSpace[] = [{ offsetBytes: b.directoryOffset, lengthBytes: b.directoryBytes }];
  const inside = (offset: number, length: number) =>
    new Uint8Array(Math.max(0, Math.min(length, fileBytes - offset)));
  const dir = inside(b.directoryOffset, b.directoryBytes);
  await file.read(b.directoryOffset, dir);
  const view = new DataView(dir.buffer);
  for (let at = 0, n = 0; n < b.count && at + 24 <= dir.byteLength; n += 1) {
    const tableOffset = view.getUint32(at) * 2 ** 32 + view.getUint32(at + 4);
    const tableSize = view.getUint32(at + 8);
    space.push({ offsetBytes: tableOffset, lengthBytes: tableSize * 8 });
    const table = inside(tableOffset, tableSize * 8);
    await file.read(tableOffset, table);
    const tv = new DataView(table.buffer);
    for (let i = 0; i + 8 <= table.byteLength; i += 8) {
      const offset = offsetField(tv.getUint32(i), tv.getUint32(i + 4));
      if (offset % clusterBytes !== 0) space.push({ unaligned: i / 8 });
      else if (offset !== 0) space.push({ offsetBytes: offset, lengthBytes: clusterBytes });
    }
    at += Math.ceil((24 + view.getUint32(at + 20) + view.getUint16(at + 18)) / 8) * 8;
  }
  return space;
}
