/**
 * Creating qcow2 images (`blktap create -f qcow2`, `convert -O qcow2`),
 * laid out as `qemu-img create` lays them out: header cluster, refcount
 * table, refcount blocks, L1 table; with `preallocation=metadata` (or
 * `falloc`, `full`) every L2 table and data cluster as well, data clusters
 * left as holes (or allocated in the file system).
 *
 * Options (`-o key=value`): compat (0.10|v2|1.1|v3, default 1.1),
 * cluster_size (512 to 2M, default 64K), refcount_bits (1..64, powers of
 * two; 16 for compat 0.10), lazy_refcounts (on|off), preallocation
 * (off|metadata|falloc|full), backing_file, backing_fmt, and extended_l2,
 * compression_type, encryption accepted only at the values we support.
 * A bad key or value is a RangeError naming it (the CLI makes it a usage
 * error).
 * @module
 */
import type { CreateOptions } from "../format_entry.ts";
import { createImageFile, openImageFile } from "../raw/open_file.ts";
import { parseSizeBytes } from "../size.ts";
import { standardEntry } from "./entries.ts";
import {
  cluster_bits_max,
  cluster_bits_min,
  COMPAT_LAZY_REFCOUNTS,
  encodeHeader,
  l1EntriesFor,
  l1TooLarge,
  setU64,
} from "./header.ts";
import { setRefcount } from "./refcount_width.ts";

const KNOWN_OPTIONS = [
  "compat",
  "cluster_size",
  "refcount_bits",
  "lazy_refcounts",
  "preallocation",
  "backing_file",
  "backing_fmt",
  "extended_l2",
  "compression_type",
  "encryption",
];

/** The decoded `-o` options. */
export interface Qcow2CreateSettings {
  version: 2 | 3;
  clusterBits: number;
  refcountOrder: number;
  lazyRefcounts: boolean;
  preallocation: "off" | "metadata" | "falloc" | "full";
}

function _flag(key: string, value: string): boolean {
  if (["on", "true", "yes"].includes(value)) return true;
  if (["off", "false", "no"].includes(value)) return false;
  throw new RangeError(`qcow2 option ${key}: expected on or off, got '${value}'`);
}

/** Parses and validates the `-o` options; throws RangeError naming the bad one. */
export function parseCreateSettings(options: Record<string, string>): Qcow2CreateSettings {
  for (const key of Object.keys(options)) {
    if (!KNOWN_OPTIONS.includes(key)) {
      throw new RangeError(`unknown qcow2 option '${key}' (known: ${KNOWN_OPTIONS.join(", ")})`);
    }
  }
  const compat = options.compat ?? "1.1";
  if (!["0.10", "v2", "1.1", "v3"].includes(compat)) {
    throw new RangeError(`qcow2 option compat: '${compat}' (use 0.10 or 1.1)`);
  }
  const version = compat === "0.10" || compat === "v2" ? 2 : 3;
  const clusterBytes = parseSizeBytes(options.cluster_size ?? "64K");
  const clusterBits = Math.log2(clusterBytes);
  if (
    !Number.isInteger(clusterBits) || clusterBits < cluster_bits_min ||
    clusterBits > cluster_bits_max
  ) {
    throw new RangeError(`qcow2 option cluster_size: ${clusterBytes} (a power of two, 512 to 2M)`);
  }
  const refcountBits = Number(options.refcount_bits ?? "16");
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw new RangeError(`qcow2 option refcount_bits: '${options.refcount_bits}' (1, 2, 4 ... 64)`);
  }
  if (version === 2 && refcountBits !== 16) {
    throw new RangeError("qcow2 option refcount_bits: compat=0.10 requires 16");
  }
  const lazyRefcounts = _flag("lazy_refcounts", options.lazy_refcounts ?? "off");
  if (lazyRefcounts && version === 2) {
    throw new RangeError("qcow2 option lazy_refcounts: requires compat=1.1");
  }
  const preallocation = options.preallocation ?? "off";
  if (!["off", "metadata", "falloc", "full"].includes(preallocation)) {
    throw new RangeError(
      `qcow2 option preallocation: '${preallocation}' (off, metadata, falloc, full)`,
    );
  }
  if (options.extended_l2 !== undefined && _flag("extended_l2", options.extended_l2)) {
    throw new RangeError("qcow2 option extended_l2=on: subclusters are not supported");
  }
  if ((options.compression_type ?? "zlib") !== "zlib") {
    throw new RangeError(`qcow2 option compression_type: only zlib is supported`);
  }
  if (options.encryption !== undefined && _flag("encryption", options.encryption)) {
    throw new RangeError("qcow2 option encryption: encrypted images are not supported");
  }
  return {
    version,
    clusterBits,
    refcountOrder,
    lazyRefcounts,
    preallocation: preallocation as Qcow2CreateSettings["preallocation"],
  };
}

