/**
/**
 * One minor inside ctrl: its front end (ctrl's shared-memory ring with its
 * {@linkcode RingDisk}, or a kernel minor: ./minor_frontend.ts) and the
 * supervision of its disk process. When the process exits without being
 * asked to, the minor re-arms the ring with every unanswered request and
 * starts a new process on it; a disk that crashes more than `restartLimit`
 * times within `restartWindowMs` is marked failed and its requests are
 * answered with ERROR.
 *
 * Counters: each disk process counts in the minor's stats file (shared
 * memory, so a killed process's counts stay readable); before the next
 * process starts, the minor folds them into the totals since create kept
 * in the registry, so totals survive disk-process and ctrl restarts.
 * @module
 */
import { type Logger, logLevel } from "../cli/log.ts";
import { selfCommandFor } from "../cli/self_command.ts";
import type { QosSettings } from "../disk/disk_server.ts";
import { addTotals, type DiskStats, emptyTotals, withDerived } from "../disk/counters.ts";
import type { StatsFile } from "../disk/stats_file.ts";
import type { AttachConfig } from "../disk/protocol.ts";
import type { DriverCapabilities } from "../formats/driver.ts";
import type { KickChannel } from "../ring/kick_channel.ts";
import type { MinorLifetime, MinorRecord } from "./registry.ts";
import type { RingDisk, ServedDisk } from "../ring/ring_disk.ts";
import { PageCache } from "../ring/page_cache.ts";
import { parseImageSpec } from "../formats/open_image.ts";
import type { MinorFrontend } from "./minor_frontend.ts";

/** Lifecycle of a minor as `blktap list` shows it. */
export type MinorState = "starting" | "running" | "paused" | "restarting" | "failed" | "destroyed";

/** Supervision policy. */
export interface SupervisionPolicy {
  restartLimit: number;
  restartWindowMs: number;
  /** Delay before a restart, so a crash loop does not spin. */
  restartDelayMs: number;
}

/** A disk process that is not serving this long after its start is killed (and restarted). */
export const disk_start_timeout_ms = 30_000;

/** Bound on a call to a disk process (stats, pause, resume). */
export const disk_call_timeout_ms = 30_000;

/** What the minor needs from ctrl. */
export interface MinorHost {
  diskSocketPath: string;
  /** ctrl's own `--allow-path` folders, for every minor. */
  allowPaths: string[];
  policy: SupervisionPolicy;
  log: Logger;
  /** The record changed (state, pid, image): persist the registry. */
  changed(): void;
}

/** An attached disk. */
export class Minor {
  readonly record: MinorRecord;
  readonly frontend: MinorFrontend;
  /** Where the disk process counts (see the module comment). */
  readonly statsFile: StatsFile;
  state: MinorState = "starting";
  readonly #host: MinorHost;
  #child: Deno.ChildProcess | undefined;
  #channel: KickChannel | undefined;
  #crashTimes: number[] = [];
  #nextSeq = 1;
  readonly #calls = new Map<
    number,
    { resolve: (m: Record<string, unknown>) => void; reject: (e: Error) => void }
  >();
  #readyWaiters: PromiseWithResolvers<void>[] = [];
  /** What the current disk process said it serves. */
  #served: ServedDisk | undefined;
  #destroying = false;
  failure: string | undefined;

  constructor(record: MinorRecord, host: MinorHost, frontend: MinorFrontend, statsFile: StatsFile) {
    this.record = record;
    record.statsPath = statsFile.path;
    record.lifetime ??= { restarts: 0, folded: emptyTotals(), foldedGeneration: 0 };
    this.#host = host;
    this.frontend = frontend;
    this.statsFile = statsFile;
  }

  /** The minor as a block device inside ctrl (NBD, the test front end); not for kernel minors. */
  get disk(): RingDisk | undefined {
    return this.frontend.disk;
  }

  get pid(): number | undefined {
    return this.#child?.pid;
  }

