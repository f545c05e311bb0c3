/**
 * The internal snapshot table of qcow2 (`nb_snapshots` entries at
 * `snapshots_offset`), as `qemu-img snapshot -c` writes it:
 *
 * ```
 *  0 l1_table_offset u64   8 l1_size u32        12 id_str_size u16
 * 14 name_size u16        16 date_sec u32      20 date_nsec u32
 * 24 vm_clock_nsec u64    32 vm_state_size u32 36 extra_data_size u32
 * 40 extra data (vm_state_size_large u64, disk_size u64, icount u64), id, name, pad to 8
 * ```
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import { Qcow2FormatError, u64 } from "./header.ts";

/** One internal snapshot. */
export interface Qcow2Snapshot {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  dateSeconds: number;
  dateNanoseconds: number;
  vmClockNanoseconds: number;
  vmStateBytes: number;
  /** Virtual disk size at the snapshot (extra data), when recorded. */
  diskSizeBytes?: number;
  /** Instruction count (extra data), when recorded; -1 means none. */
  icount?: number;
  /** Bytes of extra data the entry carries (v3 requires at least 16). */
  extraDataBytes: number;
}

/** The snapshot table: its entries and its byte length (for refcounting). */
export interface SnapshotTable {
  snapshots: Qcow2Snapshot[];
  lengthBytes: number;
}

/** Most bytes the table may take (QEMU: 1 KiB per snapshot). */
const table_bytes_max = 1024 * 65536;

/**
 * Reads `count` snapshots at `offset`; what lies past the end of the file
 * reads as zeros (as QEMU reads it). Throws {@linkcode Qcow2FormatError} on
 * a table QEMU refuses (too large, too much extra data). A snapshot's L1
 * size is not judged here: QEMU opens such an image, and its check counts it.
 */
export async function readSnapshots(
  file: ImageFile,
  offset: number,
  count: number,
): Promise<SnapshotTable> {
  if (count === 0) return { snapshots: [], lengthBytes: 0 };
  const fail = (problem: string): never => {
    throw new Qcow2FormatError(file.path, `snapshot table: ${problem}`);
  };
  const bytes = new Uint8Array(Math.min(table_bytes_max, Math.max(0, file.lengthBytes() - offset)));
  await file.read(offset, bytes);
  const view = new DataView(bytes.buffer);
  // Bytes past the file (or what was read of it) are zeros.
  const u8 = (at: number) => (at < bytes.byteLength ? view.getUint8(at) : 0);
  const u16 = (at: number) => (u8(at) << 8) | u8(at + 1);
  const u32 = (at: number) => ((u16(at) << 16) | u16(at + 2)) >>> 0;
  const u64at = (
    at: number,
  ) => (at + 8 <= bytes.byteLength ? u64(view, at) : u32(at) * 2 ** 32 + u32(at + 4));
  const text = (from: number, length: number) =>
    new TextDecoder().decode(
      bytes.subarray(Math.min(from, bytes.byteLength), Math.min(from + length, bytes.byteLength)),
    );
  const snapshots: Qcow2Snapshot[] = [];
  let at = 0;
  for (let i = 0; i < count; i += 1) {
    const idBytes = u16(at + 12);
    const nameBytes = u16(at + 14);
    const extraBytes = u32(at + 36);
    if (extraBytes > 1024) fail(`entry ${i} has too much extra metadata`);
    const end = at + 40 + extraBytes + idBytes + nameBytes;
    if (end > table_bytes_max) fail("the table exceeds the maximum size");
    const s: Qcow2Snapshot = {
      l1TableOffset: u64at(at),
      l1Size: u32(at + 8),
      dateSeconds: u32(at + 16),
      dateNanoseconds: u32(at + 20),
      vmClockNanoseconds: u64at(at + 24),
      vmStateBytes: u32(at + 32),
      id: text(at + 40 + extraBytes, idBytes),
      name: text(at + 40 + extraBytes + idBytes, nameBytes),
      extraDataBytes: extraBytes,
    };
    if (extraBytes >= 8) s.vmStateBytes = u64at(at + 40);
    if (extraBytes >= 16) s.diskSizeBytes = u64at(at + 48);
    if (extraBytes >= 24) s.icount = u64at(at + 56);
    snapshots.push(s);
    at = Math.ceil(end / 8) * 8;
  }
  return { snapshots, lengthBytes: at };
}