/** Where everything of a new image goes (cluster indexes). */
interface Layout {
  reftableClusters: number;
  refblocks: number;
  l1Entries: number;
  l1Clusters: number;
  /** L2 tables and data clusters (preallocation only). */
  l2Tables: number;
  dataClusters: number;
  /** Total clusters referenced. */
  clusters: number;
}

function _layout(sizeBytes: number, s: Qcow2CreateSettings): Layout {
  const c = 2 ** s.clusterBits;
  const l1Entries = l1EntriesFor(sizeBytes, s.clusterBits);
  if (l1TooLarge(l1Entries)) {
    throw new RangeError(
      "the image size is too large for qcow2 with this cluster size (try a larger cluster_size)",
    );
  }
  const l1Clusters = Math.max(1, Math.ceil((l1Entries * 8) / c));
  const pre = s.preallocation !== "off";
  const l2Tables = pre ? l1Entries : 0;
  const dataClusters = pre ? Math.ceil(sizeBytes / c) : 0;
  const entriesPerBlock = (c * 8) / 2 ** s.refcountOrder;
  let refblocks = 1;
  let reftableClusters = 1;
  for (;;) {
    const clusters = 1 + reftableClusters + refblocks + l1Clusters + l2Tables + dataClusters;
    const needBlocks = Math.ceil(clusters / entriesPerBlock);
    const needTable = Math.max(1, Math.ceil((needBlocks * 8) / c));
    if (needBlocks === refblocks && needTable === reftableClusters) {
      return {
        reftableClusters,
        refblocks,
        l1Entries,
        l1Clusters,
        l2Tables,
        dataClusters,
        clusters,
      };
    }
    refblocks = needBlocks;
    reftableClusters = needTable;
  }
}

/**
 * Creates `path` (which must not exist) as a qcow2 image; see the module
 * description. The header is written last, then fdatasync.
 */
export async function createQcow2(path: string, options: CreateOptions): Promise<void> {
  const s = parseCreateSettings(options.options);
  const backingName = options.backingName ?? options.options.backing_file;
  const backingFormat = options.backingFormat ?? options.options.backing_fmt;
  let sizeBytes = options.sizeBytes;
  if (sizeBytes === 0 && backingName !== undefined) {
    sizeBytes = await _backingSize(path, backingName, backingFormat);
  }
  if (!Number.isInteger(sizeBytes) || sizeBytes < 0 || sizeBytes > 2 ** 63) {
    throw new RangeError(`invalid qcow2 size ${sizeBytes}`);
  }
  sizeBytes = Math.ceil(sizeBytes / 512) * 512; // QEMU rounds to sectors
  const c = 2 ** s.clusterBits;
  const layout = _layout(sizeBytes, s);
  const reftableAt = c;
  const refblocksAt = reftableAt + layout.reftableClusters * c;
  const l1At = refblocksAt + layout.refblocks * c;
  const tablesAt = l1At + layout.l1Clusters * c;
  const dataAt = tablesAt + layout.l2Tables * c;
  const head = encodeHeader({
    version: s.version,
    clusterBits: s.clusterBits,
    sizeBytes,
    l1Size: layout.l1Entries,
    l1TableOffset: l1At,
    refcountTableOffset: reftableAt,
    refcountTableClusters: layout.reftableClusters,
    refcountOrder: s.refcountOrder,
    compatible: s.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    backingName,
    backingFormat,
  });
  await createImageFile(path, async (file) => {
    await _writeRefcounts(file, s, layout, reftableAt, refblocksAt);
    await _writeTables(file, s, layout, l1At, tablesAt, dataAt);
    const end = dataAt + layout.dataClusters * c;
    if (s.preallocation === "falloc" || s.preallocation === "full") {
      await file.allocate(dataAt, layout.dataClusters * c);
    }
    if (file.lengthBytes() < end) await file.truncate(end);
    await file.flush();
    await file.write(0, head);
    await file.flush();
  });
}

