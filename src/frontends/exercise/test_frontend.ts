/**
 * A test front end that drives a ring the way a guest's blkfront does: it
 * picks data pages itself (contiguous or scattered, first segment starting
 * mid-page), fills segments, uses indirect requests for large transfers,
 * keeps `depth` requests in flight, and verifies every read against a model
 * of what it wrote. Used by tests, `blktap exercise` and bench/ring.sh.
 *
 * Model: each sector written holds a pattern derived from (sector, tag);
 * the model keeps the tag per sector. Sectors this run has not written hold
 * what the disk held before it ({@linkcode TAG_INITIAL}: verified as zeros
 * when the caller says the disk started zeroed, else not checked). A
 * discarded sector reads as zeros or as what it held before the discard,
 * and may go from one to the other until it is written again (a driver may
 * ignore the hint; a restarted disk process may replay an older write over
 * it): both are accepted, nothing else. Requests in flight never overlap,
 * so the model is exact, and a run can hand it back
 * ({@linkcode LoadOptions.returnModel}) for the caller to check the whole
 * disk by another way (the image file, read by QEMU).
 * @module
 */
import * as B from "../../ring/blkif.ts";
import type { Segment } from "../../ring/request.ts";
import type { RingDisk } from "../../ring/ring_disk.ts";

/** Knobs of a load run. */
export interface LoadOptions {
  /** Stop after this many requests (default: by duration). */
  requests?: number;
  /** Stop after this long (default 10 s when no request count). */
  durationMs?: number;
  /** Requests in flight. */
  depth: number;
  /** Direct request sizes, bytes (multiples of 512): 1 KiB..44 KiB by default. */
  minBytes?: number;
  maxBytes?: number;
  /** Share of requests that are indirect (up to `indirectMaxBytes`). */
  indirectFraction?: number;
  indirectMaxBytes?: number;
  /** Share of reads among reads and writes (default 0.5). */
  readFraction?: number;
  /** Share of flushes and of discards (default 0.005 each). */
  flushFraction?: number;
  discardFraction?: number;
  /** Verify reads against the model (default true). */
  verify?: boolean;
  /**
   * Page-aligned I/O, as a guest with 4 KiB pages issues it: offsets in
   * whole pages, segments start at sector 0 of contiguous pages (benchmarks;
   * O_DIRECT without a bounce).
   */
  aligned?: boolean;
  /** Stop early once this many requests failed (default: never). */
  maxErrors?: number;
  /** Only touch the first `regionBytes` of the disk (default: all of it). */
  regionBytes?: number;
  /** The disk is all zeros before the run: reads of sectors not written yet are verified too. */
  initialZero?: boolean;
  /** Return the final model in {@linkcode LoadResult.model}. */
  returnModel?: boolean;
  seed: number;
}

/** Model tag of a sector this run has not changed: what the disk held before the run. */
export const TAG_INITIAL = 0;
/** Model tag of a discarded sector: zeros, or what it held before (its `before` tag). */
export const TAG_DISCARDED = 0xfffffffd;
/** Model tag of a sector known to read as zeros. */
export const TAG_ZERO = 0xfffffffe;
/** Model tag of a sector whose content is not known (a failed write or discard). */
export const TAG_UNKNOWN = 0xffffffff;

/**
 * The model as runs `[firstSector, sectors, tag, before]`: a write tag
 * (below {@linkcode TAG_DISCARDED}) counts up by one per sector, a special
 * tag stays; `before` (discarded runs only) is the tags the sectors had
 * before the discard, by the same rule. Sectors outside every run are
 * {@linkcode TAG_INITIAL}.
 */
export type ModelRun = [number, number, number, number?];

/** Whether `tag` is a write's (its sectors' tags count up). */
export function isWriteTag(tag: number): boolean {
  return tag !== TAG_INITIAL && tag < TAG_DISCARDED;
}

/** The tag of sector `first + i` in a run starting with `tag`. */
export function tagAt(tag: number, i: number): number {
  return isWriteTag(tag) ? tag + i : tag;
}

/** What a load run saw. */
export interface LoadResult {
  seed: number;
  requests: number;
  reads: number;
  writes: number;
  flushes: number;
  discards: number;
  indirect: number;
  bytes: number;
  /** Requests answered with a non-OKAY status. */
  errors: number;
  /** Sectors read back different from the model. */
  mismatches: number;
  /** Sectors whose content was checked. */
  verifiedSectors: number;
  elapsedMs: number;
  requestsPerSecond: number;
  firstError?: string;
  /** The final model, when asked for (sector runs of the region). */
  model?: ModelRun[];
}

