/**
 * `blktap ctrl` (the seed's blktapctrl): owns the minors of one run dir.
 * It listens on `ctrl.sock` (newline-delimited JSON requests and
 * responses) for the client verbs and on `disks.sock` for its disk
 * processes, keeps the registry, and re-attaches every registered disk
 * when it starts.
 *
 * Nothing here can be reached or substituted by another user: the run dir
 * must be a private directory (created 0700; an existing one with another
 * owner or group/other access is refused), sockets are 0600 from the
 * moment they are bound, and ring devices live in a private folder of
 * this ctrl instance inside the shared-memory folder. Other front ends (the NBD server) find a minor's
 * {@linkcode RingDisk} with {@linkcode Ctrl.exportByName}.
 * @module
 */
import { memoryFence } from "../../ffi/memory.ts";
import { SysError } from "../../ffi/errno.ts";
import { ensurePrivateDir, listenPrivateUnix } from "../../ffi/private_path.ts";
import { type Logger, logger } from "../cli/log.ts";
import { DISK_SOCKET_NAME } from "../disk/protocol.ts";
import { ControlDevice } from "../frontends/kernel/control_device.ts";
import { KernelMinor } from "../frontends/kernel/kernel_minor.ts";
import { StatsFile, statsPathFor } from "../disk/stats_file.ts";
import { KickChannel } from "../ring/kick_channel.ts";
import { defaultShmDir, ShmRingDevice } from "../ring/shm_ring_device.ts";
import { CtlApi } from "./api.ts";
import { Minor, type SupervisionPolicy } from "./minor.ts";
import {
  KernelFrontend,
  type MinorFrontend,
  ShmFrontend,
  UnavailableFrontend,
} from "./minor_frontend.ts";
import { loadRegistry, type MinorRecord, type RegistryData, saveRegistry } from "./registry.ts";
import type { RingDisk } from "../ring/ring_disk.ts";
import { CTRL_SOCKET_NAME, REGISTRY_NAME } from "../cli/run_dir.ts";
import { isNullSpec } from "../disk/null_driver.ts";
import {
  parseImageSpec,
  type ResolvedImageSpec,
  resolveImageSpec,
  specFilePath,
} from "../formats/open_image.ts";

/** Ring pages per minor: ring-page-order 2, 128 entries. */
export const ring_pages_default = 4;
/** Data pool per minor: 64 MiB (shared memory is only allocated as touched). */
export const pool_pages_default = 16384;
/** Most minors one ctrl serves. */
export const minors_max = 1024;
/** Most client connections at once. */
export const client_connections_max = 256;

/** Describes the users of a minor's disk that one front end knows of (none: empty). */
export type ClientProbe = (minor: Minor) => string[];

/** How ctrl runs. */
export interface CtrlOptions {
  runDir: string;
  shmDir?: string;
  policy?: Partial<SupervisionPolicy>;
  /** `--allow-path` folders for every minor's backing files and extents (absolute). */
  allowPaths?: string[];
}

/** Parameters of `create`. */
export interface CreateParams {
  /** `type:path`, or a path whose format is probed now, once. */
  image: string;
  /** This minor's `--allow-path` folders (absolute). */
  allowPaths?: string[];
  name?: string;
  readOnly?: boolean;
  cache?: "none" | "writeback";
  maxIops?: number;
  maxBps?: number;
  burstMs?: number;
  /** Serve it as the kernel block device /dev/tapdevN (the blktap module) instead of over NBD. */
  kernel?: boolean;
}

/** The daemon. */
export class Ctrl {
  readonly runDir: string;
  readonly log: Logger = logger("ctrl");
  readonly policy: SupervisionPolicy;
  readonly #shmDir: string;
  readonly #minors = new Map<number, Minor>();
  #registry!: RegistryData;
  #listeners: Deno.Listener[] = [];
  #clients = 0;
  readonly #api: CtlApi;
  readonly #destroyHooks: ((name: string) => Promise<void>)[] = [];
  #control: ControlDevice | undefined;
  readonly #clientProbes: ClientProbe[] = [];
  readonly #allowPaths: string[];
  /** The NBD front end's Unix socket, once it listens (for URIs in replies). */
  nbdSocketPath?: string;