async function _writeRefcounts(
  file: Awaited<ReturnType<typeof openImageFile>>,
  s: Qcow2CreateSettings,
  layout: Layout,
  reftableAt: number,
  refblocksAt: number,
): Promise<void> {
  const c = 2 ** s.clusterBits;
  const entriesPerBlock = (c * 8) / 2 ** s.refcountOrder;
  const reftable = new Uint8Array(layout.reftableClusters * c);
  const tableView = new DataView(reftable.buffer);
  for (let b = 0; b < layout.refblocks; b += 1) {
    const block = new Uint8Array(c);
    const view = new DataView(block.buffer);
    const first = b * entriesPerBlock;
    const last = Math.min(layout.clusters, first + entriesPerBlock);
    for (let k = first; k < last; k += 1) setRefcount(view, k - first, s.refcountOrder, 1);
    await file.write(refblocksAt + b * c, block);
    setU64(tableView, b * 8, refblocksAt + b * c);
  }
  await file.write(reftableAt, reftable);
}

async function _writeTables(
  file: Awaited<ReturnType<typeof openImageFile>>,
  s: Qcow2CreateSettings,
  layout: Layout,
  l1At: number,
  tablesAt: number,
  dataAt: number,
): Promise<void> {
  const c = 2 ** s.clusterBits;
  const l1 = new Uint8Array(layout.l1Clusters * c);
  const l1View = new DataView(l1.buffer);
  const l2Entries = c / 8;
  for (let t = 0; t < layout.l2Tables; t += 1) {
    const table = new Uint8Array(c);
    const view = new DataView(table.buffer);
    const first = t * l2Entries;
    for (let k = 0; k < l2Entries && first + k < layout.dataClusters; k += 1) {
      const [hi, lo] = standardEntry(dataAt + (first + k) * c, true);
      view.setUint32(k * 8, hi);
      view.setUint32(k * 8 + 4, lo);
    }
    await file.write(tablesAt + t * c, table);
    const [hi, lo] = standardEntry(tablesAt + t * c, true);
    l1View.setUint32(t * 8, hi);
    l1View.setUint32(t * 8 + 4, lo);
  }
  await file.write(l1At, l1);
}

/** The virtual size of the backing file (a size of 0 means "as the backing file"). */
async function _backingSize(path: string, name: string, format?: string): Promise<number> {
  // Imported when needed: the opener depends on the format registry, which lists this module.
  const { openImage } = await import("../open_image.ts");
  const slash = path.lastIndexOf("/");
  const folder = slash < 0 ? "." : path.slice(0, slash) || "/";
  const full = name.startsWith("/") ? name : `${folder}/${name}`;
  const driver = await openImage(format ? `${format}:${full}` : full, {
    readOnly: true,
    cache: "writeback",
  });
  try {
    return driver.sizeBytes;
  } finally {
    await driver.close();
  }
}
