/**
 * `blktap disk --minor N`: the per-disk process (the seed's tapdisk). It
 * connects to ctrl, receives its ring device and image, opens the driver
 * chain and serves the ring until ctrl goes away.
 * @module
 */
import { type Command, parseCommandArgs, parseCount, UsageError } from "../cli/command.ts";
import { type Logger, logger } from "../cli/log.ts";
import { addressOf, memoryFence } from "../../ffi/memory.ts";
import { waitOnThisThread, watchRingWhileWaiting } from "../../ffi/aio.ts";
import { SRING_REQ_PROD } from "../ring/blkif.ts";
import type { BlockDriver } from "../formats/driver.ts";
import { openImage, parseImageSpec } from "../formats/open_image.ts";
import { KickChannel } from "../ring/kick_channel.ts";
import { KernelRingDevice } from "../ring/kernel_ring_device.ts";
import type { RingDevice } from "../ring/ring_device.ts";
import type { ServedDisk } from "../ring/ring_disk.ts";
import { ShmRingDevice, ShmRingEnd } from "../ring/shm_ring_device.ts";
import { defaultRunDir } from "../cli/run_dir.ts";
import { DiskServer, submit_chunk_requests } from "./disk_server.ts";
import { StatsFile } from "./stats_file.ts";
import { isNullSpec, openNull } from "./null_driver.ts";
import { type AttachConfig, DISK_SOCKET_NAME } from "./protocol.ts";

const USAGE = `usage: blktap disk --minor N [--run-dir DIR | --socket PATH]

Serves ring device N for blktap ctrl (which spawns it; not usually run by hand).

Options:
  --minor N        the ring device (minor) to serve
  --run-dir DIR    ctrl's run directory (default $XDG_RUNTIME_DIR/blktap, else /run/blktap)
  --socket PATH    ctrl's disk socket (default DIR/${DISK_SOCKET_NAME})`;

/**
 * How long the disk process waits for its I/O on its own thread before
 * handing the wait to another thread (ffi/aio.ts `waitOnThisThread`): its
 * requests arrive in the shared ring, looked at on every completion, so
 * nothing else needs the thread meanwhile. BLKTAP_DISK_WAIT_US=0 turns it off.
 */
const io_wait_on_thread_us = Number(Deno.env.get("BLKTAP_DISK_WAIT_US") ?? "200");

/**
 * How long that wait first spins on the ring's req_prod (and on completions)
 * before sleeping, so a request published meanwhile starts at once rather
 * than at the next completion (at most ffi/aio.ts `ring_spin_us_max`). Off
 * by default: on two shared cores a 20–30 µs spin doubled the disk
 * process's CPU per 4 KiB write for no throughput (bench/results/
 * ring-spin-ab-*); the wait still looks at req_prod once before it sleeps.
 * BLKTAP_DISK_SPIN_US=N turns it on where cores are dedicated. An idle disk
 * never spins (nothing in flight, nothing waited for).
 */
const ring_spin_us = Number(Deno.env.get("BLKTAP_DISK_SPIN_US") ?? "0");

/**
 * Opens an image spec as the disk process serves it: by its recorded type
 * (a bare path is refused: probing here would trust bytes the guest
 * wrote), locked as QEMU locks images, its chain confined to the image's
 * folder and the allowed ones.
 */
export function openDiskImage(
  spec: string,
  config: Pick<AttachConfig, "readOnly" | "cache" | "probedRaw" | "allowPaths">,
): Promise<BlockDriver> {
  if (isNullSpec(spec)) return Promise.resolve(openNull(spec, config.readOnly));
  if (!parseImageSpec(spec).format) {
    return Promise.reject(new Error(`${spec}: no format given; a disk process never probes`));
  }
  return openImage(
    spec,
    { readOnly: config.readOnly, cache: config.cache, lock: true, probedRaw: config.probedRaw },
    { allowPaths: config.allowPaths ?? [] },
  );
}

