/**
 * Finds the descriptor of a connection the server accepted, so it can use
 * the socket beyond what `Deno.Conn` offers (a larger send buffer,
 * sendfile). Deno names no descriptor, so it is found in /proc, and only
 * where the answer is unambiguous; otherwise nothing is found and the
 * connection is served through `Deno.Conn` alone.
 *
 * - Unix: by elimination. The connected sockets bound to the listener's
 *   path that this process holds (/proc/net/unix, /proc/self/fd), taken
 *   before and after `accept`: only this server accepts on that path, one
 *   at a time, so exactly one socket is new, that one.
 * - TCP (IPv4): by its two addresses, which name one established
 *   connection (/proc/net/tcp), held by exactly one descriptor here.
 * @module
 */
import { SocketFd } from "../../../ffi/socket.ts";

/** /proc/net/unix `St` of a connected socket (SS_CONNECTED). */
const state_connected = "03";
/** A /proc/net/unix line: Num RefCount Protocol Flags Type St Inode [Path]; the path may hold spaces. */
const unix_line = /^\s*\S+:\s+\S+\s+\S+\s+\S+\s+\S+\s+(\S+)\s+(\d+)(?: (.*))?$/;
/** /proc/net/tcp `st` of an established connection (TCP_ESTABLISHED). */
const tcp_established = "01";

/** Inodes of the connected Unix sockets bound to `path` that this process holds, with their descriptors. */
export function connectedSocketsOn(path: string): Map<bigint, number> {
  const inodes = new Set<bigint>();
  for (const line of Deno.readTextFileSync("/proc/net/unix").split("\n")) {
    const match = unix_line.exec(line);
    if (match && match[1] === state_connected && match[3] === path) inodes.add(BigInt(match[2]));
  }
  return new Map(heldSockets(inodes));
}

/**
 * Our own descriptor of the one socket connected on `path` that is in
 * `after` and not in `before` (both from {@linkcode connectedSocketsOn});
 * undefined unless there is exactly one.
 */
export function adoptNewSocket(
  before: Map<bigint, number>,
  after: Map<bigint, number>,
): SocketFd | undefined {
  const fresh = [...after].filter(([inode]) => !before.has(inode));
  return fresh.length === 1 ? adopt(fresh[0]) : undefined;
}

/**
 * Our own descriptor of IPv4 TCP connection `conn`: its two addresses name
 * one established connection in /proc/net/tcp (TCP keeps them unique),
 * whose socket exactly one descriptor of this process holds; undefined
 * otherwise (IPv6 among others).
 */
export function adoptTcpSocket(conn: Deno.TcpConn): SocketFd | undefined {
  const local = procAddress(conn.localAddr);
  const remote = procAddress(conn.remoteAddr);
  if (!local || !remote) return undefined;
  const inodes = new Set<bigint>();
  // Columns: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
  for (const line of Deno.readTextFileSync("/proc/net/tcp").split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f[1] === local && f[2] === remote && f[3] === tcp_established) inodes.add(BigInt(f[9]));
  }
  if (inodes.size !== 1) return undefined;
  const held = heldSockets(inodes);
  return held.length === 1 ? adopt(held[0]) : undefined;
}

// The descriptors of this process that hold one of `inodes`, with the inode.
function heldSockets(inodes: Set<bigint>): [bigint, number][] {
  const held: [bigint, number][] = [];
  if (inodes.size === 0) return held;
  for (const entry of Deno.readDirSync("/proc/self/fd")) {
    let link: string;
    try {
      link = Deno.readLinkSync(`/proc/self/fd/${entry.name}`);
    } catch {
      continue; // closed meanwhile (the directory's own descriptor, among others)
    }
    const match = /^socket:\[(\d+)\]$/.exec(link);
    if (match && inodes.has(BigInt(match[1]))) held.push([BigInt(match[1]), Number(entry.name)]);
  }
  return held;
}

function adopt([inode, fd]: [bigint, number]): SocketFd | undefined {
  try {
    return SocketFd.adopt(fd, inode);
  } catch {
    return undefined;
  }
}

/**
 * An IPv4 address as /proc/net/tcp writes it, `0100007F:1F90`: the 32-bit
 * address printed as a host-order number (bytes reversed on this
 * little-endian machine; elsewhere nothing matches, and nothing is found).
 */
function procAddress(addr: Deno.NetAddr): string | undefined {
  const parts = /^(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(addr.hostname)?.slice(1).map(Number);
  if (!parts || parts.some((p) => p > 255)) return undefined;
  const hex = (n: number, digits: number) => n.toString(16).toUpperCase().padStart(digits, "0");
  return parts.reverse().map((p) => hex(p, 2)).join("") + ":" + hex(addr.port, 4);
}
