/**
 * Host cluster allocation of an open qcow2 image.
 *
 * - Clusters freed in this session, or found free (refcount 0) by a lazy
 *   scan of the refcount blocks, are reused first; a claim sets their
 *   refcount from 0 to 1 in one step, so no cluster is handed out twice.
 * - Otherwise clusters come from reservations at the frontier (past the
 *   end of everything the image uses): a reservation sets the refcounts of
 *   a run of clusters to 1 and extends the file over them (holes), made
 *   durable by one barrier ahead of need (the next one starts while the
 *   current one lasts): a ranged fdatasync of its refcount block, which
 *   also commits the file's size and allocation but leaves the image's
 *   other dirty pages in the page cache. Most allocations then write no refcount and need
 *   no barrier of their own. A crash leaks what was reserved and unused;
 *   the dirty bit makes the next writable open reclaim it, and close
 *   releases it.
 * - When the frontier reaches a range without a refcount block, a new block
 *   is placed at the frontier itself (it describes itself); when the
 *   refcount table is full, a larger one is written behind new blocks that
 *   cover it, made durable, then switched to in the header.
 * - Frees (decrements) wait for a barrier that started after the L2 change
 *   dropping the reference was written, so a crash can never leave an L2
 *   entry pointing at a cluster whose refcount says free.
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import type { GroupSync } from "../group_commit.ts";
import { observed } from "./observed.ts";
import { BlockError } from "../driver.ts";
import { refcount_table_bytes_max } from "./header.ts";
import type { RefcountStore } from "./refcounts.ts";
import { setRefcount } from "./refcount_width.ts";

/** A run of allocated clusters. */
export interface ClusterRun {
  /** First cluster index. */
  start: number;
  count: number;
  /**
   * Never written, inside the file as a hole: reads as zeros. Only runs of
   * frontier reservations are fresh, and their `ready` means durable.
   */
  fresh: boolean;
  /** Resolves when the run's refcounts are in the file (durable for fresh runs). */
  ready: Promise<void>;
}

/** Size of the frontier reservations (bytes), at least 16 clusters. */
export const reservation_bytes = 8 << 20;
/**
 * Through the page cache a barrier (fdatasync) also writes back every dirty
 * page of the file: reservations are larger, so barriers are rarer.
 */
export const reservation_bytes_page_cache = 128 << 20;
const reservation_clusters_min = 16;
/** Free extents remembered for reuse (memory bound). */
const free_extents_max = 4096;
/** Refcount slices one scan step reads. */
const scan_slices_per_step = 64;
/** Deferred frees queued before writers that add more wait for them (memory bound). */
export const frees_queued_max = 1024;

interface Reservation {
  next: number;
  end: number;
  fresh: boolean;
  ready: Promise<void>;
}

/** Hooks the allocator needs from the driver. */
export interface AllocatorHooks {
  /** Runs before the first refcount change (sets the dirty bit). */
  prepare(): Promise<void>;
  /** Writes new refcount table fields to the header (durability is the caller's). */
  writeReftableFields(offsetBytes: number, clusters: number): Promise<void>;
  /** Lowest cluster the frontier may take (end of what the header names). */
  minimumFrontier(): number;
  /** Whether fresh file space reads as zeros (false on block devices). */
  growsWithHoles: boolean;
  /** Bytes reserved at once ({@linkcode reservation_bytes} or the page-cache size). */
  reservationBytes: number;
  /**
   * The barrier of a reservation: durable, the completed writes in
   * `[offset, offset+length)` (its refcount block) and the file's size and
   * allocation; no other dirty data needs to go out with them.
   */
  syncRange(offsetBytes: number, lengthBytes: number): Promise<void>;
}

/** The allocator; see the module description. */
export class ClusterAllocator {
  readonly #store: RefcountStore;
  readonly #file: ImageFile;
  readonly #sync: GroupSync;
  readonly #hooks: AllocatorHooks;
  readonly #clusterBytes: number;
  readonly #reserveClusters: number;
  #frontier?: number;
  #reservations: Reservation[] = [];
  #refilling?: Promise<void>;
  #free: { start: number; count: number }[] = [];
  #scanCursor = 0;
  #structure: Promise<void> = Promise.resolve();
  #freeChain: Promise<void> = Promise.resolve();
  #freesQueued = 0;
  #tail?: { cluster: number; used: number; refs: number };
  /** Deferred frees that failed (reported once, at close). */
  freeErrors: Error[] = [];

