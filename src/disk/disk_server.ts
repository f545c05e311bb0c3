/**
 * The back end of one disk (DESIGN.md §3): consumes requests from the blkif
 * ring, validates them, runs them on the driver, writes responses and
 * publishes them with notification suppression. Independent of how the
 * ring is mapped and how kicks travel, so tests can run it in-process.
 *
 * Batching: the requests of one pass (all there are, or at most
 * `passRequestsMax`) are started in the same JavaScript turn, so the aio
 * layer submits them with one `io_submit`; responses completed in one turn
 * are published with one push (one kick).
 * Ordering: FLUSH_DISKCACHE and WRITE_BARRIER wait until every earlier
 * request has completed, and later requests wait for them.
 *
 * Kicks: with at least `busy_requests_min` requests running, the server does
 * not ask to be kicked for new ones (req_event stays where it was): each
 * completion looks at the ring anyway, soon enough to keep the disk busy,
 * and the front end saves a wake-up of this process per batch. Below that
 * it arms req_event as blkback does when it goes idle.
 *
 * Responses: published with Xen's rsp_event rule, and always notified when
 * nothing is left running — a front end may ask to be told only after a
 * batch of responses (src/ring/ring_producer.ts), which a disk holding
 * requests back (QoS, pause) would otherwise never complete.
 * @module
 */
import * as B from "../ring/blkif.ts";
import { BackRing, type Fence } from "../ring/ring.ts";
import { type BlockDriver, BlockError } from "../formats/driver.ts";
import { encodeBlockStatusReply } from "../ring/block_status.ts";
import { DiskCounters, type DiskStats } from "./counters.ts";
import { TokenBucket } from "./token_bucket.ts";
import {
  isRejected,
  type ParsedRequest,
  parseRequest,
  type ValidationContext,
} from "./validate.ts";

/** QoS settings; 0 = unlimited. */
export interface QosSettings {
  maxIops: number;
  maxBps: number;
  /** Bucket depth in milliseconds of the rate. */
  burstMs: number;
}

/** What a DiskServer serves. */
export interface DiskServerOptions {
  ring: Uint8Array;
  pool: Uint8Array;
  fence: Fence;
  driver: BlockDriver;
  readOnly: boolean;
  /** Called when responses were published and the front end asked to be told. */
  notify: () => void;
  /** Bound on requests running at once (at most the ring size). */
  maxInflightRequests?: number;
  qos?: QosSettings;
  log?: (message: string) => void;
  /** Where to count (a minor's stats file); private counters by default. */
  counters?: DiskCounters;
  /**
   * Most requests taken from the ring per pass (default: all there are);
   * {@linkcode submit_chunk_requests} where the device works while this
   * thread parses the next chunk.
   */
  passRequestsMax?: number;
}

/** Default in-flight bound: a whole 128-entry ring. */
export const max_inflight_requests_default = 128;

/** Requests running from which completions, not kicks, bring new requests in. */
export const busy_requests_min = 8;

/**
 * Requests per pass for a disk whose I/O runs in the device (O_DIRECT): the
 * next pass follows at once, after the aio layer submitted this one's. A
 * front end's 32 then reach the device in chunks, the first while the rest
 * are still parsed (~2-4 µs each), instead of one convoy that leaves the
 * device idle while the ring turns it around (bench/results/ring-subchunk-ab-*:
 * device busy 28% of the time vs 88% under fio). Through the page cache the
 * submit itself copies the data: nothing overlaps, and chunks would only
 * add submits and response pushes (see {@linkcode DiskServerOptions.passRequestsMax}).
 */
export const submit_chunk_requests = 8;

/** Serves one ring. */
export class DiskServer {
  readonly counters: DiskCounters;
  readonly #back: BackRing;
  readonly #ringView: DataView;
  readonly #options: DiskServerOptions;
  readonly #maxInflight: number;
  readonly #passRequestsMax: number;
  #driver: BlockDriver;
  #ctx: ValidationContext;
  #inflight = 0;
  /** A request taken from the ring that cannot start yet (ordering or QoS). */
  #held: ParsedRequest | undefined;
  /** A flush or barrier is running: nothing else starts. */
  #ordering = false;
  #paused = false;
  #pumpScheduled = false;
  #pushScheduled = false;
  #qosTimer: ReturnType<typeof setTimeout> | undefined;
  #iops: TokenBucket;
  #bps: TokenBucket;
  #idleWaiters: (() => void)[] = [];
  #stopped = false;

  constructor(options: DiskServerOptions) {
    this.#options = options;
    this.counters = options.counters ?? new DiskCounters();
    this.counters.inflight = 0;
    this.#back = new BackRing(options.ring, options.fence);
    this.#ringView = this.#back.sring.view;
    this.#maxInflight = Math.min(
      options.maxInflightRequests ?? max_inflight_requests_default,
      this.#back.entries,
    );
    this.#passRequestsMax = options.passRequestsMax ?? Infinity;
    if (!(this.#passRequestsMax >= 1)) {
      throw new RangeError(`passRequestsMax ${options.passRequestsMax}: at least 1`);
    }
    this.#driver = options.driver;
    this.#ctx = this.#context(options.driver);
    [this.#iops, this.#bps] = makeBuckets(options.qos);
  }

  #context(driver: BlockDriver): ValidationContext {
    const pool = this.#options.pool;
    return {
      pool,
      poolPages: Math.floor(pool.byteLength / B.PAGE_BYTES),
      sizeBytes: driver.sizeBytes,
      readOnly: this.#options.readOnly || !driver.capabilities.canWrite,
    };
  }

