/**
 * L2 tables made for writing: a new table where the L1 entry has none, a
 * copy where the table is shared with a snapshot (no COPIED flag). One
 * preparation per L1 entry at a time, shared by every writer into it. The
 * table is written (zeros, or the copy) before any writer's barrier; the
 * first writer past its barrier points the L1 entry at it, and a copied
 * table's original loses a reference only behind a later barrier.
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import type { ClusterAllocator } from "./allocator.ts";
import type { MappingTables } from "./mapping.ts";
import { observed } from "./observed.ts";

/** A table to write entries into. */
export interface TablePrep {
  l1Index: number;
  offsetBytes: number;
  /** The table's content is in the file (and its refcount). */
  ready: Promise<void>;
  /** The old table (copy-on-write), freed once the new L1 entry is durable. */
  oldOffsetBytes: number;
  /** A new table in a fresh hole: it reads as empty whether or not its zeros are durable. */
  orderFree: boolean;
  /** The L1 entry's write, once linked. */
  linked?: Promise<void>;
}

/** The preparations of one open image. */
export class TablePreps {
  readonly #file: ImageFile;
  readonly #tables: MappingTables;
  readonly #allocator: ClusterAllocator;
  readonly #preps = new Map<number, Promise<TablePrep>>();

  constructor(file: ImageFile, tables: MappingTables, allocator: ClusterAllocator) {
    this.#file = file;
    this.#tables = tables;
    this.#allocator = allocator;
  }

  /**
   * The table to write entries of L1 entry `l1Index` into: the existing one
   * when it is ours alone (`table`, as the caller validated it), else a new
   * or copied one.
   */
  async forWrite(
    l1Index: number,
    table: { offsetBytes: number; copied: boolean },
  ): Promise<TablePrep> {
    if (table.offsetBytes !== 0 && table.copied) {
      return {
        l1Index,
        offsetBytes: table.offsetBytes,
        ready: Promise.resolve(),
        oldOffsetBytes: 0,
        orderFree: true,
        linked: Promise.resolve(),
      };
    }
    let prep = this.#preps.get(l1Index);
    if (!prep) {
      prep = observed(this.#prepare(l1Index, table.offsetBytes));
      this.#preps.set(l1Index, prep);
      prep.catch(() => this.#preps.delete(l1Index));
    }
    return await prep;
  }

  async #prepare(l1Index: number, oldOffset: number): Promise<TablePrep> {
    const c = this.#tables.g.clusterBytes;
    const [run] = await this.#allocator.allocate(1);
    const offsetBytes = run.start * c;
    const content = new Uint8Array(c);
    if (oldOffset !== 0) {
      if (this.#tables.deferred) await this.#tables.settleTable(oldOffset);
      await this.#file.read(oldOffset, content);
    }
    const write = observed(this.#file.write(offsetBytes, content));
    const ready = observed(Promise.all([write, run.ready]).then(() => {}));
    await this.#tables.installTable(offsetBytes, content, ready);
    const orderFree = run.fresh && oldOffset === 0;
    return { l1Index, offsetBytes, ready, oldOffsetBytes: oldOffset, orderFree };
  }

  /** Points the L1 entry at a prepared table (the first caller past a barrier); its write. */
  link(prep: TablePrep): Promise<void> {
    if (!prep.linked) {
      prep.linked = observed(this.#tables.setL1(prep.l1Index, prep.offsetBytes));
      this.#preps.delete(prep.l1Index);
      const old = prep.oldOffsetBytes;
      if (old !== 0) {
        const cluster = old / this.#tables.g.clusterBytes;
        prep.linked.then(() => this.#allocator.freeLater(cluster, 1), () => {});
      }
    }
    return prep.linked;
  }
}
