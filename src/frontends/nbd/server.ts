/**
 * The NBD server (DESIGN.md §6): one listener (a Unix socket by default,
 * TCP when asked), exports found by name through the caller's `lookup`,
 * connections bounded in number, each running the handshake and then the
 * transmission phase. Inside `blktap ctrl` the exports are ring front ends;
 * `blktap serve` and the tests serve drivers opened in-process.
 *
 * A misbehaving client only ever ends its own connection: every error on a
 * connection is caught here, logged, and the socket closed. Payload memory
 * is one budget for the whole server (see limits.ts): a client over its
 * share waits, and one that stops reading its replies is cut after
 * `reply_stall_timeout_ms`.
 * @module
 */
import { listenPrivateUnix } from "../../../ffi/private_path.ts";
import type { SocketFd } from "../../../ffi/socket.ts";
import { type NbdExport } from "./export.ts";
import { HandshakeAbort, negotiate } from "./handshake.ts";
import { DEFAULT_LIMITS, type NbdLimits } from "./limits.ts";
import { type PayloadMemory, PayloadPool } from "./payload_pool.ts";
import { adoptNewSocket, adoptTcpSocket, connectedSocketsOn } from "./own_socket.ts";
import { type NbdServerStats, newStats } from "./stats.ts";
import { ReplyWriter } from "./reply_writer.ts";
import { ShortReadError, SocketReader } from "./socket_reader.ts";
import { ProtocolError, Transmission } from "./transmission.ts";

export type { NbdExport } from "./export.ts";
export type { NbdLimits } from "./limits.ts";
export type { PayloadMemory } from "./payload_pool.ts";
export type { NbdServerStats } from "./stats.ts";

/** Severity of a server log line. */
export type NbdLogLevel = "debug" | "info" | "warn";

/** How to start a server. At least one of `unixPath` and `tcp` is needed. */
export interface NbdServerOptions {
  /**
   * Listen on this Unix socket (a stale socket file there is replaced). It
   * is mode 0600 from the moment it is bound: only our user may connect.
   */
  unixPath?: string;
  /**
   * Listen on TCP; `hostname` defaults to 127.0.0.1, `port` 0 picks a free
   * port. TCP has no authentication (and TLS is refused): anyone who can
   * reach the address can read and write every export.
   */
  tcp?: { hostname?: string; port: number };
  /** The export a client names, or undefined. Called at every GO/INFO/EXPORT_NAME. */
  lookup(name: string): NbdExport | undefined;
  /** Exports shown to NBD_OPT_LIST. */
  list(): NbdExport[];
  /** Overrides of {@linkcode DEFAULT_LIMITS}. */
  limits?: Partial<NbdLimits>;
  /** Where log lines go; default: warnings to stderr, the rest dropped. */
  log?: (level: NbdLogLevel, message: string) => void;
}

/** A running server. */
export interface NbdServer {
  /** The Unix socket path, when listening on one. */
  readonly unixPath?: string;
  /** The bound TCP address (with the real port when 0 was asked). */
  readonly tcp?: { hostname: string; port: number };
  /** Connections currently open. */
  readonly connectionCount: number;
  /** The limits in force. */
  readonly limits: NbdLimits;
  /** Counters since start (for `blktap ctrl stats`). */
  readonly stats: NbdServerStats;
  /** Payload memory held, peak and pooled, by the server's own accounting. */
  readonly payloadMemory: PayloadMemory;
  /**
   * Stops listening, lets requests in flight finish (up to
   * `close_grace_ms`), closes every connection. Exports are not closed:
   * they belong to the caller.
   */
  close(): Promise<void>;
  /** Closes the connections using export `name` (after its requests finish), e.g. on destroy. */
  disconnectExport(name: string): Promise<void>;
  /** Connections in the transmission phase on export `name`. */
  connectionsTo(name: string): number;
}

/** Receive buffer per connection: holds a queue depth's worth of 4 KiB writes. */
const receive_buffer_bytes = 256 << 10;
/**
 * Send buffer asked for a connection whose socket we hold: room for a few
 * 1 MiB replies, so the client's reading and our next write overlap (the
 * kernel caps it at net.core.wmem_max).
 */
const send_buffer_bytes = 4 << 20;

interface Connection {
  conn: Deno.Conn;
  /** Our own descriptor of its socket, when found: closed with `conn`. */
  socket?: SocketFd;
  writer?: ReplyWriter;
  exportName?: string;
  transmission?: Transmission;
  done: Promise<void>;
}

