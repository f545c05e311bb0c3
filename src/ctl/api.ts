/**
 * ctrl's client API on `ctrl.sock`: one JSON object per line each way.
 * A request is `{op, ...args}` (optionally with an `id` echoed back); the
 * response is `{ok: true, ...result}` or `{ok: false, error}`.
 *
 * Ops: create, list, stats, pause, resume, destroy, qos, and for tests and
 * benchmarks exercise (the verified test front end) and fuzz (malformed
 * requests). Those two write over the disk: they refuse a minor that has
 * clients unless `force` is set, and their modules (test tools) are loaded
 * only when one of them runs, never on the daemon's own path.
 * @module
 */
import type { AttachedImage, Ctrl } from "./daemon.ts";
import type { Minor } from "./minor.ts";
import type { LoadOptions } from "../frontends/exercise/test_frontend.ts";
import { nbdUnixUri } from "./nbd_frontend.ts";

/** Longest request line accepted. */
export const request_bytes_max = 64 * 1024;

type Args = Record<string, unknown>;

function number(args: Args, key: string): number | undefined {
  const v = args[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v) || v < 0) {
    throw new Error(`${key} must be a non-negative number`);
  }
  return v;
}

// What create and resume tell about the image: its recorded spec, its
// format, whether that was probed, and QEMU's warning for a probed raw one.
function imageReply(image: AttachedImage): Args {
  return {
    image: image.spec,
    format: image.format,
    probed: image.probed,
    ...(image.warning ? { warning: image.warning } : {}),
  };
}

function allowPaths(args: Args): string[] {
  const value = args.allowPaths ?? [];
  if (
    !Array.isArray(value) || value.some((p) => typeof p !== "string" || !p.startsWith("/"))
  ) {
    throw new Error("allowPaths must be a list of absolute folder paths");
  }
  return value as string[];
}

/** Serves client connections for a {@linkcode Ctrl}. */
export class CtlApi {
  readonly #ctrl: Ctrl;

  constructor(ctrl: Ctrl) {
    this.#ctrl = ctrl;
  }

  /** Reads requests from `conn` until it closes; requests run concurrently. */
  async serve(conn: Deno.Conn): Promise<void> {
    const decoder = new TextDecoder();
    const buffer = new Uint8Array(65536);
    let pending = "";
    try {
      for (;;) {
        const n = await conn.read(buffer);
        if (n === null) break;
        pending += decoder.decode(buffer.subarray(0, n), { stream: true });
        if (pending.length > request_bytes_max) throw new Error("request too long");
        let newline;
        while ((newline = pending.indexOf("\n")) >= 0) {
          const line = pending.slice(0, newline);
          pending = pending.slice(newline + 1);
          if (line.trim()) this.#handle(conn, line);
        }
      }
    } catch (error) {
      this.#ctrl.log.debug(`client: ${error}`);
    } finally {
      try {
        conn.close();
      } catch {
        // closed
      }
    }
  }

