/**
 * In-process harness for NBD front-end tests: a server on a temporary Unix
 * socket serving a map of exports. Peer tools are run and detected with
 * `tools.ts`.
 * @module
 */
import type { BlockDriver } from "../../src/formats/driver.ts";
import { type NbdExport, type NbdServer, startNbdServer } from "../../src/frontends/nbd/server.ts";
import type { NbdLimits } from "../../src/frontends/nbd/limits.ts";

/** A running test server. */
export interface NbdHarness {
  server: NbdServer;
  socket: string;
  dir: string;
  /** `nbd+unix:///NAME?socket=...` */
  uri(name?: string): string;
  /** The same for qemu (`nbd:unix:PATH:exportname=NAME`). */
  qemuUri(name?: string): string;
}

/** Export descriptions for {@linkcode withNbdServer}. */
export interface HarnessExport {
  name: string;
  driver: BlockDriver;
  readOnly?: boolean;
  description?: string;
}

/** Runs `body` with a server on a fresh socket; always closes it and removes the folder. */
export async function withNbdServer(
  exports: HarnessExport[],
  body: (h: NbdHarness) => Promise<void>,
  limits?: Partial<NbdLimits>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-nbd-" });
  const socket = `${dir}/nbd.sock`;
  const table = new Map<string, NbdExport>(
    exports.map((e) => [e.name, { ...e, readOnly: e.readOnly ?? false }]),
  );
  const server = await startNbdServer({
    unixPath: socket,
    lookup: (name) => table.get(name),
    list: () => [...table.values()],
    limits,
    log: (level, message) => {
      if (Deno.env.get("NBD_TEST_LOG") || level === "warn") {
        console.error(`[nbd ${level}] ${message}`);
      }
    },
  });
  try {
    await body({
      server,
      socket,
      dir,
      uri: (name = "") => `nbd+unix:///${name}?socket=${socket}`,
      qemuUri: (name = "") => `nbd+unix:///${name}?socket=${socket}`,
    });
  } finally {
    await server.close();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}
