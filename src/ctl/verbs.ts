/**
 * The client verbs: `blktap create|list|stats|pause|resume|destroy|exercise`,
 * each a request to the ctrl of `--run-dir`.
 * @module
 */
import {
  type Command,
  parseCommandArgs,
  parseCount,
  parseSize,
  UsageError,
} from "../cli/command.ts";
import { ctlRequest } from "./client.ts";
import type { CounterTotals, DiskStats } from "../disk/counters.ts";
import { ALLOW_PATH_OPTION, allowPathHelp, parseAllowPaths } from "../cli/allow_path.ts";
import { isNullSpec } from "../disk/null_driver.ts";
import { absolutePath, probedNote, specFilePath } from "../formats/open_image.ts";
import { defaultRunDir } from "../cli/run_dir.ts";

const RUN_DIR_HELP =
  "  --run-dir DIR   ctrl's run directory (default $XDG_RUNTIME_DIR/blktap, else /run/blktap)";
const runDirOption = { "run-dir": { type: "string" } } as const;

// The QoS options of `create` and `qos`, and the request fields they become.
const qosOptions = {
  "max-iops": { type: "string" },
  "max-bps": { type: "string" },
  "burst-ms": { type: "string" },
} as const;

function qosRequest(values: { "max-iops"?: string; "max-bps"?: string; "burst-ms"?: string }) {
  return {
    maxIops: parseCount(values["max-iops"], "--max-iops"),
    maxBps: values["max-bps"] ? parseSize(values["max-bps"]) : undefined,
    burstMs: parseCount(values["burst-ms"], "--burst-ms"),
  };
}

function runDir(values: { "run-dir"?: string }): string {
  return values["run-dir"] ?? defaultRunDir();
}

function minorArg(text: string): number | string {
  return /^\d+$/.test(text) ? Number(text) : text;
}

// A relative path in an image spec is relative to the caller, not to ctrl.
function absoluteSpec(spec: string): string {
  const path = isNullSpec(spec) ? undefined : specFilePath(spec);
  return path === undefined ? spec : spec.slice(0, spec.length - path.length) + absolutePath(path);
}

// Says on stderr which format create or resume found, and QEMU's warning for probed raw.
function reportImage(result: Record<string, unknown>): void {
  if (result.probed === true) console.error(`blktap: ${probedNote(String(result.image))}`);
  if (typeof result.warning === "string") console.error(`blktap: WARNING: ${result.warning}`);
}

/** `blktap create TYPE:PATH`: attach an image as a new minor (see src/cli/create_command.ts). */
export const ATTACH_VERB: Command = {
  name: "create",
  summary: "attach an image as a new minor; prints the minor and its NBD URI or /dev/tapdevN",
  usage: `usage: blktap create TYPE:PATH|PATH [--kernel] [--name NAME] [--readonly]
                     [--cache none|writeback] [--allow-path DIR]... [--max-iops N]
                     [--max-bps N] [--burst-ms MS] [--json] [--run-dir DIR]

An image named by PATH alone is probed once, now, and recorded with the
format found (TYPE:PATH); it is never probed again. A writable image probed
as raw refuses writes that would make it probe as another format: name the
format (aio:PATH) to lift that.

  --kernel             serve it as the block device /dev/tapdevN (needs the blktap
                       kernel module, kernel/blktap.ko) instead of over NBD
  --name NAME          export name (default tapN)
  --readonly           refuse writes
  --cache MODE         none (O_DIRECT, default) or writeback (page cache), as QEMU's cache modes
${allowPathHelp(23)}
  --max-iops N         QoS: requests per second (0 = unlimited)
  --max-bps N          QoS: bytes per second (suffixes K, M, G)
  --burst-ms MS        QoS bucket depth in milliseconds of the rate (default 1000)
  --json               print {"minor", "name", "uri", "image", "format", "probed"} as JSON
                       ("device" instead of "uri" with --kernel)

Prints the minor, then the NBD URI of the new disk (when ctrl serves NBD), or
with --kernel its block device /dev/tapdevN; on stderr, the format when it was
probed. An image another minor writes, or one QEMU has open for writing, is refused.
${RUN_DIR_HELP}`,
  async run(argv) {
    const { values, positionals } = parseCommandArgs(argv, {
      ...runDirOption,
      kernel: { type: "boolean" },
      name: { type: "string" },
      readonly: { type: "boolean" },
      cache: { type: "string" },
      ...ALLOW_PATH_OPTION,
      ...qosOptions,
      json: { type: "boolean" },
    }, { min: 1, max: 1 });
    const cache = values.cache ?? "none";
    if (cache !== "none" && cache !== "writeback") {
      throw new UsageError("--cache must be none or writeback");
    }
    const result = await ctlRequest(runDir(values), {
      op: "create",
      image: absoluteSpec(positionals[0]),
      allowPaths: parseAllowPaths(values),
      name: values.name,
      readOnly: values.readonly ?? false,
      cache,
      kernel: values.kernel ?? false,
      ...qosRequest(values),
    });
    reportImage(result);
    if (values.json) console.log(JSON.stringify(result));
    else {
      console.log(
        [result.minor, result.device, result.uri].filter((x) => x !== undefined).join("\n"),
      );
    }
    return 0;
  },
};