  constructor(store: RefcountStore, file: ImageFile, sync: GroupSync, hooks: AllocatorHooks) {
    this.#store = store;
    this.#file = file;
    this.#sync = sync;
    this.#hooks = hooks;
    this.#clusterBytes = store.g.clusterBytes;
    this.#reserveClusters = Math.max(
      reservation_clusters_min,
      Math.ceil(hooks.reservationBytes / this.#clusterBytes),
    );
  }

  /** Serializes changes of the frontier and the refcount structures. */
  #locked<T>(run: () => Promise<T>): Promise<T> {
    const result = this.#structure.then(run);
    this.#structure = result.then(() => {}, () => {});
    return result;
  }

  // ---- allocation -------------------------------------------------------

  /** Allocates `count` clusters, contiguous where possible (adjacent runs merged). */
  async allocate(count: number): Promise<ClusterRun[]> {
    await this.#hooks.prepare();
    const runs: ClusterRun[] = [];
    let remaining = count;
    while (remaining > 0 && (this.#free.length > 0 || await this.#scanMore())) {
      remaining -= await this.#claimFree(remaining, runs);
    }
    while (remaining > 0) {
      const res = this.#reservations[0];
      if (!res) {
        await this.#reserveNow(remaining);
        continue;
      }
      if (res.next >= res.end) {
        this.#reservations.shift();
        continue;
      }
      const n = Math.min(remaining, res.end - res.next);
      runs.push({ start: res.next, count: n, fresh: res.fresh, ready: res.ready });
      res.next += n;
      remaining -= n;
    }
    this.#refillSoon();
    return _merged(runs);
  }

  /** Waits until a reservation exists (starting one of at least `wanted` clusters). */
  async #reserveNow(wanted: number): Promise<void> {
    while (this.#reservations.length === 0) {
      await (this.#refilling ?? this.#startRefill(Math.max(wanted, this.#reserveClusters)));
    }
  }

  /** Starts the next reservation while the current one still lasts. */
  #refillSoon(): void {
    if (this.#refilling) return;
    const left = this.#reservations.reduce((n, r) => n + r.end - r.next, 0);
    if (left >= this.#reserveClusters / 2) return;
    this.#startRefill(this.#reserveClusters).catch(() => {}); // reported to the next allocation
  }

  #startRefill(count: number): Promise<void> {
    const run = this.#reserve(count);
    this.#refilling = run;
    run.then(() => {}, () => {}).then(() => {
      if (this.#refilling === run) this.#refilling = undefined;
    });
    return run;
  }

  #reserve(count: number): Promise<void> {
    return this.#locked(async () => {
      await this.#initFrontier();
      // A new refcount block is named by a table entry: its barrier covers the table too.
      let extended = false;
      while (!this.#store.covered(this.#frontier!)) {
        await this.#extendCoverage();
        extended = true;
      }
      const start = this.#frontier!;
      const block = Math.floor(start / this.#store.g.refblockEntries);
      const n = Math.min(count, (block + 1) * this.#store.g.refblockEntries - start);
      const end = (start + n) * this.#clusterBytes;
      const fresh = this.#hooks.growsWithHoles &&
        start * this.#clusterBytes >= this.#file.lengthBytes();
      const written = (await this.#store.change(start, n, () => 1)).written;
      // Durable ahead of use: the refcounts, and the file covering the run
      // (a hole: its clusters read as zeros until written). Only their
      // refcount block needs writing out: a full barrier through the page
      // cache would also write back every dirty data page of the image.
      const c = this.#clusterBytes;
      const ranges: [number, number][] = [[this.#store.blockOffset(block), c]];
      if (extended) ranges.push([this.#store.tableOffsetBytes, this.#store.tableClusters * c]);
      const ready = observed(written.then(async () => {
        if (fresh) await this.#extendFile(start * c, end);
        await this.#syncRanges(ranges);
      }));
      if (this.#scanCursor >= start) this.#scanCursor = start + n;
      this.#frontier = start + n;
      this.#reservations.push({ next: start, end: start + n, fresh, ready });
    });
  }

  /**
   * Makes `[start, end)` part of the file: allocated in the file system
   * (unwritten extents, reading as zeros) so writes into it need no block
   * allocation, which file systems serialize; a plain hole where the file
   * system cannot preallocate.
   */
  async #extendFile(start: number, end: number): Promise<void> {
    try {
      await this.#file.allocate(start, end - start);
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (code !== "EOPNOTSUPP" && code !== "EINVAL" && code !== "ENOSYS") throw error;
      if (end > this.#file.lengthBytes()) await this.#file.truncate(end);
    }
  }

  /** Claims clusters from the first free extent; returns how many it took. */
  async #claimFree(wanted: number, runs: ClusterRun[]): Promise<number> {
    const extent = this.#free[0];
    if (!extent) return 0;
    const entries = this.#store.g.refblockEntries;
    const n = Math.min(wanted, extent.count, entries - (extent.start % entries));
    const start = extent.start;
    extent.start += n;
    extent.count -= n;
    if (extent.count === 0) this.#free.shift();
    const claimed: number[] = [];
    const { written: ready } = await this.#store.change(start, n, (old, cluster) => {
      if (old !== 0) return undefined; // taken meanwhile (or listed twice)
      claimed.push(cluster);
      return 1;
    });
    for (const c of claimed) {
      const last = runs[runs.length - 1];
      if (last && !last.fresh && last.start + last.count === c && last.ready === ready) {
        last.count += 1;
      } else runs.push({ start: c, count: 1, fresh: false, ready });
    }
    return claimed.length;
  }

  /** Scans refcount blocks below the frontier for free clusters; false when done. */
  async #scanMore(): Promise<boolean> {
    // Scanned up to the frontier already: nothing to find (the common case).
    if (this.#frontier !== undefined && this.#scanCursor >= this.#frontier) return false;
    await this.#locked(() => this.#initFrontier());
    const entries = this.#store.g.refblockEntries;
    const perSlice = this.#store.entriesPerSlice;
    for (let step = 0; step < scan_slices_per_step; step += 1) {
      if (this.#scanCursor >= this.#frontier! || this.#free.length >= free_extents_max) break;
      const cursor = this.#scanCursor;
      const sliceEnd = Math.min(this.#frontier!, (Math.floor(cursor / perSlice) + 1) * perSlice);
      if (!this.#store.covered(cursor)) {
        // Without a refcount block nothing can be claimed here.
        this.#scanCursor = (Math.floor(cursor / entries) + 1) * entries;
        continue;
      }
      await this.#store.visitSlice(cursor, (c, refcount) => {
        if (c >= cursor && c < sliceEnd && refcount === 0) this.#addFree(c, 1);
      });
      this.#scanCursor = sliceEnd;
    }
    return this.#free.length > 0;
  }

  #addFree(start: number, count: number): void {
    const last = this.#free[this.#free.length - 1];
    if (last && last.start + last.count === start) last.count += count;
    else if (this.#free.length < free_extents_max) this.#free.push({ start, count });
  }

  // ---- frontier and refcount structure ------------------------------------

  async #initFrontier(): Promise<void> {
    if (this.#frontier !== undefined) return;
    const fileClusters = Math.ceil(this.#file.lengthBytes() / this.#clusterBytes);
    let highest = -1;
    const g = this.#store.g;
    for (let b = this.#store.tableEntries - 1; b >= 0 && highest < 0; b -= 1) {
      if (this.#store.blockOffset(b) === 0) continue;
      const first = b * g.refblockEntries;
      for (let at = first + g.refblockEntries - 1; at >= first && highest < 0;) {
        const sliceFirst = at - (at % this.#store.entriesPerSlice);
        await this.#store.visitSlice(sliceFirst, (c, refcount) => {
          if (refcount !== 0) highest = Math.max(highest, c);
        });
        at = sliceFirst - 1;
      }
    }
    this.#frontier = Math.max(fileClusters, highest + 1, this.#hooks.minimumFrontier());
  }

  /**
   * Gives the frontier's range a refcount block, placed at the frontier
   * (self-describing); grows the refcount table first when it is full.
   */
  async #extendCoverage(): Promise<void> {
    const g = this.#store.g;
    const start = this.#frontier!;
    const grow = Math.floor(start / g.refblockEntries) >= this.#store.tableEntries;
    let tableEntries = grow
      ? Math.max(this.#store.tableEntries * 2, Math.floor(start / g.refblockEntries) + 1)
      : this.#store.tableEntries;
    let plan: { blocks: number[]; end: number; tableClusters: number };
    for (;;) {
      tableEntries = Math.ceil((tableEntries * 8) / g.clusterBytes) * (g.clusterBytes / 8);
      this.#refuseTableOf(tableEntries, start);
      plan = this.#planCoverage(start, grow ? (tableEntries * 8) / g.clusterBytes : 0);
      const highestBlock = plan.blocks[plan.blocks.length - 1]; // ascending
      if (highestBlock < tableEntries) break;
      tableEntries = highestBlock + 1;
    }
    const blockAt = new Map(plan.blocks.map((b, j) => [b, (start + j) * g.clusterBytes]));
    await this.#writeNewBlocks(start, plan.end, blockAt);
    // The new blocks are durable before anything points at them (only the
    // blocks written, unless the table moves: that path has full barriers).
    if (grow) await this.#sync.sync();
    else {
      const ranges: [number, number][] = [];
      const last = Math.floor((plan.end - 1) / g.refblockEntries);
      for (let b = Math.floor(start / g.refblockEntries); b <= last; b += 1) {
        ranges.push([blockAt.get(b) ?? this.#store.blockOffset(b), g.clusterBytes]);
      }
      await this.#syncRanges(ranges);
    }
    if (grow) await this.#switchTable(start + plan.blocks.length, plan.tableClusters, blockAt);
    else await Promise.all([...blockAt].map(([b, at]) => this.#store.setTableEntry(b, at)));
    this.#frontier = plan.end;
  }

  /** A barrier over refcount blocks (and the table) only: see `AllocatorHooks.syncRange`. */
  async #syncRanges(ranges: [number, number][]): Promise<void> {
    await Promise.all(ranges.map(([offset, length]) => this.#hooks.syncRange(offset, length)));
  }

  // QEMU's limit too: past it the image is full, or (a corrupt image) its
  // tables point far beyond its end; either way no allocation there.
  #refuseTableOf(tableEntries: number, frontier: number): void {
    if (tableEntries * 8 <= refcount_table_bytes_max) return;
    throw new BlockError(
      "ENOSPC",
      `${this.#file.path}: allocating at host offset ${frontier * this.#clusterBytes} needs a ` +
        `refcount table of ${tableEntries * 8} bytes (at most ${refcount_table_bytes_max})`,
    );
  }

  /** Which block indexes need a new block to cover `[start, start + k + tableClusters)`. */
  #planCoverage(start: number, tableClusters: number) {
    const g = this.#store.g;
    let blocks: number[] = [];
    for (;;) {
      const end = start + blocks.length + tableClusters;
      const needed: number[] = [];
      // At least the frontier cluster itself must end up covered.
      const last = Math.floor((Math.max(end, start + 1) - 1) / g.refblockEntries);
      for (let b = Math.floor(start / g.refblockEntries); b <= last; b += 1) {
        if (this.#store.blockOffset(b) === 0) needed.push(b);
      }
      if (needed.length === blocks.length) return { blocks, end, tableClusters };
      blocks = needed;
    }
  }

  /** Writes the new blocks (zeros, with refcount 1 for `[start, end)`) and counts in old blocks. */
  async #writeNewBlocks(start: number, end: number, blockAt: Map<number, number>) {
    const g = this.#store.g;
    const writes: Promise<void>[] = [];
    for (const [b, at] of blockAt) {
      this.#store.forgetCluster(at);
      const bytes = new Uint8Array(g.clusterBytes);
      const view = new DataView(bytes.buffer);
      const first = Math.max(start, b * g.refblockEntries);
      const last = Math.min(end, (b + 1) * g.refblockEntries);
      for (let c = first; c < last; c += 1) {
        setRefcount(view, c % g.refblockEntries, g.refcountOrder, 1);
      }
      writes.push(this.#file.write(at, bytes));
    }
    // Clusters of the area that fall in blocks that already exist.
    for (let c = start; c < end;) {
      const b = Math.floor(c / g.refblockEntries);
      const next = Math.min(end, (b + 1) * g.refblockEntries);
      if (!blockAt.has(b)) writes.push((await this.#store.change(c, next - c, () => 1)).written);
      c = next;
    }
    await Promise.all(writes);
  }

  /** Writes a larger refcount table at `tableCluster`, switches the header to it, frees the old one. */
  async #switchTable(tableCluster: number, clusters: number, blockAt: Map<number, number>) {
    const g = this.#store.g;
    const old = { offset: this.#store.tableOffsetBytes, clusters: this.#store.tableClusters };
    const bytes = new Uint8Array(clusters * g.clusterBytes);
    bytes.set(this.#store.tableBytes);
    const view = new DataView(bytes.buffer);
    for (const [b, at] of blockAt) {
      view.setUint32(b * 8, Math.floor(at / 2 ** 32));
      view.setUint32(b * 8 + 4, at >>> 0);
    }
    const offset = tableCluster * g.clusterBytes;
    await this.#file.write(offset, bytes);
    await this.#sync.sync();
    await this.#hooks.writeReftableFields(offset, clusters);
    await this.#sync.sync();
    this.#store.replaceTable(offset, clusters, bytes);
    this.freeLater(old.offset / g.clusterBytes, old.clusters);
  }

  // ---- compressed bytes -----------------------------------------------------

  /**
   * Space for `lengthBytes` of compressed data, packed behind the previous
   * compressed cluster when it fits in the same host cluster (each
   * compressed cluster counts once in the refcount of its host cluster).
   */
  async allocateBytes(lengthBytes: number): Promise<{ offsetBytes: number; ready: Promise<void> }> {
    const tail = this.#tail;
    if (
      tail && tail.used + lengthBytes <= this.#clusterBytes &&
      tail.refs < this.#store.g.refcountMax
    ) {
      const offsetBytes = tail.cluster * this.#clusterBytes + tail.used;
      tail.used += lengthBytes;
      tail.refs += 1;
      const { written } = await this.#store.change(tail.cluster, 1, (old) => old + 1);
      return { offsetBytes, ready: written };
    }
    const [run] = await this.allocate(1);
    this.#tail = { cluster: run.start, used: lengthBytes, refs: 1 };
    return { offsetBytes: run.start * this.#clusterBytes, ready: run.ready };
  }

  // ---- frees ------------------------------------------------------------------

  /** Drops one reference of clusters `[start, start + count)` once a barrier covers the caller's L2 change. */
  freeLater(start: number, count: number, compressed = false): void {
    this.#freesQueued += 1;
    this.#sync.afterNextSync(() => {
      this.#freeChain = this.#freeChain.then(() => this.#free1(start, count, compressed))
        .catch((error) => {
          this.freeErrors.push(error as Error);
        })
        .finally(() => {
          this.#freesQueued -= 1;
        });
    });
  }

  /**
   * Backpressure for writers that queued frees: past {@linkcode frees_queued_max}
   * waits for a barrier and the frees it releases (a guest that discards
   * and never flushes would otherwise queue them without bound).
   */
  throttleFrees(): Promise<void> | undefined {
    if (this.#freesQueued < frees_queued_max) return undefined; // no promise per write
    return this.#sync.sync().then(() => this.#freeChain);
  }

  async #free1(start: number, count: number, compressed: boolean): Promise<void> {
    if (this.#store.deferred) await this.#store.settleClusters(start, count);
    for (let c = start; c < start + count; c += 1) {
      if (this.#tail?.cluster === c) this.#tail = undefined;
      const old = await this.#store.get(c);
      if (old === 0) continue; // already free: a corrupt image; nothing to undo
      if (old === 1 && !compressed) {
        // Unreferenced now: give the space back to the file system first.
        await this.#file.punchHole(c * this.#clusterBytes, this.#clusterBytes);
      }
      let freed = false;
      await (await this.#store.change(c, 1, (value) => {
        freed = value === 1;
        return value > 0 ? value - 1 : undefined;
      })).written;
      if (freed) this.#addFree(c, 1);
    }
  }

  /** Frees queued and not yet done. */
  get pendingFrees(): number {
    return this.#freesQueued;
  }

  /** Runs queued frees (a barrier first), then releases the unused reservations. */
  async drain(): Promise<void> {
    while (this.#freesQueued > 0) {
      await this.#sync.sync();
      await this.#freeChain;
    }
    if (this.#refilling) await this.#refilling;
    const unused = this.#reservations.filter((r) => r.next < r.end);
    this.#reservations = [];
    const writes: Promise<void>[] = [];
    for (const r of unused) {
      writes.push((await this.#store.change(r.next, r.end - r.next, () => 0)).written);
    }
    await Promise.all(writes);
    // Give the preallocated space back; the file ends where the last used cluster does.
    const c = this.#clusterBytes;
    for (const r of unused) {
      if (!r.fresh) continue;
      await this.#file.punchHole(r.next * c, (r.end - r.next) * c);
      if (r.end === this.#frontier && r.end * c >= this.#file.lengthBytes()) {
        await this.#file.truncate(r.next * c);
      }
    }
  }

  /** The frontier (clusters), for tests. */
  get frontier(): number | undefined {
    return this.#frontier;
  }
}

function _merged(runs: ClusterRun[]): ClusterRun[] {
  const out: ClusterRun[] = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    if (last && last.start + last.count === r.start && last.fresh === r.fresh) {
      const a = last.ready;
      out[out.length - 1] = {
        start: last.start,
        count: last.count + r.count,
        fresh: last.fresh,
        ready: a === r.ready ? a : Promise.all([a, r.ready]).then(() => {}),
      };
    } else out.push({ ...r });
  }
  return out;
}