  async #handle(conn: Deno.Conn, line: string): Promise<void> {
    let response: Args;
    let id: unknown;
    try {
      const request = JSON.parse(line) as Args;
      id = request.id;
      response = { ok: true, ...await this.dispatch(request) };
    } catch (error) {
      response = { ok: false, error: (error as Error).message };
    }
    if (id !== undefined) response.id = id;
    const bytes = new TextEncoder().encode(JSON.stringify(response) + "\n");
    try {
      for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
    } catch {
      // client went away
    }
  }

  #minor(args: Args): Minor {
    const key = args.minor;
    if (typeof key !== "number" && typeof key !== "string") throw new Error("minor is required");
    const minor = this.#ctrl.find(key);
    if (!minor) throw new Error(`no such minor: ${key}`);
    return minor;
  }

  // The test front end and the fuzzer drive ctrl's own ring.
  #ringDisk(minor: Minor) {
    const disk = minor.disk;
    if (!disk) throw new Error(`minor ${minor.record.minor} is a kernel minor: no ring in ctrl`);
    return disk;
  }

  /** Runs one request. */
  async dispatch(args: Args): Promise<Args> {
    const ctrl = this.#ctrl;
    switch (args.op) {
      case "create":
        return await this.#create(args);
      case "list":
        return { minors: ctrl.minors.map((m) => m.stats()) };
      case "stats":
        return this.#minor(args).stats();
      case "pause":
        await this.#minor(args).pause();
        return {};
      case "resume":
        return await this.#resume(args);
      case "destroy":
        await ctrl.destroy(this.#minor(args));
        return {};
      case "qos":
        return await this.#qos(args);
      case "exercise":
        return { ...await this.#exercise(args) };
      case "fuzz":
        return await this.#fuzz(args);
      default:
        throw new Error(`unknown op '${args.op}'`);
    }
  }

  async #create(args: Args): Promise<Args> {
    if (typeof args.image !== "string" || !args.image) throw new Error("image is required");
    const cache = args.cache ?? "none";
    if (cache !== "none" && cache !== "writeback") {
      throw new Error(`cache must be none or writeback`);
    }
    const { minor, image } = await this.#ctrl.create({
      image: args.image,
      allowPaths: allowPaths(args),
      name: typeof args.name === "string" ? args.name : undefined,
      readOnly: args.readOnly === true,
      cache,
      maxIops: number(args, "maxIops"),
      maxBps: number(args, "maxBps"),
      burstMs: number(args, "burstMs"),
      kernel: args.kernel === true,
    });
    const socket = this.#ctrl.nbdSocketPath;
    const device = minor.frontend.describe().device;
    return {
      minor: minor.record.minor,
      name: minor.record.name,
      ...(device ? { device } : {}),
      ...(socket && minor.disk ? { uri: nbdUnixUri(minor.record.name, socket) } : {}),
      ...imageReply(image),
    };
  }

  async #resume(args: Args): Promise<Args> {
    const image = args.image;
    if (image !== undefined && (typeof image !== "string" || !image)) {
      throw new Error("image must be a non-empty string");
    }
    const attached = await this.#ctrl.resume(this.#minor(args), image);
    return attached ? imageReply(attached) : {};
  }

  async #qos(args: Args): Promise<Args> {
    const minor = this.#minor(args);
    const qos = minor.record.qos;
    await minor.setQos({
      maxIops: number(args, "maxIops") ?? qos.maxIops,
      maxBps: number(args, "maxBps") ?? qos.maxBps,
      burstMs: number(args, "burstMs") ?? qos.burstMs,
    });
    return {};
  }

  // The test tools overwrite the disk: never under a client's feet unless forced.
  #refuseIfInUse(minor: Minor, op: string, args: Args): void {
    const clients = this.#ctrl.clientsOf(minor);
    if (clients.length === 0 || args.force === true) return;
    throw new Error(
      `minor ${minor.record.minor} (${minor.record.name}) has clients: ${clients.join(", ")}; ` +
        `${op} writes test patterns over the disk and destroys its data: ` +
        `disconnect them first, or force it (--force)`,
    );
  }

  async #exercise(args: Args) {
    const minor = this.#minor(args);
    this.#refuseIfInUse(minor, "exercise", args);
    const options: LoadOptions = {
      requests: number(args, "requests"),
      durationMs: number(args, "durationMs"),
      depth: number(args, "depth") ?? 8,
      minBytes: number(args, "minBytes"),
      maxBytes: number(args, "maxBytes"),
      indirectFraction: number(args, "indirectFraction"),
      indirectMaxBytes: number(args, "indirectMaxBytes"),
      readFraction: number(args, "readFraction"),
      flushFraction: number(args, "flushFraction"),
      discardFraction: number(args, "discardFraction"),
      regionBytes: number(args, "regionBytes"),
      maxErrors: number(args, "maxErrors"),
      verify: args.verify !== false,
      aligned: args.aligned === true,
      initialZero: args.initialZero === true,
      returnModel: args.returnModel === true,
      seed: number(args, "seed") ?? Math.floor(Math.random() * 2 ** 31),
    };
    const disk = this.#ringDisk(minor);
    if (options.depth < 1 || options.depth > disk.ringEntries) {
      throw new Error(`depth must be 1..${disk.ringEntries}`);
    }
    for (const key of Object.keys(options) as (keyof LoadOptions)[]) {
      if (options[key] === undefined) delete options[key];
    }
    const { TestFrontend } = await import("../frontends/exercise/test_frontend.ts");
    return await new TestFrontend(disk, options).run();
  }

  async #fuzz(args: Args): Promise<Args> {
    const minor = this.#minor(args);
    this.#refuseIfInUse(minor, "fuzz", args);
    const { prng } = await import("../frontends/exercise/test_frontend.ts");
    const { fuzzRing } = await import("../frontends/exercise/malformed.ts");
    const seed = number(args, "seed") ?? Math.floor(Math.random() * 2 ** 31);
    const random = prng(seed);
    const result = await fuzzRing(
      this.#ringDisk(minor),
      number(args, "entries") ?? 10000,
      number(args, "depth") ?? 16,
      random,
    );
    return { seed, ...result };
  }
}
