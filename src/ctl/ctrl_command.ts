/**
 * `blktap ctrl`: runs the control daemon in the foreground, systemd-style
 * (logs to stderr with levels; SIGTERM/SIGINT stop it, the registry stays
 * so the next ctrl re-attaches every disk).
 * @module
 */
import {
  type Command,
  parseCommandArgs,
  parseCount,
  parseHostPort,
  UsageError,
} from "../cli/command.ts";
import { type LogLevel, setLogLevel } from "../cli/log.ts";
import { ALLOW_PATH_OPTION, allowPathHelp, parseAllowPaths } from "../cli/allow_path.ts";
import { waitForStopSignal } from "../cli/signals.ts";
import { Ctrl } from "./daemon.ts";
import { NBD_SOCKET_NAME, startCtrlNbd } from "./nbd_frontend.ts";
import { defaultRunDir } from "../cli/run_dir.ts";
import { DEFAULT_LIMITS } from "../frontends/nbd/limits.ts";
import { parsePayloadMax } from "../frontends/nbd/serve_command.ts";

const payloadMaxDefault = `${DEFAULT_LIMITS.payload_bytes_max >> 20}M`;

const USAGE = `usage: blktap ctrl [--run-dir DIR] [OPTIONS]

Runs the blktap control daemon in the foreground: creates minors, spawns and
supervises one 'blktap disk' process per disk, answers the client verbs
(create, list, stats, pause, resume, destroy) on DIR/ctrl.sock, and serves
every disk over NBD (export name = the disk's --name, default tapN) on
DIR/nbd.sock: nbd+unix:///tap0?socket=DIR/nbd.sock

DIR must be private: it is created mode 0700, and an existing DIR owned by
another user or open to group or others is refused. The sockets in it are
mode 0600 from the moment they exist: only this user may connect.

NBD over TCP (--nbd-tcp) has no authentication and no encryption (TLS is
refused): every process that can reach HOST:PORT may read and write every
disk. HOST defaults to 127.0.0.1, which every local user can reach; bind
another address only on a network you trust as much as root on this machine.

Options:
  --run-dir DIR          sockets and registry (default $XDG_RUNTIME_DIR/blktap, else /run/blktap)
  --shm-dir DIR          where ring devices live (default /dev/shm)
  --log-level LEVEL      error, warn, info (default) or debug
  --restart-limit N      a disk dying more than N times ... (default 5)
  --restart-window SEC   ... within SEC seconds is marked failed (default 60)
  --nbd-socket PATH      NBD Unix socket (default DIR/nbd.sock)
  --nbd-tcp HOST:PORT    also serve NBD on TCP, unauthenticated (host defaults to 127.0.0.1)
  --nbd-payload-max SIZE memory for NBD payloads of all clients together (default ${payloadMaxDefault});
                         a client over its share waits, none can make ctrl take more
  --no-nbd               do not serve NBD
${allowPathHelp(25)}
                         (for every disk; 'create --allow-path' adds folders for one)

Images attached by path alone are probed once, at create, and recorded with
their format in DIR/registry.json; they are never probed again. Images are
locked as QEMU locks them: one that QEMU writes is refused, and QEMU cannot
write one blktap serves.`;

/** `blktap ctrl`. */
export const CTRL_COMMAND: Command = {
  name: "ctrl",
  summary: "run the control daemon (supervises disk processes)",
  usage: USAGE,
  async run(argv: string[]): Promise<number> {
    const { values } = parseCommandArgs(argv, {
      "run-dir": { type: "string" },
      "shm-dir": { type: "string" },
      "log-level": { type: "string" },
      "restart-limit": { type: "string" },
      "restart-window": { type: "string" },
      "nbd-socket": { type: "string" },
      "nbd-tcp": { type: "string" },
      "nbd-payload-max": { type: "string" },
      "no-nbd": { type: "boolean" },
      ...ALLOW_PATH_OPTION,
    });
    const payloadMax = parsePayloadMax(values["nbd-payload-max"], "--nbd-payload-max");
    const nbdTcp = values["nbd-tcp"] ? parseHostPort(values["nbd-tcp"], "--nbd-tcp") : undefined;
    if (values["log-level"]) {
      if (!["error", "warn", "info", "debug"].includes(values["log-level"])) {
        throw new UsageError(`--log-level must be error, warn, info or debug`);
      }
      setLogLevel(values["log-level"] as LogLevel);
    }
    const restartLimit = parseCount(values["restart-limit"], "--restart-limit");
    const windowS = parseCount(values["restart-window"], "--restart-window");
    const ctrl = new Ctrl({
      runDir: values["run-dir"] ?? defaultRunDir(),
      shmDir: values["shm-dir"],
      allowPaths: parseAllowPaths(values),
      policy: {
        ...(restartLimit !== undefined ? { restartLimit } : {}),
        ...(windowS !== undefined ? { restartWindowMs: windowS * 1000 } : {}),
      },
    });
    await ctrl.start();
    const nbd = values["no-nbd"] ? undefined : await startCtrlNbd(ctrl, {
      unixPath: values["nbd-socket"] ?? `${ctrl.runDir}/${NBD_SOCKET_NAME}`,
      tcp: nbdTcp,
      limits: payloadMax === undefined ? {} : { payload_bytes_max: payloadMax },
    });
    await waitForStopSignal();
    ctrl.log.info("stopping");
    await nbd?.close();
    ctrl.stop();
    return 0;
  },
};