function defaultLog(level: NbdLogLevel, message: string): void {
  if (level === "warn") console.error(`blktap nbd: ${message}`);
}

function closeQuietly(closer: { close(): void }): void {
  try {
    closer.close();
  } catch {
    // already closed
  }
}

function removeStaleSocket(path: string): void {
  try {
    if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
  } catch {
    // nothing there
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits for `promise`, at most `ms`; the timer never outlives the wait. */
async function waitAtMost(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)));
  try {
    await Promise.race([promise.catch(() => {}), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Starts listening; resolves once the sockets are bound. */
export function startNbdServer(options: NbdServerOptions): Promise<NbdServer> {
  if (!options.unixPath && !options.tcp) {
    return Promise.reject(new Error("startNbdServer: give unixPath or tcp"));
  }
  try {
    return Promise.resolve(new Server(options));
  } catch (error) {
    return Promise.reject(error);
  }
}

class Server implements NbdServer {
  readonly limits: NbdLimits;
  readonly stats: NbdServerStats = newStats();
  readonly unixPath?: string;
  readonly tcp?: { hostname: string; port: number };
  readonly #options: NbdServerOptions;
  readonly #log: (level: NbdLogLevel, message: string) => void;
  readonly #listeners: Deno.Listener[] = [];
  readonly #accepting: Promise<void>[] = [];
  readonly #connections = new Set<Connection>();
  readonly #pool: PayloadPool;
  readonly #stallTimer: ReturnType<typeof setInterval>;
  #closing = false;

  constructor(options: NbdServerOptions) {
    this.#options = options;
    this.limits = { ...DEFAULT_LIMITS, ...options.limits };
    this.#log = options.log ?? defaultLog;
    const limits = this.limits;
    this.#pool = new PayloadPool(
      limits.payload_bytes_max,
      Math.min(limits.connection_payload_bytes_max, limits.payload_bytes_max),
    );
    this.#pool.checkFits(limits.request_bytes_max, "payload_bytes_max");
    if (options.unixPath) {
      this.#listeners.push(listenPrivateUnix(options.unixPath));
      this.unixPath = options.unixPath;
    }
    if (options.tcp) {
      const hostname = options.tcp.hostname ?? "127.0.0.1";
      let listener: Deno.Listener;
      try {
        listener = Deno.listen({ hostname, port: options.tcp.port });
      } catch (error) {
        for (const l of this.#listeners) closeQuietly(l);
        throw error;
      }
      this.#listeners.push(listener);
      this.tcp = { hostname, port: (listener.addr as Deno.NetAddr).port };
    }
    for (const listener of this.#listeners) this.#accepting.push(this.#acceptLoop(listener));
    const period = Math.max(10, Math.min(5_000, limits.reply_stall_timeout_ms / 4));
    this.#stallTimer = setInterval(() => this.#cutStalled(), period);
  }

  get connectionCount(): number {
    return this.#connections.size;
  }

  get payloadMemory(): PayloadMemory {
    return this.#pool.memory;
  }

  // A client that stopped reading its replies holds their memory: cut it.
  #cutStalled(): void {
    const now = performance.now();
    for (const c of this.#connections) {
      if ((c.writer?.stalledMs(now) ?? 0) <= this.limits.reply_stall_timeout_ms) continue;
      this.stats.stalled_disconnects_total++;
      this.#log(
        "info",
        `closing a connection whose replies did not move for ${this.limits.reply_stall_timeout_ms} ms`,
      );
      closeQuietly(c.conn);
      c.socket?.cut(); // a sendfile waiting for room returns
    }
  }

  async #acceptLoop(listener: Deno.Listener): Promise<void> {
    const unixPath = listener.addr.transport === "unix" ? listener.addr.path : undefined;
    for (;;) {
      let conn: Deno.Conn;
      let before: Map<bigint, number> | undefined;
      try {
        before = unixPath ? this.#connectedOn(unixPath) : undefined;
        conn = await listener.accept();
      } catch (error) {
        if (this.#closing) return;
        this.#log("warn", `accept failed: ${(error as Error).message}`);
        await delay(10);
        continue;
      }
      if (this.#closing || this.#connections.size >= this.limits.connections_max) {
        this.stats.connections_refused_total++;
        this.#log("info", `refusing a connection: ${this.#connections.size} open`);
        closeQuietly(conn);
        continue;
      }
      if ("setNoDelay" in conn) (conn as Deno.TcpConn).setNoDelay(true);
      this.stats.connections_total++;
      const connection: Connection = { conn, done: Promise.resolve() };
      connection.socket = this.#ownSocket(() => {
        if (!before || !unixPath) return adoptTcpSocket(conn as Deno.TcpConn);
        const after = this.#connectedOn(unixPath);
        return after && adoptNewSocket(before, after);
      });
      this.#connections.add(connection);
      connection.done = this.#serve(connection).finally(() => this.#connections.delete(connection));
    }
  }

  // Synchronously after accept (before the next one): see own_socket.ts.
  #ownSocket(find: () => SocketFd | undefined): SocketFd | undefined {
    let socket: SocketFd | undefined;
    try {
      socket = find();
      socket?.setSendBufferBytes(send_buffer_bytes);
    } catch (error) {
      this.#log("debug", `connection socket: ${(error as Error).message}`);
    }
    return socket;
  }

  #connectedOn(unixPath: string): Map<bigint, number> | undefined {
    try {
      return connectedSocketsOn(unixPath);
    } catch (error) {
      this.#log("debug", `connection sockets not found: ${(error as Error).message}`);
      return undefined;
    }
  }

  async #serve(connection: Connection): Promise<void> {
    const { conn } = connection;
    const reader = new SocketReader(conn, receive_buffer_bytes);
    const writer = new ReplyWriter(conn);
    connection.writer = writer;
    const log = this.#log;
    const timer = setTimeout(() => {
      log("info", "handshake timed out");
      closeQuietly(conn);
    }, this.limits.handshake_timeout_ms);
    try {
      const session = await negotiate(reader, writer, {
        lookup: (name) => this.#options.lookup(name),
        list: () => this.#options.list(),
        limits: this.limits,
        shuttingDown: () => this.#closing,
        log,
      });
      clearTimeout(timer);
      if (!session) return await writer.idle();
      this.stats.sessions_total++;
      connection.exportName = session.nbdExport.name;
      connection.transmission = new Transmission(reader, writer, session, {
        payloads: this.#pool.account(),
        stats: this.stats,
        limits: this.limits,
        socket: connection.socket, // raw bytes on the wire: NBD in the clear (TLS is refused)
        shuttingDown: () => this.#closing,
        log,
      });
      await connection.transmission.run();
    } catch (error) {
      const expected = error instanceof HandshakeAbort || error instanceof ProtocolError ||
        error instanceof ShortReadError || error instanceof Deno.errors.BadResource ||
        error instanceof Deno.errors.ConnectionReset || error instanceof Deno.errors.BrokenPipe ||
        error instanceof Deno.errors.Interrupted;
      if (error instanceof HandshakeAbort || error instanceof ProtocolError) {
        this.stats.protocol_disconnects_total++;
      }
      log(expected ? "debug" : "warn", `connection ended: ${(error as Error)?.message ?? error}`);
    } finally {
      clearTimeout(timer);
      closeQuietly(conn);
      connection.socket?.close();
      // Requests still running hold driver calls and buffers: let them settle (bounded).
      const transmission = connection.transmission;
      if (transmission) await waitAtMost(transmission.drain(), this.limits.close_grace_ms);
    }
  }

  async #shutdown(connections: Connection[]): Promise<void> {
    await Promise.all(connections.map(async (c) => {
      if (c.transmission) await waitAtMost(c.transmission.drain(), this.limits.close_grace_ms);
      closeQuietly(c.conn);
      await c.done;
    }));
  }

  connectionsTo(name: string): number {
    let count = 0;
    for (const c of this.#connections) if (c.exportName === name) count++;
    return count;
  }

  disconnectExport(name: string): Promise<void> {
    return this.#shutdown([...this.#connections].filter((c) => c.exportName === name));
  }

  async close(): Promise<void> {
    if (this.#closing) return;
    this.#closing = true;
    clearInterval(this.#stallTimer);
    for (const listener of this.#listeners) closeQuietly(listener);
    await Promise.all(this.#accepting);
    // Connections still haggling have nothing in flight: cut them now.
    for (const c of this.#connections) if (!c.transmission) closeQuietly(c.conn);
    await this.#shutdown([...this.#connections]);
    if (this.unixPath) removeStaleSocket(this.unixPath);
  }
}