const LIST: Command = {
  name: "list",
  summary: "list minors: name, pid, state, image, counters",
  usage: `usage: blktap list [--json] [--run-dir DIR]

OPS and ERRORS count since the disk was created, across restarts of its
disk process (RESTARTS) and of ctrl; PROC-OPS and PROC-ERRORS since the
current disk process (PID) started.

  --json          machine-readable output
${RUN_DIR_HELP}`,
  async run(argv) {
    const { values } = parseCommandArgs(argv, { ...runDirOption, json: { type: "boolean" } });
    const { minors } = await ctlRequest(runDir(values), { op: "list" }) as {
      minors: Record<string, unknown>[];
    };
    if (values.json) {
      console.log(JSON.stringify(minors, null, 2));
      return 0;
    }
    const rows = [[
      "MINOR",
      "NAME",
      "PID",
      "STATE",
      "RESTARTS",
      "OPS",
      "ERRORS",
      "PROC-OPS",
      "PROC-ERRORS",
      "IMAGE",
    ]];
    for (const m of minors) {
      const total = m.total as CounterTotals | undefined;
      const disk = m.disk as CounterTotals | undefined;
      rows.push([
        m.minor,
        m.name,
        m.pid ?? "-",
        m.state,
        m.restarts,
        total ? opsOf(total) : "-",
        total?.errors ?? "-",
        disk ? opsOf(disk) : "-",
        disk?.errors ?? "-",
        m.image,
      ].map(String));
    }
    const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
    for (const r of rows) {
      console.log(r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join("  "));
    }
    return 0;
  },
};

function opsOf(counters: CounterTotals): number {
  return Object.values(counters.ops).reduce((a, b) => a + b, 0);
}

const STATS: Command = {
  name: "stats",
  summary: "counters of one minor (ops, bytes, errors, latency), since create and per process",
  usage: `usage: blktap stats MINOR [--json] [--run-dir DIR]

Counters since the disk was created (every disk process, killed ones
included, across ctrl restarts) and since the current disk process started.

  --json          machine-readable output: "total" since create, "disk" for
                  the current process (started at "diskStartedAt"), "restarts"
${RUN_DIR_HELP}`,
  async run(argv) {
    const { values, positionals } = parseCommandArgs(argv, {
      ...runDirOption,
      json: { type: "boolean" },
    }, {
      min: 1,
      max: 1,
    });
    const stats = await ctlRequest(runDir(values), {
      op: "stats",
      minor: minorArg(positionals[0]),
    });
    if (values.json) {
      console.log(JSON.stringify(stats, null, 2));
      return 0;
    }
    printStats(stats);
    return 0;
  },
};

function printStats(stats: Record<string, unknown>): void {
  for (const [key, value] of Object.entries(stats)) {
    if (key === "disk" || key === "total" || key === "diskStartedAt") continue;
    console.log(`${key}: ${typeof value === "object" ? JSON.stringify(value) : value}`);
  }
  const total = stats.total as DiskStats | undefined;
  if (total) {
    console.log(`since create (all disk processes, ${stats.restarts} restarts):`);
    printCounters(total);
  }
  const disk = stats.disk as DiskStats | undefined;
  if (disk) {
    console.log(`this disk process (pid ${stats.pid ?? "-"}, since ${stats.diskStartedAt}):`);
    printCounters(disk);
    console.log(`  inflight: ${disk.inflight}`);
  }
}

function printCounters(counters: DiskStats): void {
  console.log(`  ops: ${Object.entries(counters.ops).map(([k, v]) => `${k}=${v}`).join(" ")}`);
  for (
    const key of [
      "bytesRead",
      "bytesWritten",
      "errors",
      "invalid",
      "latencyUsP50",
      "latencyUsP99",
    ] as const
  ) {
    console.log(`  ${key}: ${counters[key]}`);
  }
}

function simpleVerb(name: string, summary: string, extra = ""): Command {
  return {
    name,
    summary,
    usage: `usage: blktap ${name} MINOR${
      extra ? ` [${extra}]` : ""
    } [--run-dir DIR]\n\n${RUN_DIR_HELP}`,
    async run(argv) {
      const { values, positionals } = parseCommandArgs(argv, runDirOption, {
        min: 1,
        max: extra ? 2 : 1,
      });
      const result = await ctlRequest(runDir(values), {
        op: name,
        minor: minorArg(positionals[0]),
        ...(positionals[1] ? { image: absoluteSpec(positionals[1]) } : {}),
      });
      reportImage(result);
      return 0;
    },
  };
}