/** mulberry32: small, seedable, fast; uniform in [0, 1). */
export function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    let t = (state = (state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const WORDS_PER_SECTOR = B.SECTOR_BYTES / 4;

function patternWord(sector: number, tag: number, k: number): number {
  return (Math.imul(tag, 0x9e3779b1) ^ Math.imul(sector + k, 0x85ebca6b) ^ k) >>> 0;
}

/** What sector `sector` holds after a write this front end tagged `tag` (512 bytes). */
export function sectorPattern(sector: number, tag: number): Uint8Array {
  const words = new Uint32Array(WORDS_PER_SECTOR);
  for (let k = 0; k < WORDS_PER_SECTOR; k += 1) words[k] = patternWord(sector, tag, k);
  return new Uint8Array(words.buffer);
}

/** The tag of every sector, as runs (see {@linkcode ModelRun}). */
export function modelRuns(tags: Uint32Array, before: Uint32Array): ModelRun[] {
  const runs: ModelRun[] = [];
  let run: ModelRun | undefined;
  for (let sector = 0; sector < tags.length; sector += 1) {
    const tag = tags[sector];
    const n = run ? sector - run[0] : 0;
    const continues = run !== undefined && run[0] + run[1] === sector &&
      tag === tagAt(run[2], n) &&
      (tag !== TAG_DISCARDED || before[sector] === tagAt(run[3]!, n));
    if (continues) run![1] += 1;
    else if (tag === TAG_INITIAL) run = undefined;
    else {
      run = tag === TAG_DISCARDED ? [sector, 1, tag, before[sector]] : [sector, 1, tag];
      runs.push(run);
    }
  }
  return runs;
}

interface Job {
  kind: "read" | "write";
  sector: number;
  sectors: number;
  segments: Segment[];
  /** Pool page runs to free afterwards: [first, count]. */
  runs: [number, number][];
}

/** Runs one load; resolves when it is done. */
export class TestFrontend {
  readonly #disk: RingDisk;
  readonly #o:
    & Required<Omit<LoadOptions, "requests" | "durationMs">>
    & Pick<LoadOptions, "requests" | "durationMs">;
  readonly #random: () => number;
  readonly #tags: Uint32Array;
  /** For discarded sectors: the tag they had before. */
  readonly #before: Uint32Array;
  readonly #busy: Uint8Array;
  readonly #poolWords: Uint32Array;
  #nextTag = 1;
  #issued = 0;
  #deadline = Infinity;
  readonly #result: LoadResult;

  constructor(disk: RingDisk, options: LoadOptions) {
    this.#disk = disk;
    const region = Math.min(options.regionBytes ?? disk.sizeBytes, disk.sizeBytes);
    this.#o = {
      minBytes: 1024,
      maxBytes: 44 * 1024,
      indirectFraction: 0,
      indirectMaxBytes: 1 << 20,
      readFraction: 0.5,
      flushFraction: 0.005,
      discardFraction: 0.005,
      verify: true,
      maxErrors: Infinity,
      aligned: false,
      initialZero: false,
      returnModel: false,
      ...options,
      regionBytes: region,
    };
    this.#random = prng(options.seed);
    const sectors = Math.floor(region / B.SECTOR_BYTES);
    this.#tags = new Uint32Array(sectors);
    this.#before = new Uint32Array(sectors);
    this.#busy = new Uint8Array(sectors);
    this.#poolWords = new Uint32Array(
      disk.pool.buffer,
      disk.pool.byteOffset,
      disk.pool.byteLength / 4,
    );
    this.#result = {
      seed: options.seed,
      requests: 0,
      reads: 0,
      writes: 0,
      flushes: 0,
      discards: 0,
      indirect: 0,
      bytes: 0,
      errors: 0,
      mismatches: 0,
      verifiedSectors: 0,
      elapsedMs: 0,
      requestsPerSecond: 0,
    };
  }

  /** Runs `depth` workers until the request count or the deadline. */
  async run(): Promise<LoadResult> {
    const started = performance.now();
    if (this.#o.requests === undefined) this.#deadline = started + (this.#o.durationMs ?? 10_000);
    const workers = Array.from({ length: this.#o.depth }, () => this.#worker());
    await Promise.all(workers);
    const r = this.#result;
    r.elapsedMs = performance.now() - started;
    r.requestsPerSecond = Math.round((r.requests * 1000) / Math.max(r.elapsedMs, 1));
    if (this.#o.returnModel) r.model = modelRuns(this.#tags, this.#before);
    return r;
  }

  // A disk whose driver cannot discard answers EOPNOTSUPP: it gets no discards.
  get #discardFraction(): number {
    return this.#disk.capabilities.canDiscard ? this.#o.discardFraction : 0;
  }

  #more(): boolean {
    if (this.#result.errors >= this.#o.maxErrors) return false;
    if (this.#o.requests !== undefined) return this.#issued < this.#o.requests;
    return performance.now() < this.#deadline;
  }

  async #worker(): Promise<void> {
    while (this.#more()) {
      this.#issued += 1;
      const roll = this.#random();
      if (roll < this.#o.flushFraction) await this.#flush();
      else if (roll < this.#o.flushFraction + this.#discardFraction) await this.#discard();
      else await this.#readOrWrite();
    }
  }

  #record(status: number, what: string): void {
    this.#result.requests += 1;
    if (status !== B.BLKIF_RSP_OKAY) {
      this.#result.errors += 1;
      this.#result.firstError ??= `${what}: status ${status}`;
    }
  }

  async #flush(): Promise<void> {
    this.#result.flushes += 1;
    this.#record(await this.#disk.producer.submitFlush(), "flush");
  }

  async #discard(): Promise<void> {
    const range = await this.#pickRange(1 + Math.floor(this.#random() * 256));
    this.#result.discards += 1;
    const { sector, sectors } = range;
    try {
      const status = await this.#disk.producer.submitDiscard(sector, sectors);
      this.#record(status, "discard");
      for (let s = sector; s < sector + sectors; s += 1) {
        if (status !== B.BLKIF_RSP_OKAY) this.#tags[s] = TAG_UNKNOWN;
        else if (this.#tags[s] !== TAG_DISCARDED) {
          this.#before[s] = this.#tags[s];
          this.#tags[s] = TAG_DISCARDED;
        }
      }
    } finally {
      this.#busy.fill(0, sector, sector + sectors);
    }
  }

  async #readOrWrite(): Promise<void> {
    const indirect = this.#random() < this.#o.indirectFraction;
    const maxBytes = indirect ? this.#o.indirectMaxBytes : this.#o.maxBytes;
    const minBytes = indirect ? this.#o.maxBytes + B.SECTOR_BYTES : this.#o.minBytes;
    if (indirect && maxBytes > B.indirect_segments_max * B.PAGE_BYTES) {
      throw new RangeError("indirect size");
    }
    let sectors = this.#randomSectors(minBytes, maxBytes);
    if (this.#o.aligned) sectors = Math.ceil(sectors / B.SECTORS_PER_PAGE) * B.SECTORS_PER_PAGE;
    const range = await this.#pickRange(sectors);
    const kind = this.#random() < this.#o.readFraction ? "read" : "write";
    const job = await this.#layout(kind, range.sector, sectors, indirect);
    try {
      await this.#runJob(job);
    } finally {
      for (const [first, count] of job.runs) this.#disk.pages.release(first, count);
      this.#busy.fill(0, range.sector, range.sector + sectors);
    }
  }

  #randomSectors(minBytes: number, maxBytes: number): number {
    const lo = Math.max(1, Math.ceil(minBytes / B.SECTOR_BYTES));
    const hi = Math.max(lo, Math.floor(maxBytes / B.SECTOR_BYTES));
    return lo + Math.floor(this.#random() * (hi - lo + 1));
  }

  // A random sector range not overlapping any request in flight.
  async #pickRange(sectors: number): Promise<{ sector: number; sectors: number }> {
    const total = this.#tags.length;
    sectors = Math.min(sectors, total);
    const step = this.#o.aligned ? B.SECTORS_PER_PAGE : 1;
    for (let attempt = 0;; attempt += 1) {
      const sector = Math.floor(this.#random() * Math.floor((total - sectors) / step + 1)) * step;
      if (this.#busy.subarray(sector, sector + sectors).every((b) => b === 0)) {
        this.#busy.fill(1, sector, sector + sectors);
        return { sector, sectors };
      }
      if (attempt % 8 === 7) await new Promise((resolve) => setTimeout(resolve, 0));
    }
  }

  // Chooses pages and segments as blkfront would for a bio.
  async #layout(
    kind: Job["kind"],
    sector: number,
    sectors: number,
    indirect: boolean,
  ): Promise<Job> {
    const aligned = this.#o.aligned;
    let firstSect = aligned || this.#random() < 0.5
      ? 0
      : Math.floor(this.#random() * B.SECTORS_PER_PAGE);
    // An indirect request holds at most indirect_segments_max pages.
    if (Math.ceil((firstSect + sectors) / B.SECTORS_PER_PAGE) > B.indirect_segments_max) {
      firstSect = 0;
    }
    const pageCount = Math.ceil((firstSect + sectors) / B.SECTORS_PER_PAGE);
    const scattered = !aligned && this.#random() < 0.3;
    const runs: [number, number][] = [];
    const pages: number[] = [];
    if (scattered) {
      for (let i = 0; i < pageCount; i += 1) {
        const page = await this.#disk.pages.allocateWait(1);
        runs.push([page, 1]);
        pages.push(page);
      }
    } else {
      const first = await this.#disk.pages.allocateWait(pageCount);
      runs.push([first, pageCount]);
      for (let i = 0; i < pageCount; i += 1) pages.push(first + i);
    }
    const segments: Segment[] = [];
    let left = sectors;
    pages.forEach((gref, i) => {
      const first = i === 0 ? firstSect : 0;
      const last = Math.min(B.SECTORS_PER_PAGE - 1, first + left - 1);
      segments.push({ gref, firstSect: first, lastSect: last });
      left -= last - first + 1;
    });
    if (indirect) this.#result.indirect += 1;
    return { kind, sector, sectors, segments, runs };
  }

  async #runJob(job: Job): Promise<void> {
    if (job.kind === "write") this.#fill(job);
    const op = job.kind === "read" ? B.BLKIF_OP_READ : B.BLKIF_OP_WRITE;
    const status = await this.#disk.producer.submitRw(op, job.sector, job.segments);
    this.#record(status, `${job.kind} ${job.sector}+${job.sectors}`);
    this.#result.bytes += job.sectors * B.SECTOR_BYTES;
    if (job.kind === "read") {
      this.#result.reads += 1;
      if (status === B.BLKIF_RSP_OKAY && this.#o.verify) this.#check(job);
    } else {
      this.#result.writes += 1;
      // A failed write leaves the range unknown.
      if (status !== B.BLKIF_RSP_OKAY) {
        this.#tags.fill(TAG_UNKNOWN, job.sector, job.sector + job.sectors);
      }
    }
  }

  // Visits each sector of the job: (disk sector, word index in the pool).
  #forEachSector(job: Job, visit: (sector: number, word: number) => void): void {
    let sector = job.sector;
    for (const s of job.segments) {
      for (let k = s.firstSect; k <= s.lastSect; k += 1) {
        visit(sector, (s.gref * B.PAGE_BYTES + k * B.SECTOR_BYTES) / 4);
        sector += 1;
      }
    }
  }

  #fill(job: Job): void {
    const words = this.#poolWords;
    const verify = this.#o.verify;
    this.#forEachSector(job, (sector, word) => {
      const tag = this.#nextTag++;
      if (tag >= TAG_DISCARDED) throw new RangeError("model tags exhausted: run fewer requests");
      if (verify) {
        for (let k = 0; k < WORDS_PER_SECTOR; k += 1) words[word + k] = patternWord(sector, tag, k);
      }
      this.#tags[sector] = tag;
    });
  }

  #check(job: Job): void {
    this.#forEachSector(job, (sector, word) => this.#compare(sector, word));
  }

  // The content a model tag stands for: a write tag, 0 for zeros, undefined when not known.
  #content(tag: number): number | undefined {
    if (tag === TAG_UNKNOWN) return undefined;
    if (tag === TAG_INITIAL) return this.#o.initialZero ? 0 : undefined;
    return tag === TAG_ZERO ? 0 : tag;
  }

  #isZero(word: number): boolean {
    for (let k = 0; k < WORDS_PER_SECTOR; k += 1) if (this.#poolWords[word + k] !== 0) return false;
    return true;
  }

  #holds(sector: number, word: number, content: number): boolean {
    if (content === 0) return this.#isZero(word);
    for (let k = 0; k < WORDS_PER_SECTOR; k += 1) {
      if (this.#poolWords[word + k] !== patternWord(sector, content, k)) return false;
    }
    return true;
  }

  // Compares the sector read into the pool at `word` with the model.
  #compare(sector: number, word: number): void {
    const tag = this.#tags[sector];
    const discarded = tag === TAG_DISCARDED;
    // Discarded: zeros or what it held before; if that is not known, anything.
    const content = this.#content(discarded ? this.#before[sector] : tag);
    if (content === undefined) return;
    this.#result.verifiedSectors += 1;
    if (this.#holds(sector, word, content) || (discarded && this.#isZero(word))) return;
    this.#result.mismatches += 1;
    this.#result.firstError ??= `mismatch at sector ${sector} (expected ${
      discarded ? "zeros or " : ""
    }${content === 0 ? "zeros" : `tag ${content}`})`;
    this.#tags[sector] = TAG_UNKNOWN; // reported once, not at every later read
  }
}
