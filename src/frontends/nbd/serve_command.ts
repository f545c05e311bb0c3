/**
 * `blktap serve IMAGE`: serves one image over NBD from this process, with
 * no ring and no daemon (like `qemu-nbd`), for users who want a quick
 * export and for benchmarks of the NBD front end alone.
 * @module
 */
import { makePrivateTempDir } from "../../../ffi/private_path.ts";
import {
  type Command,
  parseCommandArgs,
  parseHostPort,
  parseSize,
  UsageError,
} from "../../cli/command.ts";
import { waitForStopSignal } from "../../cli/signals.ts";
import { ALLOW_PATH_OPTION, allowPathHelp, parseAllowPaths } from "../../cli/allow_path.ts";
import type { BlockDriver } from "../../formats/driver.ts";
import { openImage, probedNote, resolveImageSpec } from "../../formats/open_image.ts";
import type { NbdExport } from "./export.ts";
import { DEFAULT_LIMITS, payloadBytesMin } from "./limits.ts";
import { startNbdServer } from "./server.ts";

const payloadMaxDefault = `${DEFAULT_LIMITS.payload_bytes_max >> 20}M`;

const usage = `usage: blktap serve IMAGE [--socket PATH] [--tcp HOST:PORT] [--name NAME]
                    [--description TEXT] [--readonly] [--cache none|writeback]
                    [--payload-max SIZE] [--allow-path DIR]...

Serves IMAGE (type:path, or a path whose format is probed once, at start)
over NBD from this process until SIGINT or SIGTERM. A writable image probed
as raw refuses writes that would make it probe as another format (name it
aio:PATH to lift that). The image is locked as QEMU locks images.

Listens on a Unix socket, mode 0600 (only this user may connect): by default
nbd.sock in a new private directory (0700) under $TMPDIR, printed at start
and removed at exit. With --tcp, on TCP instead (port 0 picks one).

TCP has no authentication and no encryption (TLS is refused): every process
that can reach HOST:PORT may read and write the image. HOST defaults to
127.0.0.1, which every local user can reach; bind another address only on a
network you trust as much as root on this machine.

Options:
  --socket PATH        Unix socket to listen on
  --tcp HOST:PORT      also (or only, with no --socket) listen on TCP
  --name NAME          export name (default: the empty, default export)
  --description TEXT   description shown by 'nbdinfo --list'
  --readonly           refuse writes (EPERM)
  --cache MODE         none (O_DIRECT, default) or writeback (page cache)
  --payload-max SIZE   memory for request and reply payloads of all clients
                       together (default ${payloadMaxDefault}); a client over its share
                       waits, no client can make the server take more
${allowPathHelp(23)}

Clients: qemu-img info 'nbd+unix:///NAME?socket=PATH', nbdinfo, nbdcopy, fio --ioengine=nbd.`;

/** Parses a payload budget option (`--payload-max`, `--nbd-payload-max`): a size, at least one request. */
export function parsePayloadMax(text: string | undefined, option: string): number | undefined {
  if (text === undefined) return undefined;
  const bytes = parseSize(text);
  const min = payloadBytesMin();
  if (bytes < min) {
    throw new UsageError(
      `${option} must be at least ${min} bytes (one ${DEFAULT_LIMITS.request_bytes_max}-byte request)`,
    );
  }
  return bytes;
}

async function run(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(argv, {
    socket: { type: "string" },
    tcp: { type: "string" },
    name: { type: "string" },
    description: { type: "string" },
    readonly: { type: "boolean" },
    cache: { type: "string" },
    "payload-max": { type: "string" },
    ...ALLOW_PATH_OPTION,
  }, { min: 1, max: 1 });
  const payloadMax = parsePayloadMax(values["payload-max"], "--payload-max");
  const cache = values.cache ?? "none";
  if (cache !== "none" && cache !== "writeback") {
    throw new UsageError(`--cache expects none or writeback, got '${cache}'`);
  }
  const tcp = values.tcp === undefined ? undefined : parseHostPort(values.tcp, "--tcp");
  const readOnly = values.readonly ?? false;
  const allowPaths = parseAllowPaths(values);
  const driver = await openServedImage(positionals[0], readOnly, cache, allowPaths);
  const nbdExport: NbdExport = {
    name: values.name ?? "",
    description: values.description,
    driver,
    readOnly,
  };
  let privateDir: string | undefined;
  try {
    // Never a fixed name in a shared folder: a private directory of our own.
    if (!values.socket && !tcp) {
      privateDir = makePrivateTempDir(Deno.env.get("TMPDIR") ?? "/tmp", "blktap-serve-");
    }
    const unixPath = values.socket ?? (privateDir ? `${privateDir}/nbd.sock` : undefined);
    const server = await startNbdServer({
      unixPath,
      tcp,
      lookup: (name) => (name === nbdExport.name ? nbdExport : undefined),
      list: () => [nbdExport],
      limits: payloadMax === undefined ? {} : { payload_bytes_max: payloadMax },
    });
    const where = [
      server.unixPath && `nbd+unix:///${nbdExport.name}?socket=${server.unixPath}`,
      server.tcp && `nbd://${server.tcp.hostname}:${server.tcp.port}/${nbdExport.name}`,
    ].filter(Boolean).join(" ");
    console.log(
      `blktap serve: ${driver.format}:${driver.path} (${driver.sizeBytes} bytes, cache=${cache}${
        readOnly ? ", read-only" : ""
      }) at ${where}`,
    );
    await waitForStopSignal();
    await server.close();
  } finally {
    await driver.close();
    if (privateDir) await Deno.remove(privateDir, { recursive: true }).catch(() => {});
  }
  return 0;
}

// Probed once, here; served locked, its chain confined, its head guarded when probed raw.
async function openServedImage(
  spec: string,
  readOnly: boolean,
  cache: "none" | "writeback",
  allowPaths: string[],
): Promise<BlockDriver> {
  const image = await resolveImageSpec(spec, readOnly);
  if (image.probed) console.error(`blktap serve: ${probedNote(image.spec)}`);
  if (image.warning) console.error(`blktap serve: WARNING: ${image.warning}`);
  const { probedRaw } = image;
  return await openImage(image.spec, { readOnly, cache, lock: true, probedRaw }, { allowPaths });
}

/** The `serve` subcommand. */
export const SERVE_COMMAND: Command = {
  name: "serve",
  summary: "serve one image over NBD from this process (like qemu-nbd)",
  usage,
  run,
};
