/**
 * One minor inside ctrl: its ring device, its front end ({@linkcode RingDisk})
 * and the supervision of its disk process. When the process exits without
 * being asked to, the minor re-arms the ring with every unanswered request
 * and starts a new process on it; a disk that crashes more than
 * `restartLimit` times within `restartWindowMs` is marked failed and its
 * requests are answered with ERROR.
 * @module
 */
import { memoryFence } from "../../ffi/memory.ts";
import { type Logger, logLevel } from "../cli/log.ts";
import { selfCommandFor } from "../cli/self_command.ts";
import type { QosSettings } from "../disk/disk_server.ts";
import type { DiskStats } from "../disk/counters.ts";
import type { AttachConfig } from "../disk/protocol.ts";
import type { KickChannel } from "../ring/kick_channel.ts";
import { ShmRingDevice } from "../ring/shm_ring_device.ts";
import type { MinorRecord } from "./registry.ts";
import { RingDisk } from "../ring/ring_disk.ts";

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
  readonly device: ShmRingDevice;
  readonly disk: RingDisk;
  state: MinorState = "starting";
  restarts = 0;
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
  #destroying = false;
  failure: string | undefined;

  constructor(record: MinorRecord, host: MinorHost, device: ShmRingDevice) {
    this.record = record;
    this.#host = host;
    this.device = device;
    this.disk = new RingDisk(record.name, device, {
      fence: memoryFence,
      readOnly: record.readOnly,
      sizeBytes: record.sizeBytes,
    });
  }

  get pid(): number | undefined {
    return this.#child?.pid;
  }

  /** Starts a disk process; resolves once it reported ready (or the minor failed). */
  start(): Promise<void> {
    const waiter = Promise.withResolvers<void>();
    this.#readyWaiters.push(waiter);
    this.#spawn();
    return waiter.promise;
  }

  #spawn(): void {
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
      channel.close();
      return;
    }
    this.#channel = channel;
    const r = this.record;
    const config: AttachConfig = {
      minor: r.minor,
      shmPath: r.shmPath,
      ringPages: r.ringPages,
      poolPages: r.poolPages,
      image: r.image,
      probedRaw: r.probedRaw ?? false,
      allowPaths: [...this.#host.allowPaths, ...(r.allowPaths ?? [])],
      readOnly: r.readOnly,
      cache: r.cache,
      qos: r.qos,
    };
    channel.send({ t: "attach", ...config });
  }

  onKick(): void {
    this.disk.onKick();
  }

  onMessage(message: Record<string, unknown>): void {
    if (message.t === "ready") {
      this.#ready(message.sizeBytes as number, message.volatileWrites === true);
    } else if (message.t === "reply") this.#reply(message);
    else if (message.t === "failed") this.failure = String(message.error);
  }

  /** The channel to the disk process closed (`channel` must be the current one). */
  onClose(channel?: KickChannel): void {
    if (channel && channel !== this.#channel) return;
    this.#channel = undefined;
    this.disk.detach();
    for (const call of this.#calls.values()) call.reject(new Error("disk process went away"));
    this.#calls.clear();
  }

  async #ready(sizeBytes: number, volatileWrites: boolean): Promise<void> {
    const channel = this.#channel!;
    this.record.sizeBytes = sizeBytes;
    this.disk.attach(() => channel.kick(), sizeBytes, volatileWrites);
    if (this.record.paused) await this.call("pause").catch(() => {});
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
    const reissued = this.disk.rearm();
    this.restarts += 1;
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
    this.disk.fail();
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
    await this.call("pause");
    // The disk drained and flushed: nothing acknowledged needs a replay.
    this.disk.writesDurable();
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
    this.record.sizeBytes = reply.sizeBytes as number;
    this.disk.attach(
      () => this.#channel?.kick(),
      this.record.sizeBytes,
      reply.volatileWrites === true,
    );
    this.record.paused = false;
    this.state = "running";
    this.#host.changed();
  }

  /** Changes QoS limits. */
  async setQos(qos: QosSettings): Promise<void> {
    await this.call("qos", { qos });
    this.record.qos = qos;
    this.#host.changed();
  }

  /** Counters from the disk process (when it is up) and from supervision. */
  async stats(): Promise<Record<string, unknown>> {
    let disk: DiskStats | undefined;
    if (this.#channel) {
      disk = (await this.call("stats").catch(() => ({ stats: undefined }))).stats as DiskStats;
    }
    return {
      ...this.summary(),
      outstanding: this.disk.outstanding,
      restarts: this.restarts,
      ...(this.failure ? { failure: this.failure } : {}),
      ...(disk ? { disk } : {}),
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
    };
  }

  /** Stops the disk process, answers what is left with ERROR, removes the ring device. */
  async destroy(): Promise<void> {
    // Let what is in flight finish and reach the image before stopping.
    if (this.#channel) await this.call("pause").catch(() => {});
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
    this.disk.fail();
    this.#settleWaiters(new Error(`minor ${this.record.minor} destroyed`));
    this.device.close();
    this.device.unlink();
  }
}
