/**
 * The header fields an open qcow2 image changes: the dirty bit (set before
 * the first refcount change, cleared at a clean close), the autoclear bits
 * (cleared before the first write: we keep no bitmaps consistent, as the
 * spec asks of such writers) and the refcount table's place (when it
 * grows). All lie in the first 512-byte sector, so one sector write
 * changes them atomically even if torn; nothing else of the header
 * cluster (extensions, unknown fields, the backing name) is rewritten.
 * @module
 */
import type { ImageFile } from "../image_file.ts";
import {
  FIELD_AUTOCLEAR,
  FIELD_INCOMPATIBLE,
  FIELD_REFCOUNT_TABLE_OFFSET,
  INCOMPAT_DIRTY,
  setU64,
} from "./header.ts";
import type { Qcow2Image } from "./image.ts";
import type { GroupSync } from "../group_commit.ts";
import { observed } from "./observed.ts";

/** Writes the changing fields of one open image's header. */
export class HeaderFields {
  readonly #file: ImageFile;
  readonly #image: Qcow2Image;
  readonly #sync: GroupSync;
  #dirtied?: Promise<void>;

  constructor(file: ImageFile, image: Qcow2Image, sync: GroupSync) {
    this.#file = file;
    this.#image = image;
    this.#sync = sync;
  }

  /** Sets the dirty bit (v3) and clears the autoclear bits, durably, once. */
  markDirty(): Promise<void> {
    this.#dirtied ??= observed((async () => {
      const h = this.#image.header;
      if (h.version < 3) return;
      h.incompatible |= INCOMPAT_DIRTY;
      h.autoclear = 0n;
      await this.#write();
      await this.#sync.sync();
    })());
    return this.#dirtied;
  }

  /** Clears the dirty bit if this session set it (everything it covers is durable). */
  async markClean(): Promise<void> {
    if (!this.#dirtied || this.#image.header.version < 3) return;
    await this.#dirtied;
    this.#image.header.incompatible &= ~INCOMPAT_DIRTY;
    await this.#write();
    await this.#sync.sync();
  }

  /** Points the header at a new refcount table (written and durable already). */
  async setReftable(offsetBytes: number, clusters: number): Promise<void> {
    this.#image.header.refcountTableOffset = offsetBytes;
    this.#image.header.refcountTableClusters = clusters;
    await this.#write();
  }

  async #write(): Promise<void> {
    const h = this.#image.header;
    const sector = this.#image.head.slice(0, 512);
    const view = new DataView(sector.buffer);
    setU64(view, FIELD_REFCOUNT_TABLE_OFFSET, h.refcountTableOffset);
    view.setUint32(FIELD_REFCOUNT_TABLE_OFFSET + 8, h.refcountTableClusters);
    if (h.version === 3) {
      view.setBigUint64(FIELD_INCOMPATIBLE, h.incompatible);
      view.setBigUint64(FIELD_AUTOCLEAR, h.autoclear);
    }
    this.#image.head.set(sector);
    await this.#file.write(0, sector);
  }
}