const QOS: Command = {
  name: "qos",
  summary: "change a minor's QoS limits",
  usage: `usage: blktap qos MINOR [--max-iops N] [--max-bps N] [--burst-ms MS] [--run-dir DIR]

  --max-iops N    requests per second (0 = unlimited)
  --max-bps N     bytes per second (suffixes K, M, G; 0 = unlimited)
  --burst-ms MS   bucket depth in milliseconds of the rate
${RUN_DIR_HELP}`,
  async run(argv) {
    const { values, positionals } = parseCommandArgs(argv, {
      ...runDirOption,
      ...qosOptions,
      json: { type: "boolean" },
    }, { min: 1, max: 1 });
    await ctlRequest(runDir(values), {
      op: "qos",
      minor: minorArg(positionals[0]),
      ...qosRequest(values),
    });
    return 0;
  },
};

const EXERCISE: Command = {
  name: "exercise",
  summary: "test a minor with random verified I/O (DESTROYS the disk's data; tests, bench)",
  usage: `usage: blktap exercise MINOR [OPTIONS] [--force] [--run-dir DIR]

DESTROYS DATA: writes test patterns over MINOR's disk (the image loses its
contents). Use it on scratch disks only.

Runs the test front end inside ctrl on MINOR's ring: random reads and writes
verified against a model of what it wrote (reads of sectors it has not
written are checked only with --initial-zero). A minor with clients (NBD
connections to its export) is refused unless --force.

  --force             run even though the disk has clients (their data is destroyed)

  --requests N        stop after N requests (default: --seconds)
  --seconds S         stop after S seconds (default 10)
  --depth N           requests in flight (default 8)
  --min-bytes SIZE    smallest request (default 1K)
  --max-bytes SIZE    largest direct request (default 44K)
  --indirect PCT      percent of requests that are indirect, up to --indirect-max (default 0)
  --indirect-max SIZE largest indirect request (default 1M)
  --read-pct PCT      percent of reads (default 50)
  --flush-pct PCT     percent of flushes (default 0.5); --discard-pct likewise
  --region SIZE       only use the first SIZE bytes of the disk
  --no-verify         do not fill or check data (benchmarks)
  --aligned           page-aligned offsets and buffers (O_DIRECT without bounce)
  --initial-zero      the disk is all zeros before the run: check unwritten sectors too
  --seed N            replay a run
  --json              machine-readable output
${RUN_DIR_HELP}`,
  async run(argv) {
    const { values, positionals } = parseCommandArgs(argv, {
      ...runDirOption,
      requests: { type: "string" },
      seconds: { type: "string" },
      depth: { type: "string" },
      "min-bytes": { type: "string" },
      "max-bytes": { type: "string" },
      indirect: { type: "string" },
      "indirect-max": { type: "string" },
      "read-pct": { type: "string" },
      "flush-pct": { type: "string" },
      "discard-pct": { type: "string" },
      region: { type: "string" },
      "no-verify": { type: "boolean" },
      aligned: { type: "boolean" },
      "initial-zero": { type: "boolean" },
      seed: { type: "string" },
      json: { type: "boolean" },
      force: { type: "boolean" },
    }, { min: 1, max: 1 });
    const pct = (v: string | undefined) => (v === undefined ? undefined : Number(v) / 100);
    const size = (v: string | undefined) => (v === undefined ? undefined : parseSize(v));
    const seconds = values.seconds === undefined ? undefined : Number(values.seconds);
    const result = await ctlRequest(runDir(values), {
      op: "exercise",
      minor: minorArg(positionals[0]),
      requests: parseCount(values.requests, "--requests"),
      durationMs: seconds === undefined ? undefined : seconds * 1000,
      depth: parseCount(values.depth, "--depth"),
      minBytes: size(values["min-bytes"]),
      maxBytes: size(values["max-bytes"]),
      indirectFraction: pct(values.indirect),
      indirectMaxBytes: size(values["indirect-max"]),
      readFraction: pct(values["read-pct"]),
      flushFraction: pct(values["flush-pct"]),
      discardFraction: pct(values["discard-pct"]),
      regionBytes: size(values.region),
      verify: !values["no-verify"],
      aligned: values.aligned ?? false,
      initialZero: values["initial-zero"] ?? false,
      seed: parseCount(values.seed, "--seed"),
      force: values.force ?? false,
    });
    if (values.json) console.log(JSON.stringify(result));
    else for (const [k, v] of Object.entries(result)) console.log(`${k}: ${v}`);
    return result.errors === 0 && result.mismatches === 0 ? 0 : 1;
  },
};

/** Every client verb but `create` (which shares its name with image creation), in help order. */
export const CLIENT_VERBS: Command[] = [
  LIST,
  STATS,
  simpleVerb("pause", "quiesce a minor: in-flight requests drain, new ones wait"),
  simpleVerb("resume", "resume a minor, optionally on another image", "TYPE:PATH"),
  simpleVerb("destroy", "detach a minor and stop its disk process"),
  QOS,
  EXERCISE,
];