  constructor(options: CtrlOptions) {
    this.runDir = options.runDir;
    this.#shmDir = options.shmDir ?? defaultShmDir();
    this.policy = {
      restartLimit: 5,
      restartWindowMs: 60_000,
      restartDelayMs: 100,
      ...options.policy,
    };
    this.#allowPaths = options.allowPaths ?? [];
    this.#api = new CtlApi(this);
  }

  get #registryPath(): string {
    return `${this.runDir}/${REGISTRY_NAME}`;
  }

  /** This instance's private folder of ring devices, inside the shared-memory folder. */
  get #ringDir(): string {
    return `${this.#shmDir}/blktap-${this.#registry.instance}`;
  }

  // A fresh name each time: a path refused at re-attach is never reused.
  #newRingPath(minor: number): string {
    return `${this.#ringDir}/ring${minor}.${crypto.randomUUID().slice(0, 8)}`;
  }

  /** Prepares the run dir, listens, and re-attaches registered disks. */
  async start(): Promise<void> {
    ensurePrivateDir(this.runDir, "run dir");
    const ctrlSocket = `${this.runDir}/${CTRL_SOCKET_NAME}`;
    await refuseIfRunning(ctrlSocket);
    this.#registry = loadRegistry(this.#registryPath) ?? {
      version: 1,
      instance: crypto.randomUUID().slice(0, 8),
      minors: [],
    };
    ensurePrivateDir(this.#ringDir, "ring device folder");
    const disks = listenPrivateUnix(`${this.runDir}/${DISK_SOCKET_NAME}`);
    this.#listeners.push(disks);
    this.#acceptDisks(disks);
    await this.#reattachAll();
    const clients = listenPrivateUnix(ctrlSocket);
    this.#listeners.push(clients);
    this.#acceptClients(clients);
    this.log.info(`listening on ${ctrlSocket} (${this.#minors.size} disks re-attached)`);
  }

  /** Stops listening; disk processes exit when their channel closes. */
  stop(): void {
    for (const l of this.#listeners) {
      try {
        l.close();
      } catch {
        // closed
      }
    }
  }

  /** Every minor, by number. */
  get minors(): Minor[] {
    return [...this.#minors.values()].sort((a, b) => a.record.minor - b.record.minor);
  }

  /** A minor by number or export name. */
  find(key: number | string): Minor | undefined {
    if (typeof key === "number" || /^\d+$/.test(key)) return this.#minors.get(Number(key));
    return this.minors.find((m) => m.record.name === key);
  }

  /** The block device behind export `name` (`--name`, default `tapN`), for the NBD server. */
  exportByName(name: string): RingDisk | undefined {
    const minor = this.minors.find((m) => m.record.name === name);
    return minor && minor.state !== "destroyed" ? minor.disk : undefined;
  }

  /**
   * Runs `hook(exportName)` before a minor is destroyed (the NBD server
   * disconnects that export's clients there).
   */
  addDestroyHook(hook: (name: string) => Promise<void>): void {
    this.#destroyHooks.push(hook);
  }

  /**
   * Adds a way to see who uses a minor's disk. The NBD front end reports
   * its connections to the minor's export; the kernel front end adds one
   * reporting an open /dev/tapdevN. Destructive test tools (`exercise`)
   * refuse a minor any probe reports.
   */
  addClientProbe(probe: ClientProbe): void {
    this.#clientProbes.push(probe);
  }

  /** Who uses `minor` now, one description each ("2 NBD connections"); empty when nobody. */
  clientsOf(minor: Minor): string[] {
    return this.#clientProbes.flatMap((probe) => probe(minor));
  }

  /** Export names, for NBD's LIST. */
  exportNames(): string[] {
    return this.minors.map((m) => m.record.name);
  }

  /** Persists the registry (called whenever a minor changes). */
  saveRegistry(): void {
    this.#registry.minors = this.minors.map((m) => m.record);
    saveRegistry(this.#registryPath, this.#registry);
  }

  #host() {
    return {
      diskSocketPath: `${this.runDir}/${DISK_SOCKET_NAME}`,
      allowPaths: this.#allowPaths,
      policy: this.policy,
      log: this.log,
      changed: () => this.saveRegistry(),
    };
  }

  /** The kernel module's control device, opened on first use. */
  #kernelControl(): ControlDevice {
    this.#control ??= ControlDevice.open();
    return this.#control;
  }

  // A new front end for `record`: a kernel minor, or a shared-memory ring.
  #newFrontend(record: MinorRecord, kernel: boolean): MinorFrontend {
    if (kernel) {
      const km = KernelMinor.allocate(this.#kernelControl(), record.readOnly);
      const { geometry } = km.status();
      Object.assign(record, {
        kernelMinor: km.minor,
        ringPages: geometry.ringPages,
        poolPages: geometry.poolPages,
      });
      return new KernelFrontend(km);
    }
    return this.#shmFrontend(record, ShmRingDevice.create(record.shmPath, record));
  }

  #shmFrontend(record: MinorRecord, device: ShmRingDevice): ShmFrontend {
    return new ShmFrontend(record.name, device, {
      fence: memoryFence,
      readOnly: record.readOnly,
      sizeBytes: record.sizeBytes,
    });
  }

  /**
   * Attaches a new disk; resolves once its process serves it. A bare path
   * is probed here, once (its first 4 KiB read), and recorded as
   * `type:path`; an image another minor writes, or that this one would
   * write while another has it, is refused naming that minor.
   */
  async create(params: CreateParams): Promise<{ minor: Minor; image: AttachedImage }> {
    const readOnly = params.readOnly ?? false;
    const image = await attachedImage(params.image, readOnly);
    // From here to the minor's registration nothing awaits: concurrent
    // creates see each other's minor numbers, names and images.
    const number = this.#freeMinor();
    const name = params.name ?? `tap${number}`;
    if (this.minors.some((m) => m.record.name === name)) {
      throw new Error(`export name '${name}' is taken`);
    }
    this.#refuseSharedWriter(image, readOnly);
    const record: MinorRecord = {
      minor: number,
      name,
      image: image.spec,
      probedRaw: image.probedRaw,
      allowPaths: params.allowPaths ?? [],
      readOnly,
      cache: params.cache ?? "none",
      qos: {
        maxIops: params.maxIops ?? 0,
        maxBps: params.maxBps ?? 0,
        burstMs: params.burstMs ?? 1000,
      },
      shmPath: this.#newRingPath(number),
      ringPages: ring_pages_default,
      poolPages: pool_pages_default,
      sizeBytes: 0,
      paused: false,
    };
    const frontend = this.#newFrontend(record, params.kernel ?? false);
    const stats = StatsFile.create(statsPathFor(record.shmPath), 1);
    const minor = new Minor(record, this.#host(), frontend, stats);
    this.#minors.set(number, minor);
    try {
      await minor.start();
    } catch (error) {
      this.#minors.delete(number);
      await minor.destroy();
      this.saveRegistry();
      throw error;
    }
    return { minor, image };
  }

  /** Resumes `minor`, on `imageSpec` when given (probed now if it is a bare path). */
  async resume(minor: Minor, imageSpec?: string): Promise<AttachedImage | undefined> {
    if (imageSpec === undefined) {
      await minor.resume();
      return undefined;
    }
    const image = await attachedImage(imageSpec, minor.record.readOnly);
    this.#refuseSharedWriter(image, minor.record.readOnly, minor);
    await minor.resume(image.spec, image.probedRaw);
    return image;
  }

  // Two writers corrupt an image: ctrl names its own minor that holds it;
  // the image locks (src/formats/raw/image_lock.ts) catch everyone else.
  #refuseSharedWriter(image: AttachedImage, readOnly: boolean, except?: Minor): void {
    const real = image.path && realPathOf(image.path);
    if (!real) return;
    for (const m of this.minors) {
      if (m === except || m.state === "destroyed" || (readOnly && m.record.readOnly)) continue;
      const path = imageFilePath(m.record.image);
      if (!path || realPathOf(path) !== real) continue;
      throw new Error(
        `${image.path} is in use: minor ${m.record.minor} (${m.record.name}) has it ${
          m.record.readOnly ? "read-only" : "read-write"
        }; an image can be attached twice only read-only`,
      );
    }
  }

  /** Detaches a disk and forgets it. */
  async destroy(minor: Minor): Promise<void> {
    for (const hook of this.#destroyHooks) {
      await hook(minor.record.name).catch((e) => this.log.warn(`destroy hook: ${e}`));
    }
    await minor.destroy();
    this.#minors.delete(minor.record.minor);
    this.saveRegistry();
    this.log.info(`minor ${minor.record.minor} destroyed`);
  }

  #freeMinor(): number {
    for (let n = 0; n < minors_max; n += 1) if (!this.#minors.has(n)) return n;
    throw new Error(`all ${minors_max} minors are in use`);
  }

  // Every registered minor is back in the table before any of them starts:
  // a start saves the registry, which must never lose a minor not yet seen.
  async #reattachAll(): Promise<void> {
    const records = this.#registry.minors;
    await Promise.all(
      records.map((r) => r.pid && killStaleDisk(r.pid, r.minor, this.#host().diskSocketPath)),
    );
    const found = records.map((record) => this.#registered(record));
    for (const { minor, failure } of found) if (failure) minor.refuse(failure);
    await Promise.allSettled(
      found.filter((f) => !f.failure).map(({ minor }) => this.#restart(minor)),
    );
  }

  // `record`'s minor, on the front end it had; one whose front end is gone
  // for good comes back failed, with the reason.
  #registered(record: MinorRecord): { minor: Minor; failure?: string } {
    let frontend: MinorFrontend;
    let failure: string | undefined;
    try {
      frontend = this.#foundFrontend(record);
    } catch (error) {
      failure = `re-attach failed: ${(error as Error).message}`;
      const { ringPages, poolPages, shmPath, kernelMinor } = record;
      frontend = new UnavailableFrontend(failure, { ringPages, poolPages, shmPath, kernelMinor });
    }
    // The stats file outlives ctrl like the ring device: what the previous
    // processes counted is still there (folded in before the next one starts).
    const generation = (record.lifetime?.foldedGeneration ?? 0) + 1;
    const stats = StatsFile.openOrCreate(
      record.statsPath ?? statsPathFor(record.shmPath),
      generation,
    );
    const minor = new Minor(record, this.#host(), frontend, stats);
    this.#minors.set(record.minor, minor);
    return { minor, failure };
  }

  async #restart(minor: Minor): Promise<void> {
    const refusal = await this.#upgradeLegacyImage(minor.record);
    if (refusal) {
      minor.refuse(refusal);
      return;
    }
    try {
      await minor.start();
    } catch (error) {
      this.log.error(`minor ${minor.record.minor}: re-attach failed: ${(error as Error).message}`);
    }
  }

  // The front end of a registered minor: the kernel minor it had (a new one
  // if the module lost it), or its shared-memory ring (its requests were
  // lost with the previous ctrl's memory unless the file survived).
  #foundFrontend(record: MinorRecord): MinorFrontend {
    if (record.kernelMinor !== undefined) {
      const control = this.#kernelControl();
      const found = KernelMinor.find(control, record.kernelMinor, record.readOnly);
      if (found) return new KernelFrontend(found);
      const fresh = KernelMinor.allocate(control, record.readOnly);
      this.log.warn(
        `minor ${record.minor}: kernel minor ${record.kernelMinor} is gone; now ${fresh.minor}`,
      );
      record.kernelMinor = fresh.minor;
      return new KernelFrontend(fresh);
    }
    return this.#shmFrontend(record, this.#reopenRing(record));
  }

  // The ring device a previous ctrl left, or a new one where it is gone or
  // refused (a symbolic link, another owner, another mode: never followed,
  // never touched). The ring's contents are not needed: that ctrl's clients
  // are gone, and its disk process has drained.
  #reopenRing(record: MinorRecord): ShmRingDevice {
    try {
      return ShmRingDevice.open(record.shmPath, record);
    } catch (error) {
      if (!(error instanceof SysError && error.code === "ENOENT")) {
        this.log.warn(`minor ${record.minor}: ${(error as Error).message}; using a new one`);
      }
    }
    record.shmPath = this.#newRingPath(record.minor);
    return ShmRingDevice.create(record.shmPath, record);
  }

  /**
   * A registry written by a blktap that did not record formats names an
   * image by bare path. Its format cannot be known any more: the bytes may
   * have been written by the guest since. Probed as raw, it stays raw (with
   * the probe guard, so it stays so); probed as anything else, it is not
   * opened: the minor fails with a message saying how to re-create it.
   * Returns that refusal, or undefined once the record is explicit.
   */
  async #upgradeLegacyImage(record: MinorRecord): Promise<string | undefined> {
    if (isNullSpec(record.image) || parseImageSpec(record.image).format) return undefined;
    const old = record.image;
    let image: AttachedImage;
    try {
      image = await attachedImage(old, record.readOnly);
    } catch (error) {
      return `the registry names ${old} without a format and it cannot be probed: ${
        (error as Error).message
      }`;
    }
    if (image.format !== "aio") {
      return `the registry (from an older blktap) names ${old} without a format, and it now ` +
        `probes as ${image.format}: a guest may have written that header, so it is not opened. ` +
        `Check the image, then destroy this minor and create it again with its format named ` +
        `(${image.format}:${image.path})`;
    }
    record.image = image.spec;
    record.probedRaw = image.probedRaw;
    this.log.warn(
      `minor ${record.minor}: the registry named ${old} without a format; recorded as ` +
        `${image.spec} (probed raw: writes that would make it probe as another format are refused)`,
    );
    return undefined;
  }

  async #acceptDisks(listener: Deno.Listener): Promise<void> {
    try {
      for await (const conn of listener) this.#diskConnection(conn);
    } catch (error) {
      if (!(error instanceof Deno.errors.BadResource)) this.log.error(`disk socket: ${error}`);
    }
  }

  // A disk process's connection: routed to its minor once it says hello.
  #diskConnection(conn: Deno.Conn): void {
    let target: Minor | undefined;
    const channel: KickChannel = new KickChannel(conn, {
      onKick: () => target?.onKick(),
      onMessage: (m) => {
        if (target) return target.onMessage(m);
        const minor = m.t === "hello" ? this.#minors.get(m.minor as number) : undefined;
        if (!minor) {
          // Say why before hanging up: a disk started by hand exits with this.
          channel.send({ t: "refused", error: `ctrl in ${this.runDir} has no minor ${m.minor}` });
          channel.closeAfterSending();
          return;
        }
        target = minor;
        minor.connected(channel, m.pid as number);
      },
      onClose: () => target?.onClose(channel),
    });
  }

  async #acceptClients(listener: Deno.Listener): Promise<void> {
    try {
      for await (const conn of listener) {
        if (this.#clients >= client_connections_max) {
          conn.close();
          continue;
        }
        this.#clients += 1;
        this.#api.serve(conn).finally(() => (this.#clients -= 1));
      }
    } catch (error) {
      if (!(error instanceof Deno.errors.BadResource)) this.log.error(`ctrl socket: ${error}`);
    }
  }
}

