/**
 * Runs a `blktap ctrl` for a test: private run dir and shared-memory dir,
 * requests through the client library, every process it started killed by
 * pid in `close()`.
 */
import assert from "node:assert/strict";
import { selfCommandFor } from "../../src/cli/self_command.ts";
import { ctlRequest } from "../../src/ctl/client.ts";
import { run } from "./tools.ts";

export class CtrlHarness {
  readonly dir: string;
  readonly runDir: string;
  readonly shmDir: string;
  #child: Deno.ChildProcess | undefined;
  #diskPids = new Set<number>();

  private constructor(dir: string, shmDir: string) {
    this.dir = dir;
    this.runDir = `${dir}/run`;
    this.shmDir = shmDir;
  }

  static async start(extraArgs: string[] = []): Promise<CtrlHarness> {
    const dir = await Deno.makeTempDir({ prefix: "blktap-ctl-" });
    const shmDir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "blktap-test-" }).catch(() =>
      `${dir}/shm`
    );
    await Deno.mkdir(shmDir, { recursive: true });
    const h = new CtrlHarness(dir, shmDir);
    await h.startCtrl(extraArgs);
    return h;
  }

  /** Starts (or restarts) ctrl on the same run dir. */
  async startCtrl(extraArgs: string[] = []): Promise<void> {
    this.#child = selfCommandFor(
      [
        "ctrl",
        "--run-dir",
        this.runDir,
        "--shm-dir",
        this.shmDir,
        "--log-level",
        "warn",
        ...extraArgs,
      ],
      { stdin: "null", stdout: "null", stderr: "inherit" },
    ).spawn();
    for (let i = 0; i < 200; i += 1) {
      try {
        await ctlRequest(this.runDir, { op: "list" });
        return;
      } catch {
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    throw new Error("ctrl did not start");
  }

  get ctrlPid(): number {
    return this.#child!.pid;
  }

  /** Kills ctrl with SIGKILL and waits for it. */
  async killCtrl(): Promise<void> {
    await this.#remember();
    this.#child!.kill("SIGKILL");
    await this.#child!.status;
  }

  /** The NBD URI of export `name` (ctrl serves NBD on `nbd.sock` in its run dir). */
  nbdUri(name: string): string {
    return `nbd+unix:///${name}?socket=${this.runDir}/nbd.sock`;
  }

  request(request: Record<string, unknown>): Promise<Record<string, unknown>> {
    return ctlRequest(this.runDir, request);
  }

  async list(): Promise<Record<string, unknown>[]> {
    const { minors } = await this.request({ op: "list" });
    const list = minors as Record<string, unknown>[];
    for (const m of list) if (typeof m.pid === "number") this.#diskPids.add(m.pid);
    return list;
  }

  async #remember(): Promise<void> {
    await this.list().catch(() => {});
  }

  /** A disk process's pid, remembered for cleanup. */
  async diskPid(minor: number): Promise<number> {
    const m = (await this.list()).find((x) => x.minor === minor);
    if (!m || typeof m.pid !== "number") throw new Error(`minor ${minor} has no process`);
    return m.pid;
  }

  async close(): Promise<void> {
    await this.#remember();
    try {
      this.#child?.kill("SIGKILL");
      await this.#child?.status;
    } catch {
      // gone
    }
    for (const pid of this.#diskPids) {
      try {
        // Only a disk process of ours: a remembered pid may have been reused.
        const cmdline = Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0").join(" ");
        if (!cmdline.includes(this.runDir)) continue;
        Deno.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
    for (const path of [this.dir, this.shmDir]) {
      // A dying process may still be closing files there: try again briefly.
      for (let attempt = 0; attempt < 10; attempt += 1) {
        try {
          await Deno.remove(path, { recursive: true });
          break;
        } catch (error) {
          if (error instanceof Deno.errors.NotFound) break;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
    }
  }
}

/** Creates a zero-filled raw file. */
export async function rawImage(dir: string, name: string, sizeBytes: number): Promise<string> {
  const path = `${dir}/${name}`;
  const file = await Deno.open(path, { write: true, create: true });
  await file.truncate(sizeBytes);
  file.close();
  return path;
}

/** Creates a qcow image of `sizeMiB` MiB with `blktap qcow-create`. */
export async function qcowImage(dir: string, name: string, sizeMiB: number): Promise<string> {
  const path = `${dir}/${name}`;
  const out = await selfCommandFor(["qcow-create", String(sizeMiB), path], {
    stdout: "null",
    stderr: "piped",
  }).output();
  if (!out.success) throw new Error(`qcow-create: ${new TextDecoder().decode(out.stderr)}`);
  return path;
}

/** What the `exercise` request answers: a verified load's counts. */
export type Load = {
  requests: number;
  errors: number;
  mismatches: number;
  verifiedSectors: number;
  firstError?: string;
};

/** Asserts a verified load saw no errors and no mismatches. */
export function assertClean(result: Load, what: string): void {
  assert.equal(result.errors, 0, `${what}: ${result.firstError}`);
  assert.equal(result.mismatches, 0, `${what}: ${result.firstError}`);
}

/**
 * Asserts `qemu-img compare` reads the same bytes through export `name` as in
 * `image` (with -U: the disk process holds the image's QEMU write lock).
 */
export async function assertExportIs(h: CtrlHarness, name: string, image: string): Promise<void> {
  const compare = await run("qemu-img", ["compare", "-U", "-f", "raw", h.nbdUri(name), image]);
  assert.equal(compare.code, 0, compare.stdout + compare.stderr);
}

/**
 * Waits until the minors (all, or those listed) run on disk processes other
 * than the `replacing` pids (after kills or a ctrl restart); returns `list`.
 */
export async function waitRunning(
  runDir: string,
  options: { replacing?: Iterable<number>; minors?: number[] } = {},
): Promise<Record<string, unknown>[]> {
  const old = new Set(options.replacing ?? []);
  const list = async () =>
    ((await ctlRequest(runDir, { op: "list" })).minors as Record<string, unknown>[]).filter((m) =>
      options.minors?.includes(m.minor as number) ?? true
    );
  for (let waited = 0; waited < 30_000; waited += 50) {
    const minors = await list().catch(() => []);
    const ready = minors.length > 0 &&
      minors.every((m) => m.state === "running" && !old.has(m.pid as number));
    if (ready) return minors;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`disks not running: ${JSON.stringify(await list())}`);
}