  get #lifetime(): MinorLifetime {
    return this.record.lifetime!;
  }

  /** Disk processes restarted after dying, since create (kept across ctrl restarts). */
  get restarts(): number {
    return this.#lifetime.restarts;
  }

  /** Starts a disk process; resolves once it reported ready (or the minor failed). */
  start(): Promise<void> {
    const waiter = Promise.withResolvers<void>();
    this.#readyWaiters.push(waiter);
    this.#spawn();
    return waiter.promise;
  }

  // The previous disk process's counts join the totals since create (saved
  // first, so a ctrl dying here counts them once), then the stats file is
  // zeroed for the next process.
  #beginProcessCounters(): void {
    const life = this.#lifetime;
    if (this.statsFile.generation > life.foldedGeneration) {
      life.folded = addTotals(life.folded, this.statsFile.counters.totals());
      life.foldedGeneration = this.statsFile.generation;
      this.#host.changed();
    }
    this.statsFile.reset(life.foldedGeneration + 1);
  }

  #spawn(): void {
    this.#beginProcessCounters();
    const child = selfCommandFor(
      ["disk", "--minor", String(this.record.minor), "--socket", this.#host.diskSocketPath],
      { stdin: "null", stdout: "null", stderr: "inherit", env: { BLKTAP_LOG_LEVEL: logLevel() } },
    ).spawn();
    this.#child = child;
    this.record.pid = child.pid;
    this.#host.changed();
    this.#host.log.debug(`minor ${this.record.minor}: disk process ${child.pid} started`);
    const startTimer = setTimeout(() => {
      if (this.#child !== child || this.state === "running" || this.state === "paused") return;
      this.#host.log.warn(
        `minor ${this.record.minor}: disk process ${child.pid} not ready, killing it`,
      );
      try {
        child.kill("SIGKILL");
      } catch {
        // gone
      }
    }, disk_start_timeout_ms);
    child.status.then((status) => {
      clearTimeout(startTimer);
      this.#exited(child, status);
    });
  }

  /** The disk process connected and said hello: send it its configuration. */
  connected(channel: KickChannel, pid: number): void {
    if (pid !== this.#child?.pid) {
      this.#host.log.warn(`minor ${this.record.minor}: hello from unexpected pid ${pid}`);
      const servedBy = this.#child ? `pid ${this.#child.pid}, started by ctrl` : "nobody now";
      channel.send({
        t: "refused",
        error:
          `minor ${this.record.minor} is served by ${servedBy}; ctrl starts its disk processes itself`,
      });
      channel.closeAfterSending();
      return;
    }
    this.#channel = channel;
    const r = this.record;
    const config: AttachConfig = {
      minor: r.minor,
      ...this.frontend.ring,
      image: r.image,
      probedRaw: r.probedRaw ?? false,
      allowPaths: [...this.#host.allowPaths, ...(r.allowPaths ?? [])],
      readOnly: r.readOnly,
      cache: r.cache,
      qos: r.qos,
      statsPath: this.statsFile.path,
    };
    channel.send({ t: "attach", ...config });
  }

  onKick(): void {
    this.frontend.onKick();
  }

  onMessage(message: Record<string, unknown>): void {
    if (message.t === "ready") {
      this.#ready(servedDisk(message));
    } else if (message.t === "reply") this.#reply(message);
    else if (message.t === "failed") this.failure = String(message.error);
  }

  /** The channel to the disk process closed (`channel` must be the current one). */
  onClose(channel?: KickChannel): void {
    if (channel && channel !== this.#channel) return;
    this.#channel = undefined;
    this.frontend.detach();
    for (const call of this.#calls.values()) call.reject(new Error("disk process went away"));
    this.#calls.clear();
  }

  async #ready(served: ServedDisk): Promise<void> {
    const channel = this.#channel!;
    this.record.sizeBytes = served.sizeBytes;
    try {
      this.frontend.attach(() => channel.kick(), served);
      this.#served = served;
    } catch (error) {
      this.failure = (error as Error).message;
      this.#child?.kill("SIGKILL");
      return;
    }
    if (this.record.paused) await this.#holdRequests().catch(() => {});
    else this.#readCached();
    this.state = this.record.paused ? "paused" : "running";
    this.failure = undefined;
    this.#host.changed();
    this.#host.log.info(
      `minor ${this.record.minor}: ${this.record.image} served by pid ${this.pid}`,
    );
    this.#settleWaiters();
  }

  #settleWaiters(error?: Error): void {
    const waiters = this.#readyWaiters;
    this.#readyWaiters = [];
    for (const w of waiters) error ? w.reject(error) : w.resolve();
  }

  #exited(child: Deno.ChildProcess, status: Deno.CommandStatus): void {
    if (child !== this.#child) return;
    this.#child = undefined;
    this.#channel?.close();
    this.onClose();
    if (this.#destroying) return;
    const how = status.signal ? `signal ${status.signal}` : `status ${status.code}`;
    if (this.state === "starting" && this.failure) {
      // Never served: an image that cannot be opened will not open on a retry.
      this.#markFailed(`disk process could not start (${how})`);
      return;
    }
    const now = Date.now();
    const { restartLimit, restartWindowMs, restartDelayMs } = this.#host.policy;
    this.#crashTimes = [...this.#crashTimes.filter((t) => now - t < restartWindowMs), now];
    if (this.#crashTimes.length > restartLimit) {
      this.#markFailed(
        `disk process died ${this.#crashTimes.length} times in ${
          restartWindowMs / 1000
        } s (last: ${how})`,
      );
      return;
    }
    const reissued = this.frontend.rearm();
    this.#lifetime.restarts += 1;
    this.state = "restarting";
    this.#host.log.warn(
      `minor ${this.record.minor}: disk process ${child.pid} died (${how}); restarting, ${reissued} requests to re-issue`,
    );
    setTimeout(() => {
      if (!this.#destroying && this.state === "restarting") this.#spawn();
    }, restartDelayMs);
  }

  /** Marks the minor failed without starting a disk process (an image ctrl will not open). */
  refuse(reason: string): void {
    this.#markFailed(reason);
  }

  #markFailed(reason: string): void {
    this.state = "failed";
    this.failure = this.failure ? `${reason}; ${this.failure}` : reason;
    try {
      this.frontend.fail();
    } catch (error) {
      this.#host.log.error(`minor ${this.record.minor}: ${(error as Error).message}`);
    }
    this.#host.log.error(`minor ${this.record.minor}: failed: ${this.failure}`);
    this.#host.changed();
    this.#settleWaiters(new Error(`minor ${this.record.minor} failed: ${this.failure}`));
  }

  /** Calls the disk process (`stats`, `pause`, `resume`, `qos`). */
  call(op: string, args: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
    const channel = this.#channel;
    if (!channel) return Promise.reject(new Error(`minor ${this.record.minor} is ${this.state}`));
    const seq = this.#nextSeq++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#calls.delete(seq);
        reject(new Error(`minor ${this.record.minor}: ${op} timed out`));
      }, disk_call_timeout_ms);
      this.#calls.set(seq, {
        resolve: (m) => (clearTimeout(timer), resolve(m)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      });
      channel.send({ t: "call", seq, op, ...args });
    });
  }

  #reply(message: Record<string, unknown>): void {
    const call = this.#calls.get(message.seq as number);
    if (!call) return;
    this.#calls.delete(message.seq as number);
    if (message.ok) call.resolve(message);
    else call.reject(new Error(String(message.error)));
  }

  /** Quiesces the disk: in-flight requests drain, new ones wait in the ring. */
  async pause(): Promise<void> {
    await this.#holdRequests();
    this.record.paused = true;
    this.state = "paused";
    this.#host.changed();
  }

  /**
   * Resumes, optionally on another image (e.g. a new snapshot overlay),
   * named with its type (`probedRaw` when ctrl probed it as raw).
   */
  async resume(image?: string, probedRaw = false): Promise<void> {
    const reply = await this.call("resume", image ? { image, probedRaw } : {});
    if (image) {
      this.record.image = image;
      this.record.probedRaw = probedRaw;
    }
    const served = servedDisk(reply);
    this.record.sizeBytes = served.sizeBytes;
    this.frontend.attach(() => this.#channel?.kick(), served);
    this.#served = served;
    this.#readCached();
    this.record.paused = false;
    this.state = "running";
    this.#host.changed();
  }

  // Lets ctrl's ring disk read the page cache of a raw image itself, unless
  // a QoS limit is set: only the disk process enforces it.
  #readCached(): void {
    const disk = this.frontend.disk;
    const fd = this.#served?.pageCacheFd;
    const pid = this.#child?.pid;
    if (!disk) return;
    if (
      fd === undefined || pid === undefined || this.record.qos.maxIops || this.record.qos.maxBps
    ) {
      disk.usePageCache(undefined);
      return;
    }
    try {
      const path = parseImageSpec(this.record.image).path;
      disk.usePageCache(
        PageCache.open(`/proc/${pid}/fd/${fd}`, path, !this.record.readOnly),
      );
    } catch (error) {
      disk.usePageCache(undefined);
      this.#host.log.warn(
        `minor ${this.record.minor}: reads go over the ring: ${(error as Error).message}`,
      );
    }
  }

  // Nothing is answered until resume: not by the disk process, nor from
  // what ctrl's ring disk knows reads as zeros.
  async #holdRequests(): Promise<void> {
    this.frontend.disk?.paused();
    // Writes ctrl put in the page cache are the disk's too: the pause's flush covers them.
    await this.frontend.disk?.cachedWritesDrained();
    await this.call("pause");
  }

  /** Changes QoS limits. */
  async setQos(qos: QosSettings): Promise<void> {
    await this.call("qos", { qos });
    this.record.qos = qos;
    if (this.state === "running") this.#readCached();
    this.#host.changed();
  }

  /**
   * Counters, read from the stats file (no call to the disk process, so a
   * hung or dead one is shown too): `disk` since the current (or last) disk
   * process started, `total` since create, dead processes included, with
   * `restarts` beside them.
   */
  stats(): Record<string, unknown> {
    const inflight = this.#channel ? this.statsFile.counters.inflight : 0;
    const current = this.statsFile.counters.totals();
    const life = this.#lifetime;
    // Folded already (ctrl restarted before a process started): not twice.
    const unfolded = this.statsFile.generation > life.foldedGeneration ? current : emptyTotals();
    return {
      ...this.summary(),
      outstanding: this.frontend.outstanding,
      ...(this.failure ? { failure: this.failure } : {}),
      diskStartedAt: new Date(this.statsFile.sinceMs).toISOString(),
      disk: withDerived(current, inflight) satisfies DiskStats,
      total: withDerived(addTotals(life.folded, unfolded), inflight) satisfies DiskStats,
    };
  }

  /** The fields `blktap list` shows. */
  summary(): Record<string, unknown> {
    const r = this.record;
    return {
      minor: r.minor,
      name: r.name,
      pid: this.pid ?? null,
      state: this.state,
      image: r.image,
      readOnly: r.readOnly,
      cache: r.cache,
      sizeBytes: r.sizeBytes,
      qos: r.qos,
      restarts: this.restarts,
      ...this.frontend.describe(),
    };
  }

  /**
   * Stops the disk process, answers what is left with ERROR, removes the
   * ring device. A kernel minor whose block device is open refuses (throws)
   * before anything changed.
   */
  async destroy(): Promise<void> {
    this.frontend.beginDestroy();
    // Let what is in flight finish and reach the image before stopping.
    if (this.#channel) await this.#holdRequests().catch(() => {});
    this.#destroying = true;
    this.state = "destroyed";
    const child = this.#child;
    if (child) {
      try {
        child.kill("SIGTERM");
      } catch {
        // already gone
      }
      const timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch {
          // already gone
        }
      }, 5000);
      await child.status;
      clearTimeout(timer);
    }
    this.#settleWaiters(new Error(`minor ${this.record.minor} destroyed`));
    this.frontend.close();
    this.statsFile.close();
    this.statsFile.unlink();
  }
}

/** What a disk process's `ready` message (or resume reply) says it serves. */
function servedDisk(message: Record<string, unknown>): ServedDisk {
  const capabilities = message.capabilities as DriverCapabilities | undefined;
  if (typeof message.sizeBytes !== "number" || typeof capabilities !== "object" || !capabilities) {
    throw new Error(`disk process sent an incomplete ready message: ${JSON.stringify(message)}`);
  }
  const fd = message.pageCacheFd;
  if (fd !== undefined && !(Number.isSafeInteger(fd) && (fd as number) >= 0)) {
    throw new Error(`disk process sent a bad pageCacheFd: ${JSON.stringify(fd)}`);
  }
  return {
    sizeBytes: message.sizeBytes,
    capabilities,
    ...(fd === undefined ? {} : { pageCacheFd: fd as number }),
  };
}