/**
 * What ctrl learns of the disk when it is served: ctrl's front ends
 * advertise its capabilities. Every driver makes an answered write survive
 * this process's death (src/formats/driver.ts, `write`): ctrl keeps no copies.
 */
function served(driver: BlockDriver): ServedDisk {
  const fd = driver.pageCacheFd;
  return {
    sizeBytes: driver.sizeBytes,
    capabilities: { ...driver.capabilities },
    ...(fd === undefined ? {} : { pageCacheFd: fd }),
  };
}

/** One disk process's state. */
class DiskProcess {
  readonly #log: Logger;
  readonly #minor: number;
  #channel!: KickChannel;
  #device: RingDevice | undefined;
  /** Where ctrl's kicks go: a shared-memory ring device's "requests published". */
  #channelKick: () => void = () => {};
  #server: DiskServer | undefined;
  #config: AttachConfig | undefined;
  readonly #done: PromiseWithResolvers<number> = Promise.withResolvers();

  constructor(minor: number) {
    this.#minor = minor;
    this.#log = logger(`disk ${minor}`);
  }

  async run(socketPath: string): Promise<number> {
    const conn = await Deno.connect({ transport: "unix", path: socketPath });
    this.#channel = new KickChannel(conn, {
      onKick: () => this.#channelKick(),
      onMessage: (m) => this.#onMessage(m),
      onClose: () => {
        // Hung up on before any configuration: ctrl does not know this minor.
        if (!this.#config) return this.#refused(`ctrl at ${socketPath} closed the connection`);
        this.#shutdown("ctrl went away");
      },
    });
    this.#channel.send({ t: "hello", minor: this.#minor, pid: Deno.pid });
    const onSignal = () => this.#shutdown("SIGTERM");
    Deno.addSignalListener("SIGTERM", onSignal);
    try {
      return await this.#done.promise;
    } finally {
      Deno.removeSignalListener("SIGTERM", onSignal);
    }
  }

  // Not served: one line for whoever started this process, exit 2.
  #refused(why: string): void {
    console.error(`blktap disk: minor ${this.#minor}: ${why}`);
    this.#channel.close();
    this.#done.resolve(2);
  }

  #onMessage(message: Record<string, unknown>): void {
    if (message.t === "refused") return this.#refused(String(message.error));
    if (message.t === "attach") {
      this.#attach(message as unknown as AttachConfig).catch((error) => {
        this.#log.error(`attach failed: ${error.message}`);
        this.#channel.send({ t: "failed", error: error.message });
        this.#done.resolve(1);
      });
    } else if (message.t === "call") {
      this.#call(message).then(
        (result) => this.#channel.send({ t: "reply", seq: message.seq, ok: true, ...result }),
        (error) =>
          this.#channel.send({ t: "reply", seq: message.seq, ok: false, error: error.message }),
      );
    }
  }

  // Drains what is in flight and flushes before exiting, so a driver with
  // write-back metadata (qcow) loses nothing it acknowledged.
  async #shutdown(why: string, status = 0): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    if (server) {
      this.#log.info(`stopping (${why}): draining ${server.inflight} requests`);
      try {
        await server.pause();
        server.stop();
        await server.driver.close();
      } catch (error) {
        this.#log.error(`shutdown: ${(error as Error).message}`);
      }
    }
    watchRingWhileWaiting(undefined); // the mapping goes away
    await this.#device?.close().catch(() => {});
    this.#channel.close();
    this.#done.resolve(status);
  }

  // The front end refused this process (a kernel ring device in its error
  // state): what it answers from now on would be dropped, so stop at once;
  // ctrl restarts a process and the requests are published to it again.
  #ringRefused(error: Error): void {
    this.#log.error(`${error.message}; exiting`);
    this.#server?.stop();
    this.#server = undefined;
    this.#channel.close();
    this.#done.resolve(1);
  }

  async #openRing(config: AttachConfig): Promise<RingDevice> {
    if (config.kernelMinor !== undefined) return await KernelRingDevice.open(config.kernelMinor);
    const end = new ShmRingEnd(
      ShmRingDevice.open(config.shmPath, config),
      () => this.#channel.kick(),
    );
    this.#channelKick = () => end.kicked();
    return end;
  }

  async #attach(config: AttachConfig): Promise<void> {
    this.#config = config;
    const driver = await openDiskImage(config.image, config);
    const device = await this.#openRing(config);
    this.#device = device;
    // Counting in the minor's stats file: ctrl reads it even after this process is killed.
    const stats = config.statsPath ? StatsFile.open(config.statsPath) : undefined;
    if (stats) stats.pid = Deno.pid;
    const server = new DiskServer({
      counters: stats?.counters,
      ring: device.ring,
      pool: device.pool,
      fence: memoryFence,
      driver,
      readOnly: config.readOnly,
      notify: () => {
        try {
          device.notify();
        } catch (error) {
          this.#ringRefused(error as Error);
        }
      },
      qos: config.qos,
      log: (m) => this.#log.warn(m),
      // O_DIRECT: the device works while the next chunk is parsed.
      passRequestsMax: config.cache === "none" ? submit_chunk_requests : undefined,
    });
    this.#server = server;
    watchRingWhileWaiting({
      address: addressOf(device.ring) + SRING_REQ_PROD,
      seen: () => server.seenRequestIndex,
      moved: () => server.kick(),
      spinUs: ring_spin_us,
    });
    device.start(() => server.kick(), (error) => this.#ringRefused(error));
    this.#log.info(`serving ${config.image} (${driver.sizeBytes} bytes) pid ${Deno.pid}`);
    this.#channel.send({ t: "ready", ...served(driver) });
    server.kick();
  }

  async #call(message: Record<string, unknown>): Promise<Record<string, unknown>> {
    const server = this.#server;
    if (!server) throw new Error("not attached");
    switch (message.op) {
      case "stats":
        return { stats: server.stats() };
      case "pause":
        await server.pause();
        return {};
      case "resume":
        return await this.#resume(
          server,
          message.image as string | undefined,
          message.probedRaw === true,
        );
      case "qos":
        server.setQos(message.qos as AttachConfig["qos"]);
        return {};
      default:
        throw new Error(`unknown call ${message.op}`);
    }
  }

  async #resume(
    server: DiskServer,
    image: string | undefined,
    probedRaw: boolean,
  ): Promise<Record<string, unknown>> {
    if (image) await this.#switchImage(server, image, probedRaw);
    else server.resume();
    return { ...served(server.driver) };
  }

  // The old image is closed first: its locks would refuse the new overlay
  // that has it as backing file. If the new one cannot be opened, the old
  // one is opened again, paused or running as before.
  async #switchImage(server: DiskServer, image: string, probedRaw: boolean): Promise<void> {
    const config = this.#config!;
    const wasPaused = server.paused;
    await server.pause();
    await server.driver.close();
    let driver: BlockDriver;
    try {
      driver = await openDiskImage(image, { ...config, probedRaw });
    } catch (error) {
      // A paused disk stays so: nothing may reach the old image between two attempts.
      server.replaceDriver(await openDiskImage(config.image, config));
      if (!wasPaused) server.resume();
      throw error;
    }
    this.#config = { ...config, image, probedRaw };
    server.resume(driver);
    this.#log.info(`resumed on ${image}`);
  }
}

/** `blktap disk`. */
export const DISK_COMMAND: Command = {
  name: "disk",
  summary: "serve one ring device (spawned by ctrl)",
  usage: USAGE,
  async run(argv: string[]): Promise<number> {
    const { values } = parseCommandArgs(argv, {
      minor: { type: "string" },
      "run-dir": { type: "string" },
      socket: { type: "string" },
    });
    const minor = parseCount(values.minor, "--minor");
    if (minor === undefined) throw new UsageError("--minor is required");
    const socket = values.socket ?? `${values["run-dir"] ?? defaultRunDir()}/${DISK_SOCKET_NAME}`;
    waitOnThisThread(io_wait_on_thread_us);
    return await new DiskProcess(minor).run(socket);
  },
};
