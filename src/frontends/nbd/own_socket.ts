/**
 * Finds the descriptor of a connection a Unix listener just accepted, so the
 * server can use the socket beyond what `Deno.Conn` offers (a larger send
 * buffer, sendfile). Deno names no descriptor, so it is found by
 * elimination: the connected sockets bound to the listener's path that this
 * process holds (/proc/net/unix, /proc/self/fd), taken before and after
 * `accept`. Only this server accepts on that path, one at a time, so
 * exactly one socket is new: that one. Anything else (none new, several)
 * finds nothing, and the connection is served through `Deno.Conn` alone.
 * @module
 */
import { SocketFd } from "../../../ffi/socket.ts";

/** /proc/net/unix `St` of a connected socket (SS_CONNECTED). */
const state_connected = "03";
/** A /proc/net/unix line: Num RefCount Protocol Flags Type St Inode [Path]; the path may hold spaces. */
const unix_line = /^\s*\S+:\s+\S+\s+\S+\s+\S+\s+\S+\s+(\S+)\s+(\d+)(?: (.*))?$/;

/** Inodes of the connected Unix sockets bound to `path` that this process holds, with their descriptors. */
export function connectedSocketsOn(path: string): Map<bigint, number> {
  const inodes = new Set<bigint>();
  for (const line of Deno.readTextFileSync("/proc/net/unix").split("\n")) {
    const match = unix_line.exec(line);
    if (match && match[1] === state_connected && match[3] === path) inodes.add(BigInt(match[2]));
  }
  const held = new Map<bigint, number>();
  if (inodes.size === 0) return held;
  for (const entry of Deno.readDirSync("/proc/self/fd")) {
    let link: string;
    try {
      link = Deno.readLinkSync(`/proc/self/fd/${entry.name}`);
    } catch {
      continue; // closed meanwhile (the directory's own descriptor, among others)
    }
    const match = /^socket:\[(\d+)\]$/.exec(link);
    if (match && inodes.has(BigInt(match[1]))) held.set(BigInt(match[1]), Number(entry.name));
  }
  return held;
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
  if (fresh.length !== 1) return undefined;
  const [inode, fd] = fresh[0];
  try {
    return SocketFd.adopt(fd, inode);
  } catch {
    return undefined;
  }
}