  get driver(): BlockDriver {
    return this.#driver;
  }

  /** The front end kicked: look at the ring soon. */
  kick(): void {
    if (this.#pumpScheduled || this.#stopped) return;
    this.#pumpScheduled = true;
    queueMicrotask(() => {
      this.#pumpScheduled = false;
      try {
        this.#pump();
      } catch (error) {
        // A front end breaking the ring protocol: blkback disconnects; we stop.
        this.#options.log?.(`ring: ${error}; serving stopped`);
        this.stop();
      }
    });
  }

  #pump(): void {
    if (this.#stopped) return;
    let taken = 0;
    for (;;) {
      if (!this.#startHeld()) break;
      while (this.#canStart() && this.#back.unconsumedRequests() > 0) {
        if (taken === this.#passRequestsMax) {
          // The started ones are submitted first (their submit is already queued).
          this.kick();
          return;
        }
        taken += 1;
        const offset = this.#back.takeRequestOffset();
        const parsed = parseRequest(this.#ringView, offset, this.#ctx);
        if (isRejected(parsed)) {
          this.counters.rejected();
          this.#respond(parsed.id, parsed.operation, parsed.status);
          continue;
        }
        this.#held = parsed;
        if (!this.#startHeld()) break;
      }
      if (!this.#canStart() || this.#held) break;
      // Busy: the next completion pumps again (see the module comment).
      if (this.#inflight >= busy_requests_min) break;
      if (!this.#back.finalCheckForRequests()) break;
    }
    this.#checkIdle();
  }

  #canStart(): boolean {
    return !this.#paused && !this.#ordering && this.#inflight < this.#maxInflight && !this.#stopped;
  }

  // Starts the held request if ordering and QoS allow; false if it must wait.
  #startHeld(): boolean {
    const request = this.#held;
    if (!request) return true;
    if (!this.#canStart()) return false;
    const isOrdering = request.kind === "flush" || request.kind === "barrier";
    if (isOrdering && this.#inflight > 0) return false;
    const bytes = movedBytes(request);
    const waitMs = Math.max(this.#iops.waitMs(1), this.#bps.waitMs(bytes));
    if (waitMs > 0) {
      this.#qosTimer ??= setTimeout(() => {
        this.#qosTimer = undefined;
        this.kick();
      }, waitMs);
      return false;
    }
    this.#iops.take(1);
    this.#bps.take(bytes);
    this.#held = undefined;
    if (isOrdering) this.#ordering = true;
    this.#start(request);
    return true;
  }

  #start(request: ParsedRequest): void {
    this.counters.inflight = ++this.#inflight;
    const started = performance.now();
    this.#execute(request).then(
      () => this.#finish(request, started, B.BLKIF_RSP_OKAY),
      (error) => {
        const code = (error as { code?: string }).code;
        // A driver without extents or discard gives an expected answer, not a fault.
        if (code !== "EOPNOTSUPP" || !["block-status", "discard"].includes(request.kind)) {
          this.#options.log?.(
            `request ${request.kind} ${request.offsetBytes}+${request.lengthBytes}: ${error}`,
          );
        }
        this.#finish(
          request,
          started,
          code === "EOPNOTSUPP" ? B.BLKIF_RSP_EOPNOTSUPP : B.BLKIF_RSP_ERROR,
        );
      },
    );
  }

  #finish(request: ParsedRequest, started: number, status: number): void {
    if (this.#stopped) return; // the ring may belong to a successor now
    this.counters.inflight = --this.#inflight;
    if (request.kind === "flush" || request.kind === "barrier") this.#ordering = false;
    const latencyUs = (performance.now() - started) * 1000;
    this.counters.complete(
      request.kind,
      request.lengthBytes,
      latencyUs,
      status === B.BLKIF_RSP_OKAY,
    );
    this.#respond(request.id, request.operation, status);
    this.kick();
  }

  async #execute(request: ParsedRequest): Promise<void> {
    const driver = this.#driver;
    switch (request.kind) {
      case "read":
        return await readInto(driver, request.offsetBytes, request.buffers);
      case "write":
        return await writeFrom(driver, request.offsetBytes, request.buffers);
      case "discard":
        return await driver.discard(request.offsetBytes, request.lengthBytes);
      case "block-status":
        return await blockStatusInto(driver, request);
      case "flush":
      case "barrier":
        // Xen: a flush/barrier carrying data is a preflush, the write, then
        // durable before completion.
        await driver.flush();
        if (request.lengthBytes > 0) {
          await writeFrom(driver, request.offsetBytes, request.buffers);
          await driver.flush();
        }
    }
  }

  #respond(id: bigint, operation: number, status: number): void {
    this.#back.putResponse(id, operation, status);
    if (this.#pushScheduled) return;
    this.#pushScheduled = true;
    queueMicrotask(() => {
      this.#pushScheduled = false;
      // Nothing left running: no later push may reach a front end's batched
      // rsp_event (requests held for QoS or a pause), so tell it now.
      const idle = this.#inflight === 0;
      if (this.#back.pushResponsesAndCheckNotify() || idle) this.#options.notify();
    });
  }

  #checkIdle(): void {
    if (this.#inflight > 0 || this.#ordering) return;
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const w of waiters) w();
  }

  /**
   * The req_prod value this server has dealt with: its req_cons while it can
   * take requests (a different req_prod means requests to take), else the
   * current req_prod (what it cannot take yet need not wake it; a
   * completion or resume looks again). For a waiter watching the ring.
   */
  get seenRequestIndex(): number {
    if (this.#canStart() && !this.#held) return this.#back.reqCons;
    return this.#back.sring.reqProd;
  }

  /** Number of requests running. */
  get inflight(): number {
    return this.#inflight;
  }

  stats(): DiskStats {
    return this.counters.snapshot();
  }

  /** Quiesces: no new request starts; resolves once in-flight ones drained and data is flushed. */
  async pause(): Promise<void> {
    this.#paused = true;
    if (this.#inflight > 0 || this.#ordering) {
      await new Promise<void>((resolve) => this.#idleWaiters.push(resolve));
    }
    await this.#driver.flush().catch(() => {});
  }

  /** Resumes serving, optionally on a new driver (the old one is the caller's to close). */
  resume(driver?: BlockDriver): void {
    if (driver) this.replaceDriver(driver);
    this.#paused = false;
    this.kick();
  }

  /** Whether `pause` holds new requests back. */
  get paused(): boolean {
    return this.#paused;
  }

  /** Serves `driver` from now on, paused or not as before (the old one is the caller's to close). */
  replaceDriver(driver: BlockDriver): void {
    this.#driver = driver;
    this.#ctx = this.#context(driver);
  }

  /** Changes QoS limits. */
  setQos(qos: QosSettings): void {
    [this.#iops, this.#bps] = makeBuckets(qos);
    this.kick();
  }

  /** Stops serving: nothing more is read from or written to the ring. */
  stop(): void {
    this.#stopped = true;
    if (this.#qosTimer !== undefined) clearTimeout(this.#qosTimer);
  }
}

function makeBuckets(qos: QosSettings | undefined): [TokenBucket, TokenBucket] {
  const burstS = (qos?.burstMs ?? 1000) / 1000;
  const iops = qos?.maxIops ?? 0;
  const bps = qos?.maxBps ?? 0;
  return [
    new TokenBucket(iops, Math.ceil(iops * burstS)),
    new TokenBucket(bps, Math.ceil(bps * burstS)),
  ];
}

// Block status moves no data (its length is the range asked about): QoS
// charges it an operation, not bytes.
function movedBytes(request: ParsedRequest): number {
  return request.kind === "block-status" ? 0 : request.lengthBytes;
}

// Only the disk process may answer: it owns the image's metadata (qcow's
// L2 tables are cached write-back until flush). A driver without extents
// answers EOPNOTSUPP and the front end reports everything as data.
async function blockStatusInto(driver: BlockDriver, request: ParsedRequest): Promise<void> {
  if (!driver.capabilities.canExtents) {
    throw new BlockError("EOPNOTSUPP", `${driver.path}: no block status`);
  }
  const extents = await driver.blockStatus(request.offsetBytes, request.lengthBytes);
  const [page] = request.buffers;
  encodeBlockStatusReply(page, extents, request.offsetBytes, request.lengthBytes);
}

async function readInto(
  driver: BlockDriver,
  offsetBytes: number,
  buffers: Uint8Array[],
): Promise<void> {
  if (buffers.length === 1) return await driver.read(offsetBytes, buffers[0]);
  // Segments in non-adjacent pool pages: one vectored read where the driver has one.
  if (driver.readv) return await driver.readv(offsetBytes, buffers);
  const bounce = new Uint8Array(buffers.reduce((n, b) => n + b.byteLength, 0));
  await driver.read(offsetBytes, bounce);
  let at = 0;
  for (const b of buffers) {
    b.set(bounce.subarray(at, at + b.byteLength));
    at += b.byteLength;
  }
}

async function writeFrom(
  driver: BlockDriver,
  offsetBytes: number,
  buffers: Uint8Array[],
): Promise<void> {
  if (buffers.length === 1) return await driver.write(offsetBytes, buffers[0]);
  if (driver.writev) return await driver.writev(offsetBytes, buffers);
  const bounce = new Uint8Array(buffers.reduce((n, b) => n + b.byteLength, 0));
  let at = 0;
  for (const b of buffers) {
    bounce.set(b, at);
    at += b.byteLength;
  }
  await driver.write(offsetBytes, bounce);
}
