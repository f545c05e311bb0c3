/**
 * Plugs the NBD server into `blktap ctrl`: every minor is an export named
 * by its `--name` (default `tapN`), served through the minor's ring front
 * end, so NBD requests travel ring → disk process like any other; clients
 * of a destroyed minor are disconnected first.
 * @module
 */
import type { Ctrl } from "./daemon.ts";
import type { Minor } from "./minor.ts";
import {
  type NbdExport,
  type NbdLimits,
  type NbdServer,
  startNbdServer,
} from "../frontends/nbd/server.ts";

/** Where ctrl listens for NBD. */
export interface CtrlNbdOptions {
  /** Unix socket (default `RUN_DIR/nbd.sock`). */
  unixPath: string;
  /** Also TCP, only when asked. */
  tcp?: { hostname: string; port: number };
  /** Overrides of the server's limits (the payload budget). */
  limits?: Partial<NbdLimits>;
}

/** Name of the NBD socket inside the run dir. */
export const NBD_SOCKET_NAME = "nbd.sock";

// A minor whose disk process never said what it serves has no export yet:
// its size and capabilities are unknown until then.
function exportOf(minor: Minor): NbdExport | undefined {
  // Kernel minors are served by /dev/tapdevN, not over NBD.
  if (minor.state === "destroyed" || !minor.disk?.ready) return undefined;
  return {
    name: minor.record.name,
    description: `minor ${minor.record.minor}: ${minor.record.image}`,
    driver: minor.disk,
    readOnly: minor.record.readOnly,
  };
}

/** The `nbd+unix://` URI of export `name` on `socketPath`. */
export function nbdUnixUri(name: string, socketPath: string): string {
  return `nbd+unix:///${encodeURIComponent(name)}?socket=${socketPath}`;
}

/** Starts serving ctrl's minors over NBD. */
export async function startCtrlNbd(ctrl: Ctrl, options: CtrlNbdOptions): Promise<NbdServer> {
  const server = await startNbdServer({
    unixPath: options.unixPath,
    tcp: options.tcp,
    limits: options.limits,
    lookup: (name) => {
      const minor = ctrl.minors.find((m) => m.record.name === name);
      return minor && exportOf(minor);
    },
    list: () => ctrl.minors.map(exportOf).filter((e): e is NbdExport => e !== undefined),
    log: (level, message) => ctrl.log[level](`nbd: ${message}`),
  });
  ctrl.addDestroyHook((name) => server.disconnectExport(name));
  ctrl.addClientProbe((minor) => {
    const count = server.connectionsTo(minor.record.name);
    return count === 0 ? [] : [`${count} NBD connection${count === 1 ? "" : "s"}`];
  });
  ctrl.nbdSocketPath = server.unixPath;
  const tcp = server.tcp ? `, tcp ${server.tcp.hostname}:${server.tcp.port}` : "";
  ctrl.log.info(`nbd: listening on ${server.unixPath}${tcp}`);
  return server;
}
