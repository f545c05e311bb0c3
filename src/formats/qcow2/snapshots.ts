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
import { l1_table_bytes_max, Qcow2FormatError, u64 } from "./header.ts";

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
}

/** The snapshot table: its entries and its byte length (for refcounting). */
export interface SnapshotTable {
  snapshots: Qcow2Snapshot[];
  lengthBytes: number;
}

/** Most bytes the table may take (QEMU: 1 KiB per snapshot). */
const table_bytes_max = 1024 * 65536;

/** Reads `count` snapshots at `offset`; throws {@linkcode Qcow2FormatError} on a bad table. */
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
  const snapshots: Qcow2Snapshot[] = [];
  let at = 0;
  for (let i = 0; i < count; i += 1) {
    if (at + 40 > bytes.byteLength) fail(`entry ${i} lies past the end of the file`);
    const idBytes = view.getUint16(at + 12);
    const nameBytes = view.getUint16(at + 14);
    const extraBytes = view.getUint32(at + 36);
    const end = at + 40 + extraBytes + idBytes + nameBytes;
    if (extraBytes > 1024 || end > bytes.byteLength) fail(`entry ${i} is too large`);
    const text = (from: number, length: number) =>
      new TextDecoder().decode(bytes.subarray(from, from + length));
    const s: Qcow2Snapshot = {
      l1TableOffset: u64(view, at),
      l1Size: view.getUint32(at + 8),
      dateSeconds: view.getUint32(at + 16),
      dateNanoseconds: view.getUint32(at + 20),
      vmClockNanoseconds: u64(view, at + 24),
      vmStateBytes: view.getUint32(at + 32),
      id: text(at + 40 + extraBytes, idBytes),
      name: text(at + 40 + extraBytes + idBytes, nameBytes),
    };
    if (s.l1Size * 8 > l1_table_bytes_max) fail(`snapshot ${i}: L1 table too large`);
    if (s.l1TableOffset % 512 !== 0) {
      fail(`snapshot ${i}: L1 table offset ${s.l1TableOffset} unaligned`);
    }
    if (extraBytes >= 8) s.vmStateBytes = u64(view, at + 40);
    if (extraBytes >= 16) s.diskSizeBytes = u64(view, at + 48);
    if (extraBytes >= 24) s.icount = Number(view.getBigInt64(at + 56));
    snapshots.push(s);
    at = Math.ceil(end / 8) * 8;
  }
  return { snapshots, lengthBytes: at };
}
