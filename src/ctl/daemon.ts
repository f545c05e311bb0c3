/**
 * `blktap ctrl` (the seed's blktapctrl): owns the minors of one run dir.
 * It listens on `ctrl.sock` (mode 0600; newline-delimited JSON requests
 * and responses) for the client verbs and on `disks.sock` for its disk
 * processes, keeps the registry, and re-attaches every registered disk
 * when it starts. Other front ends (the NBD server) find a minor's
 * {@linkcode RingDisk} with {@linkcode Ctrl.exportByName}.
 * @module
 */
import { type Logger, logger } from "../cli/log.ts";
import { DISK_SOCKET_NAME } from "../disk/protocol.ts";
import { KickChannel } from "../ring/kick_channel.ts";
import { defaultShmDir, ShmRingDevice } from "../ring/shm_ring_device.ts";
import { CtlApi } from "./api.ts";
import { Minor, type SupervisionPolicy } from "./minor.ts";
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

  /** Prepares the run dir, listens, and re-attaches registered disks. */
  async start(): Promise<void> {
    Deno.mkdirSync(this.runDir, { recursive: true, mode: 0o700 });
    const ctrlSocket = `${this.runDir}/${CTRL_SOCKET_NAME}`;
    await refuseIfRunning(ctrlSocket);
    this.#registry = loadRegistry(this.#registryPath) ?? {
      version: 1,
      instance: crypto.randomUUID().slice(0, 8),
      minors: [],
    };
    const disks = listenUnix(`${this.runDir}/${DISK_SOCKET_NAME}`);
    this.#listeners.push(disks);
    this.#acceptDisks(disks);
    await this.#reattachAll();
    const clients = listenUnix(ctrlSocket);
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
      shmPath: `${this.#shmDir}/blktap.${this.#registry.instance}.${number}`,
      ringPages: ring_pages_default,
      poolPages: pool_pages_default,
      sizeBytes: 0,
      paused: false,
    };
    const device = ShmRingDevice.create(record.shmPath, record);
    const minor = new Minor(record, this.#host(), device);
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

  async #reattachAll(): Promise<void> {
    const records = this.#registry.minors;
    await Promise.allSettled(records.map((r) => this.#reattach(r)));
  }

  async #reattach(record: MinorRecord): Promise<void> {
    if (record.pid) await killStaleDisk(record.pid, record.minor);
    let device: ShmRingDevice;
    try {
      device = ShmRingDevice.open(record.shmPath, record);
    } catch {
      device = ShmRingDevice.create(record.shmPath, record);
    }
    const minor = new Minor(record, this.#host(), device);
    this.#minors.set(record.minor, minor);
    const refusal = await this.#upgradeLegacyImage(record);
    if (refusal) {
      minor.refuse(refusal);
      return;
    }
    try {
      await minor.start();
    } catch (error) {
      this.log.error(`minor ${record.minor}: re-attach failed: ${(error as Error).message}`);
    }
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
        if (!minor) return channel.close();
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

function listenUnix(path: string): Deno.Listener {
  try {
    Deno.removeSync(path);
  } catch {
    // absent
  }
  const listener = Deno.listen({ transport: "unix", path });
  Deno.chmodSync(path, 0o600);
  return listener;
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
 * Waits for a disk process left by a previous ctrl (if that pid still is
 * one) to finish: it drains and flushes once its channel closed. Killed
 * after {@linkcode stale_disk_grace_ms}.
 */
async function killStaleDisk(pid: number, minor: number): Promise<void> {
  let cmdline: string;
  try {
    cmdline = Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0").join(" ");
  } catch {
    return; // gone
  }
  if (!cmdline.includes(" disk --minor " + minor + " ")) return;
  if (await exited(pid, stale_disk_grace_ms)) return;
  try {
    Deno.kill(pid, "SIGKILL");
  } catch {
    return;
  }
  await exited(pid, 5000);
}

async function exited(pid: number, timeoutMs: number): Promise<boolean> {
  for (let waited = 0; waited < timeoutMs; waited += 20) {
    try {
      const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
      if (stat.split(") ")[1]?.startsWith("Z")) return true; // exited, awaiting its reaper
    } catch {
      return true;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return false;
}
