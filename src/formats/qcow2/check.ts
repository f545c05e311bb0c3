/**
 * `check` and `check --repair` of qcow2, counting what `qemu-img check`
 * counts (QEMU block/qcow2-refcount.c): every reference the image makes
 * (header, L1/L2 tables and clusters of the active state and of every
 * snapshot, the snapshot table, the refcount table and blocks, bitmaps) is
 * counted per host cluster and compared with the stored refcounts. A
 * stored refcount below the references is a corruption, above them a leak;
 * the COPIED flags of the active tables must say "refcount is one".
 *
 * Repair sets every refcount to the references counted (rebuilding the
 * refcount structure at the end of the file when its blocks are missing or
 * broken), fixes the COPIED flags, gives leaked space back to the file
 * system and clears the dirty bit (and the corrupt bit when nothing is left
 * to fix). The driver runs it before writing to an image whose dirty bit is
 * set, which is also how the leaks of a crash are reclaimed.
 * @module
 */
import type { CheckOptions, CheckReport } from "../inspect.ts";
import type { ImageFile } from "../image_file.ts";
import { checkOnFile } from "../beneath.ts";
import { bitmapSpace } from "./bitmaps.ts";
import { decodeL1, decodeL2, decodeReftable, HI_COPIED, offsetHex } from "./entries.ts";
import {
  AUTOCLEAR_BITMAPS,
  FIELD_INCOMPATIBLE,
  FIELD_REFCOUNT_TABLE_OFFSET,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  l1TooLarge,
  Qcow2FormatError,
  type Qcow2Geometry,
  setU64,
  unsupportedFeature,
} from "./header.ts";
import { type Qcow2Image, readQcow2Image } from "./image.ts";
import { getRefcount, setRefcount } from "./refcount_width.ts";
import { readSnapshots } from "./snapshots.ts";

/** Corruption messages kept per check; the rest are only counted. */
const messages_max = 100;

/** Computed reference counts per host cluster, saturating at the image's width as QEMU's. */
class References {
  #counts: Uint16Array;
  #wide = new Map<number, number>();
  size: number;

  constructor(size: number) {
    this.size = size;
    this.#counts = new Uint16Array(Math.max(16, size));
  }

  get(cluster: number): number {
    if (cluster >= this.size) return 0;
    const v = this.#counts[cluster];
    return v === 0xffff ? this.#wide.get(cluster) ?? 0xffff : v;
  }

  set(cluster: number, value: number): void {
    if (cluster >= this.size) this.#grow(cluster + 1);
    if (value >= 0xffff) {
      this.#counts[cluster] = 0xffff;
      this.#wide.set(cluster, value);
    } else {
      this.#counts[cluster] = value;
      this.#wide.delete(cluster);
    }
  }