/** The image of a minor made explicit at create or resume (`null:` specs pass as they are). */
export type AttachedImage = ResolvedImageSpec;

function attachedImage(spec: string, readOnly: boolean): Promise<AttachedImage> {
  if (!isNullSpec(spec)) return resolveImageSpec(spec, readOnly);
  return Promise.resolve({ spec, format: "null", probed: false, probedRaw: false });
}

function imageFilePath(spec: string): string | undefined {
  return isNullSpec(spec) ? undefined : specFilePath(spec);
}

function realPathOf(path: string): string | undefined {
  try {
    return Deno.realPathSync(path);
  } catch {
    return undefined;
  }
}

async function refuseIfRunning(socketPath: string): Promise<void> {
  try {
    const conn = await Deno.connect({ transport: "unix", path: socketPath });
    conn.close();
  } catch {
    return; // nobody listening: a stale socket at most
  }
  throw new Error(`another blktap ctrl is running on ${socketPath}`);
}

/** How long a previous ctrl's disk process gets to drain and flush before it is killed. */
export const stale_disk_grace_ms = 10_000;

/**
 * Waits for a disk process left by a previous ctrl of this run dir (if that
 * pid still is one) to finish: it drains and flushes once its channel
 * closed. Killed after {@linkcode stale_disk_grace_ms}. The pid is trusted
 * only while it names the same process (its start time): a recorded pid may
 * have been reused by anything, another ctrl's disk included.
 */
async function killStaleDisk(pid: number, minor: number, diskSocketPath: string): Promise<void> {
  const started = startTime(pid);
  if (started === undefined || !isDiskOf(pid, minor, diskSocketPath)) return;
  if (await exited(pid, started, stale_disk_grace_ms)) return;
  try {
    Deno.kill(pid, "SIGKILL");
  } catch {
    return;
  }
  await exited(pid, started, 5000);
}

/**
 * Whether `pid` runs `disk --minor MINOR --socket PATH` (as ctrl spawns it)
 * with PATH naming `diskSocketPath`: compared as real paths, PATH taken
 * from the process's own working directory where relative, so a run dir
 * spelled otherwise on this start (`run/`, `./run`, through a link) still
 * finds the disk processes of the last one.
 */
function isDiskOf(pid: number, minor: number, diskSocketPath: string): boolean {
  try {
    const argv = Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0");
    const at = argv.indexOf("disk");
    if (at < 0 || argv[at + 1] !== "--minor" || argv[at + 2] !== String(minor)) return false;
    if (argv[at + 3] !== "--socket" || !argv[at + 4]) return false;
    const socket = argv[at + 4];
    const absolute = socket.startsWith("/")
      ? socket
      : `${Deno.readLinkSync(`/proc/${pid}/cwd`)}/${socket}`;
    return realSocketPath(absolute) === realSocketPath(diskSocketPath);
  } catch {
    return false; // gone, or not readable: not one of ours
  }
}

// A socket path with its folder resolved (the socket itself may be gone).
function realSocketPath(path: string): string {
  const slash = path.lastIndexOf("/");
  const folder = slash < 0 ? "." : path.slice(0, slash) || "/";
  return `${Deno.realPathSync(folder)}/${path.slice(slash + 1)}`;
}

/** A process's start time (field 22 of /proc/PID/stat): with the pid, its identity. */
function startTime(pid: number): string | undefined {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1]?.split(" ")[19];
  } catch {
    return undefined;
  }
}

async function exited(pid: number, started: string, timeoutMs: number): Promise<boolean> {
  for (let waited = 0; waited < timeoutMs; waited += 20) {
    try {
      const stat = Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1] ?? "";
      if (stat.startsWith("Z")) return true; // exited, awaiting its reaper
      if (stat.split(" ")[19] !== started) return true; // the pid names another process now
    } catch {
      return true;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return false;
}