  #grow(size: number): void {
    if (size > this.#counts.length) {
      const next = new Uint16Array(Math.max(size, this.#counts.length * 2));
      next.set(this.#counts);
      this.#counts = next;
    }
    this.size = size;
  }
}

/** What the counting found. */
interface Analysis {
  refs: References;
  messages: string[];
  corruptions: number;
  leaks: number;
  /** Refcounts that could not be read (QEMU's check_errors). */
  checkErrors: number;
  /** The refcount structure itself is broken: repair must rebuild it. */
  rebuild: boolean;
  allocated: number;
  fragmented: number;
  compressed: number;
  highest: number;
  /** Clusters whose stored refcount differs from the references. */
  mismatches: { cluster: number; stored: number; counted: number }[];
}

/** Reads the image and counts; see the module description. */
class Checker {
  readonly #file: ImageFile;
  readonly #image: Qcow2Image;
  readonly #g: Qcow2Geometry;
  readonly #fileBytes: number;
  readonly a: Analysis;

  constructor(file: ImageFile, image: Qcow2Image) {
    this.#file = file;
    this.#image = image;
    this.#g = image.geometry;
    // As QEMU sees a file: its length in whole 512-byte sectors (bdrv_getlength).
    this.#fileBytes = Math.ceil(file.lengthBytes() / 512) * 512;
    this.a = {
      refs: new References(Math.ceil(this.#fileBytes / this.#g.clusterBytes)),
      messages: [],
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      rebuild: false,
      allocated: 0,
      fragmented: 0,
      compressed: 0,
      highest: 0,
      mismatches: [],
    };
  }

  corrupt(message: string): void {
    this.a.corruptions += 1;
    if (this.a.messages.length < messages_max) this.a.messages.push(message);
  }

  /** QEMU's qcow2_inc_refcounts_imrt. */
  inc(offset: number, size: number, offsetText = offset.toString(16)): void {
    if (size <= 0) return;
    const c = this.#g.clusterBytes;
    if (!(offset + size - this.#fileBytes < c)) {
      this.corrupt(
        `counting reference for region exceeding the end of the file by one cluster or more: ` +
          `offset 0x${offsetText} size 0x${size.toString(16)}`,
      );
      return;
    }
    const last = Math.floor((offset + size - 1) / c);
    for (let k = Math.floor(offset / c); k <= last; k += 1) {
      const n = this.a.refs.get(k);
      if (n >= this.#g.refcountMax) {
        this.corrupt(`overflow cluster offset=0x${(k * c).toString(16)}`);
        continue;
      }
      this.a.refs.set(k, n + 1);
    }
  }

  /** Counts everything the image references; `withRefcounts` includes the refcount structure. */
  async count(withRefcounts: boolean): Promise<void> {
    const h = this.#image.header;
    this.inc(0, this.#g.clusterBytes);
    await this.#countL1(h.l1TableOffset, h.l1Size, true);
    if (h.nbSnapshots > 0) await this.#countSnapshots();
    if (withRefcounts) {
      this.inc(h.refcountTableOffset, this.#image.reftableBytes.byteLength);
    }
    if (h.crypto) this.inc(h.crypto.offsetBytes, h.crypto.lengthBytes);
    if (h.bitmaps && (h.autoclear & AUTOCLEAR_BITMAPS) !== 0n) await this.#countBitmaps();
    if (withRefcounts) this.#countRefblocks();
  }

  /** QEMU's qcow2_check_read_snapshot_table, then every snapshot's tables. */
  async #countSnapshots(): Promise<void> {
    const h = this.#image.header;
    let table;
    try {
      table = await readSnapshots(this.#file, h.snapshotsOffset, h.nbSnapshots);
    } catch (error) {
      // QEMU: "ERROR failed to read the snapshot table" is a check error; snapshots ignored.
      this.a.checkErrors += 1;
      if (this.a.messages.length < messages_max) this.a.messages.push((error as Error).message);
      return;
    }
    table.snapshots.forEach((s, i) => {
      if (h.version >= 3 && s.extraDataBytes < 16) {
        this.corrupt(`snapshot table entry ${i} is incomplete`);
      }
    });
    for (const s of table.snapshots) {
      // QEMU's calculate_refcounts: such an entry is counted as corrupt and its tables skipped.
      const snapshot = `snapshot ${s.id} (${s.name})`;
      if (s.l1TableOffset % this.#g.clusterBytes !== 0) {
        this.corrupt(
          `${snapshot} l1_offset=0x${
            s.l1TableOffset.toString(16)
          }: L1 table is not cluster aligned`,
        );
      } else if (l1TooLarge(s.l1Size)) {
        this.corrupt(`${snapshot} l1_size=${s.l1Size}: L1 table is too large`);
      } else {
        await this.#countL1(s.l1TableOffset, s.l1Size, false);
      }
    }
    this.inc(h.snapshotsOffset, table.lengthBytes);
  }

  async #countL1(offset: number, size: number, active: boolean): Promise<void> {
    if (size === 0) return;
    this.inc(offset, size * 8);
    // Entries past the end of the file read as zeros: only what lies inside is read.
    const l1 = new Uint8Array(Math.max(0, Math.min(size * 8, this.#fileBytes - offset)));
    await this.#file.read(offset, l1);
    size = Math.floor(l1.byteLength / 8);
    const view = new DataView(l1.buffer);
    const table = new Uint8Array(this.#g.clusterBytes);
    const tableView = new DataView(table.buffer);
    for (let i = 0; i < size; i += 1) {
      const hi = view.getUint32(i * 8);
      const lo = view.getUint32(i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      const e = decodeL1(hi, lo);
      if (e.reserved) this.corrupt(`found L1 entry with reserved bits set: ${_hex(hi, lo)}`);
      this.inc(e.offsetBytes, this.#g.clusterBytes, offsetHex(hi, lo));
      if (e.offsetLow % this.#g.clusterBytes !== 0) {
        const at = offsetHex(hi, lo);
        this.corrupt(`l2_offset=${at}: Table is not cluster aligned; L1 entry corrupted`);
      }
      // A table past the end of the file reads as zeros: nothing to count in it.
      if (!(e.offsetBytes < this.#fileBytes)) continue;
      await this.#file.read(e.offsetBytes, table);
      this.#countL2(tableView, active);
    }
  }

  #countL2(view: DataView, active: boolean): void {
    const c = this.#g.clusterBytes;
    let next = 0;
    for (let i = 0; i < this.#g.l2Entries; i += 1) {
      const hi = view.getUint32(i * 8);
      const lo = view.getUint32(i * 8 + 4);
      const e = decodeL2(hi, lo, this.#g.clusterBits);
      if (e.reserved) this.corrupt(`found l2 entry with reserved bits set: ${_hex(hi, lo)}`);
      if (e.kind === "compressed") {
        if (e.copied) {
          this.corrupt(
            `coffset=0x${
              e.offsetBytes.toString(16)
            }: copied flag must never be set for compressed clusters`,
          );
        }
        this.inc(e.offsetBytes, e.compressedBytes);
        if (active) {
          this.a.allocated += 1;
          this.a.compressed += 1;
          this.a.fragmented += 1;
        }
      } else if (e.kind === "normal" || e.kind === "zero-alloc") {
        if (e.offsetLow % c !== 0) {
          const what = e.kind === "zero-alloc" ? "Preallocated cluster" : "Data cluster";
          this.corrupt(
            `offset=${offsetHex(hi, lo)}: ${what} is not properly aligned; L2 entry corrupted.`,
          );
        }
        if (active) {
          this.a.allocated += 1;
          if (next !== 0 && e.offsetBytes !== next) this.a.fragmented += 1;
          next = e.offsetBytes + c;
        }
        this.inc(e.offsetBytes, c, offsetHex(hi, lo));
      }
    }
  }

  async #countBitmaps(): Promise<void> {
    const space = await bitmapSpace(
      this.#file,
      this.#image.header,
      this.#g.clusterBytes,
      this.#fileBytes,
    );
    for (const s of space) {
      if ("unaligned" in s) {
        this.corrupt(`bitmap table entry ${s.unaligned} is not cluster aligned`);
      } else this.inc(s.offsetBytes, s.lengthBytes);
    }
  }

  /** QEMU's check_refblocks. */
  #countRefblocks(): void {
    const table = new DataView(this.#image.reftableBytes.buffer);
    const c = this.#g.clusterBytes;
    for (let i = 0; i < this.#image.reftableBytes.byteLength / 8; i += 1) {
      const e = decodeReftable(table.getUint32(i * 8), table.getUint32(i * 8 + 4));
      if (e.reserved) {
        this.corrupt(`refcount table entry ${i} has reserved bits set`);
        this.a.rebuild = true;
        continue;
      }
      if (e.offsetLow % c !== 0) {
        this.corrupt(`refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        this.a.rebuild = true;
        continue;
      }
      const cluster = e.offsetBytes / c; // Infinity past 2^53: outside any image
      if (cluster >= this.a.refs.size) {
        this.corrupt(`refcount block ${i} is outside image`);
        this.a.rebuild = true;
        continue;
      }
      if (e.offsetBytes !== 0) {
        this.inc(e.offsetBytes, c);
        if (this.a.refs.get(cluster) !== 1) {
          this.corrupt(`refcount block ${i} refcount=${this.a.refs.get(cluster)}`);
          this.a.rebuild = true;
        }
      }
    }
  }

  /** QEMU's compare_refcounts (without fixing). */
  async compare(stored: StoredRefcounts): Promise<void> {
    const a = this.a;
    for (let i = 0; i < a.refs.size; i += 1) {
      const have = await stored.get(i);
      if (have === undefined) {
        a.checkErrors += 1; // QEMU: "Can't get refcount for cluster"
        continue;
      }
      const counted = a.refs.get(i);
      if (have > 0 || counted > 0) a.highest = i;
      if (have === counted) continue;
      if (have === 0) a.rebuild = true;
      a.mismatches.push({ cluster: i, stored: have, counted });
      if (have < counted) this.corrupt(`cluster ${i} refcount=${have} reference=${counted}`);
      else a.leaks += 1;
    }
  }

  /** QEMU's check_oflag_copied: `fix` rewrites the flags from `refcountOf` (undefined: unreadable, skipped). */
  async checkCopied(refcountOf: (cluster: number) => Promise<number | undefined>, fix: boolean) {
    const h = this.#image.header;
    const c = this.#g.clusterBytes;
    const l1 = this.#image.l1Bytes;
    const l1View = new DataView(l1.buffer);
    const table = new Uint8Array(c);
    const view = new DataView(table.buffer);
    let fixed = 0;
    for (let i = 0; i < h.l1Size; i += 1) {
      const hi = l1View.getUint32(i * 8);
      const e = decodeL1(hi, l1View.getUint32(i * 8 + 4));
      if (e.offsetBytes === 0 && e.offsetLow === 0) continue;
      const refcount = await refcountOf(Math.floor(e.offsetBytes / c));
      if (refcount !== undefined && (refcount === 1) !== e.copied) {
        if (fix) {
          l1View.setUint32(i * 8, refcount === 1 ? (hi | HI_COPIED) >>> 0 : hi & ~HI_COPIED);
          await this.#file.write(h.l1TableOffset + i * 8, l1.slice(i * 8, i * 8 + 8));
          fixed += 1;
        } else {
          this.corrupt(
            `OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${
              _hex(hi, l1View.getUint32(i * 8 + 4))
            } refcount=${refcount}`,
          );
        }
      }
      if (!(e.offsetBytes < this.#fileBytes)) continue; // reads as zeros: no entries
      await this.#file.read(e.offsetBytes, table);
      let dirty = false;
      for (let j = 0; j < this.#g.l2Entries; j += 1) {
        const eh = view.getUint32(j * 8);
        const el = view.getUint32(j * 8 + 4);
        const entry = decodeL2(eh, el, this.#g.clusterBits);
        if (entry.kind !== "normal" && entry.kind !== "zero-alloc") continue;
        const rc = await refcountOf(Math.floor(entry.offsetBytes / c));
        if (rc === undefined || (rc === 1) === entry.copied) continue;
        if (fix) {
          view.setUint32(j * 8, rc === 1 ? (eh | HI_COPIED) >>> 0 : eh & ~HI_COPIED);
          dirty = true;
          fixed += 1;
        } else this.corrupt(`OFLAG_COPIED data cluster: l2_entry=${_hex(eh, el)} refcount=${rc}`);
      }
      if (dirty) await this.#file.write(e.offsetBytes, table);
    }
    return fixed;
  }
}

/** Stored refcounts read through the image's refcount table (QEMU's qcow2_get_refcount). */
class StoredRefcounts {
  readonly #file: ImageFile;
  readonly #g: Qcow2Geometry;
  readonly #table: DataView;
  readonly #entries: number;
  #block?: { index: number; view: DataView };

  constructor(file: ImageFile, image: Qcow2Image) {
    this.#file = file;
    this.#g = image.geometry;
    this.#table = new DataView(image.reftableBytes.buffer);
    this.#entries = image.reftableBytes.byteLength / 8;
  }

  /** Refcount block offset of index `b` (0: none; -1: unusable entry). */
  blockOffset(b: number): number {
    if (b >= this.#entries) return 0;
    const e = decodeReftable(this.#table.getUint32(b * 8), this.#table.getUint32(b * 8 + 4));
    if (e.offsetBytes === 0) return 0;
    return e.offsetLow % this.#g.clusterBytes === 0 ? e.offsetBytes : -1;
  }

  /** The stored refcount; undefined when its block's table entry is unusable (QEMU: EIO). */
  async get(cluster: number): Promise<number | undefined> {
    const b = Math.floor(cluster / this.#g.refblockEntries);
    const offset = this.blockOffset(b);
    if (offset < 0) return undefined;
    // No block, or one past the end of any file: reads as zeros.
    if (offset === 0 || !Number.isSafeInteger(offset)) return 0;
    if (this.#block?.index !== b) {
      const bytes = new Uint8Array(this.#g.clusterBytes);
      await this.#file.read(offset, bytes);
      this.#block = { index: b, view: new DataView(bytes.buffer) };
    }
    return getRefcount(this.#block.view, cluster % this.#g.refblockEntries, this.#g.refcountOrder);
  }
}

/** Checks `path` as `qemu-img check` does; writes only with `repair`. */
export function checkQcow2(path: string, options: CheckOptions): Promise<CheckReport> {
  return checkOnFile(path, options.repair, (file) => checkQcow2File(file, options));
}

/** {@linkcode checkQcow2} on an open file (the crash simulator checks in-memory files). */
export async function checkQcow2File(file: ImageFile, options: CheckOptions): Promise<CheckReport> {
  let image: Qcow2Image;
  try {
    image = await readQcow2Image(file);
    const problem = unsupportedFeature(image.header);
    if (problem) throw new Qcow2FormatError(file.path, problem);
  } catch (error) {
    if (error instanceof Qcow2FormatError) {
      return { corruptions: [], leakedClusters: 0, unusable: error.message };
    }
    throw error;
  }
  const repaired = options.repair ? await repairQcow2(file, image) : undefined;
  if (repaired) image = await readQcow2Image(file);
  const report = _report(await analyse(file, image), image);
  if (repaired) report.repaired = repaired;
  return report;
}

/** Counts references and compares them with the stored refcounts and COPIED flags. */
async function analyse(file: ImageFile, image: Qcow2Image): Promise<Analysis> {
  const checker = new Checker(file, image);
  await checker.count(true);
  const stored = new StoredRefcounts(file, image);
  await checker.compare(stored);
  await checker.checkCopied((c) => stored.get(c), false);
  return checker.a;
}

function _report(a: Analysis, image: Qcow2Image): CheckReport {
  const g = image.geometry;
  const messages = a.messages.slice();
  if (a.corruptions > messages.length) {
    messages.push(`... and ${a.corruptions - messages.length} more errors`);
  }
  return {
    corruptions: messages,
    corruptionCount: a.corruptions,
    leakedClusters: a.leaks,
    checkErrors: a.checkErrors || undefined,
    clusterStats: {
      totalClusters: Math.ceil(image.header.sizeBytes / g.clusterBytes),
      allocatedClusters: a.allocated,
      fragmentedClusters: a.fragmented,
      compressedClusters: a.compressed,
      imageEndOffsetBytes: (a.highest + 1) * g.clusterBytes,
    },
  };
}

/**
 * Repairs `file` in place (see the module description); returns what it
 * changed. Used by `check --repair` and by the driver before writing a
 * dirty image.
 */
export async function repairQcow2(file: ImageFile, image: Qcow2Image): Promise<string[]> {
  const repaired: string[] = [];
  const checker = new Checker(file, image);
  await checker.count(true);
  const stored = new StoredRefcounts(file, image);
  await checker.compare(stored);
  const a = checker.a;
  // Read again after the fix: the blocks `stored` cached are stale then.
  const refreshed = new StoredRefcounts(file, image);
  let finalRefcounts: (cluster: number) => Promise<number | undefined> = (c) => refreshed.get(c);
  if (a.rebuild || !_blocksCover(a, stored, image.geometry)) {
    const fresh = new Checker(file, image);
    await fresh.count(false);
    await rebuildRefcounts(file, image, fresh.a.refs);
    repaired.push(`rebuilt the refcount structure (${a.mismatches.length} refcounts were wrong)`);
    const counted = fresh.a.refs;
    finalRefcounts = (c) => Promise.resolve(counted.get(c));
  } else if (a.mismatches.length > 0) {
    await _fixInPlace(file, image, a);
    const leaks = a.mismatches.filter((m) => m.stored > m.counted).length;
    const errors = a.mismatches.length - leaks;
    if (leaks > 0) repaired.push(`fixed ${leaks} leaked clusters`);
    if (errors > 0) repaired.push(`fixed ${errors} refcounts lower than the references`);
  }
  await file.flush();
  const copied = await checker.checkCopied(finalRefcounts, true);
  if (copied > 0) repaired.push(`fixed ${copied} OFLAG_COPIED flags`);
  await file.flush();
  const after = await analyse(file, await readQcow2Image(file));
  const cleared = await _markClean(file, image, after.corruptions);
  if (cleared) repaired.push(cleared);
  return repaired;
}

/** Every cluster whose refcount must change has a usable refcount block. */
function _blocksCover(a: Analysis, stored: StoredRefcounts, g: Qcow2Geometry): boolean {
  return a.mismatches.every((m) =>
    stored.blockOffset(Math.floor(m.cluster / g.refblockEntries)) > 0
  );
}

/** Writes the counted refcounts over the stored ones; punches out what became free. */
async function _fixInPlace(file: ImageFile, image: Qcow2Image, a: Analysis): Promise<void> {
  const g = image.geometry;
  const stored = new StoredRefcounts(file, image);
  const byBlock = new Map<number, typeof a.mismatches>();
  for (const m of a.mismatches) {
    const b = Math.floor(m.cluster / g.refblockEntries);
    byBlock.set(b, [...(byBlock.get(b) ?? []), m]);
  }
  for (const [b, list] of byBlock) {
    const offset = stored.blockOffset(b);
    const bytes = new Uint8Array(g.clusterBytes);
    await file.read(offset, bytes);
    const view = new DataView(bytes.buffer);
    for (const m of list) {
      setRefcount(
        view,
        m.cluster % g.refblockEntries,
        g.refcountOrder,
        Math.min(m.counted, g.refcountMax),
      );
    }
    await file.write(offset, bytes);
  }
  for (const m of a.mismatches) {
    if (m.counted === 0 && (m.cluster + 1) * g.clusterBytes <= file.lengthBytes()) {
      await file.punchHole(m.cluster * g.clusterBytes, g.clusterBytes);
    }
  }
}

/**
 * Writes a new refcount structure after everything in use: blocks for
 * every range holding a referenced cluster, then the table; durable before
 * the header switches to it. The old blocks and table are simply no longer
 * counted (free).
 */
export async function rebuildRefcounts(
  file: ImageFile,
  image: Qcow2Image,
  refs: { get(cluster: number): number; size: number },
): Promise<void> {
  const g = image.geometry;
  const c = g.clusterBytes;
  const E = g.refblockEntries;
  let used = 0;
  for (let i = 0; i < refs.size; i += 1) if (refs.get(i) > 0) used = i + 1;
  const start = Math.max(used, Math.ceil(file.lengthBytes() / c));
  // Blocks for every range with a referenced cluster or a new structure cluster.
  let blocks = 0;
  let tableClusters = 0;
  let indexes: number[] = [];
  for (;;) {
    const end = start + blocks + tableClusters;
    const set = new Set<number>();
    for (let i = 0; i < used; i += 1) if (refs.get(i) > 0) set.add(Math.floor(i / E));
    for (let i = start; i < end; i += 1) set.add(Math.floor(i / E));
    indexes = [...set].sort((x, y) => x - y);
    const entries = indexes[indexes.length - 1] + 1;
    const needTable = Math.ceil((entries * 8) / c);
    if (indexes.length === blocks && needTable === tableClusters) break;
    blocks = indexes.length;
    tableClusters = needTable;
  }
  const end = start + blocks + tableClusters;
  const counted = (i: number) => (i >= start && i < end ? 1 : Math.min(refs.get(i), g.refcountMax));
  const table = new Uint8Array(tableClusters * c);
  const tableView = new DataView(table.buffer);
  for (let k = 0; k < indexes.length; k += 1) {
    const b = indexes[k];
    const bytes = new Uint8Array(c);
    const view = new DataView(bytes.buffer);
    for (let i = b * E; i < (b + 1) * E && i < Math.max(used, end); i += 1) {
      const v = counted(i);
      if (v > 0) setRefcount(view, i - b * E, g.refcountOrder, v);
    }
    const at = (start + k) * c;
    await file.write(at, bytes);
    setU64(tableView, b * 8, at);
  }
  const tableAt = (start + blocks) * c;
  await file.write(tableAt, table);
  await file.flush();
  const sector = new Uint8Array(12);
  const sv = new DataView(sector.buffer);
  setU64(sv, 0, tableAt);
  sv.setUint32(8, tableClusters);
  await file.write(FIELD_REFCOUNT_TABLE_OFFSET, sector);
  await file.flush();
}

/** Clears the dirty bit, and the corrupt bit when no corruption is left. */
async function _markClean(file: ImageFile, image: Qcow2Image, remaining: number) {
  const h = image.header;
  if (h.version < 3) return undefined;
  let bits = h.incompatible & ~INCOMPAT_DIRTY;
  if (remaining === 0) bits &= ~INCOMPAT_CORRUPT;
  if (bits === h.incompatible) return undefined;
  const field = new Uint8Array(8);
  new DataView(field.buffer).setBigUint64(0, bits);
  await file.write(FIELD_INCOMPATIBLE, field);
  await file.flush();
  const what = [
    (h.incompatible & INCOMPAT_DIRTY) !== 0n ? "dirty" : "",
    (h.incompatible & ~bits & INCOMPAT_CORRUPT) !== 0n ? "corrupt" : "",
  ].filter((w) => w).join(" and ");
  return `cleared the ${what} bit`;
}

function _hex(hi: number, lo: number): string {
  return (BigInt(hi >>> 0) << 32n | BigInt(lo >>> 0)).toString(16);
}
