/**
 * Paths in shared places (`/dev/shm`, `/tmp`, a run dir) that no other user
 * can substitute or reach: blktap runs as root, so a file it follows
 * through a symbolic link someone else planted, or a socket others may
 * connect to, hands them the host.
 *
 * - private directories: created mode 0700; an existing one must be a real
 *   directory (not a symbolic link) owned by our effective uid, with no
 *   access for group or others;
 * - private files: created with O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600;
 *   opened with O_NOFOLLOW and checked on the open descriptor (regular
 *   file, our owner, no group/other access), so what is checked is what is
 *   used;
 * - private sockets: bound with umask 0177, so the socket is 0600 from its
 *   first instant (no chmod after listen).
 *
 * Every refusal names the path and what is wrong with it.
 * @module
 */
import { SysError } from "./errno.ts";
import { File, type OpenOptions } from "./file.ts";

/** Permission bits that must be clear on a private file or directory (group, others, set-id, sticky). */
const shared_mode_bits = 0o7077;

let euidCache: number | undefined;

/** Our effective uid (the owner of what we create), from /proc/self/status. */
export function effectiveUid(): number {
  if (euidCache === undefined) {
    const line = Deno.readTextFileSync("/proc/self/status").split("\n")
      .find((l) => l.startsWith("Uid:"));
    const euid = Number(line?.split(/\s+/)[2]);
    euidCache = Number.isInteger(euid) ? euid : Deno.uid() ?? 0;
  }
  return euidCache;
}

function octal(mode: number): string {
  return (mode & 0o7777).toString(8).padStart(4, "0");
}

/** The refusal for an entry that is not private, or undefined when it is. */
function privacyProblem(info: Deno.FileInfo, kind: "directory" | "file"): string | undefined {
  if (info.isSymlink) return "is a symbolic link";
  if (kind === "directory" && !info.isDirectory) return "is not a directory";
  if (kind === "file" && !info.isFile) return "is not a regular file";
  const uid = effectiveUid();
  if (info.uid !== uid) return `is owned by uid ${info.uid}, not by us (uid ${uid})`;
  const mode = info.mode ?? 0;
  if ((mode & shared_mode_bits) !== 0) {
    const expected = kind === "directory" ? "0700" : "0600";
    return `has mode ${octal(mode)}: group or others have access (expected ${expected})`;
  }
  return undefined;
}

/**
 * Makes sure `path` is a private directory: created (mode 0700, parents as
 * needed) when absent; when present, it must be a directory owned by us
 * with no group or other access. `what` names its role in the error
 * ("run dir", ...).
 */
export function ensurePrivateDir(path: string, what: string): void {
  const parent = path.slice(0, path.lastIndexOf("/"));
  if (parent) Deno.mkdirSync(parent, { recursive: true });
  try {
    Deno.mkdirSync(path, { mode: 0o700 }); // the umask can only narrow it
  } catch (error) {
    if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
  }
  const problem = privacyProblem(Deno.lstatSync(path), "directory");
  if (problem) {
    const hint = problem.startsWith("has mode") ? ` (if it is yours: chmod 700 ${path})` : "";
    throw new Error(`${what} ${path} ${problem}: refusing to use it${hint}`);
  }
}

/** Makes a new private directory with a random name under `parent` (mode 0700, like mkdtemp). */
export function makePrivateTempDir(parent: string, prefix: string): string {
  const path = Deno.makeTempDirSync({ dir: parent, prefix });
  ensurePrivateDir(path, "temporary directory");
  return path;
}

function refusal(path: string, what: string, problem: string): Error {
  return new Error(`${what} ${path} ${problem}: refusing to use it`);
}

// Checks the open descriptor itself: /proc/self/fd/N names the inode we hold.
function checkOpenFile(file: File, what: string): void {
  const problem = privacyProblem(Deno.statSync(`/proc/self/fd/${file.fd}`), "file");
  if (problem) {
    file.close();
    throw refusal(file.path, what, problem);
  }
}

// Opens without following a final symbolic link, then checks what was opened.
function openChecked(path: string, what: string, options: OpenOptions): File {
  let file: File;
  try {
    file = File.open(path, { ...options, write: true, noFollow: true });
  } catch (error) {
    if (error instanceof SysError && error.code === "ELOOP") {
      throw refusal(path, what, "is a symbolic link");
    }
    throw error;
  }
  checkOpenFile(file, what); // created: the umask may only have narrowed 0600
  return file;
}

/**
 * Creates `path` as a new private file (O_CREAT|O_EXCL|O_NOFOLLOW, mode
 * 0600), read-write. Fails with a {@linkcode SysError} EEXIST when anything,
 * a symbolic link included, is already there.
 */
export function createPrivateFile(path: string, what: string): File {
  return openChecked(path, what, { createNew: true, mode: 0o600 });
}

/**
 * Opens the existing private file `path` read-write without following a
 * symbolic link, and checks the open file: a regular file owned by us with
 * no group or other access. Throws naming the path and the problem.
 */
export function openPrivateFile(path: string, what: string): File {
  return openChecked(path, what, {});
}

/** Opens the private file `path`, creating it (O_EXCL) when absent; see {@linkcode openPrivateFile}. */
export function openOrCreatePrivateFile(path: string, what: string): File {
  for (let attempt = 0;; attempt += 1) {
    try {
      return createPrivateFile(path, what);
    } catch (error) {
      if (!(error instanceof SysError && error.code === "EEXIST")) throw error;
    }
    try {
      return openPrivateFile(path, what);
    } catch (error) {
      // Removed between our two calls (a last detacher): create it again.
      if (!(error instanceof SysError && error.code === "ENOENT") || attempt >= 8) throw error;
    }
  }
}

/**
 * The same open file as a `Deno.FsFile` (for `flock`), reopened through
 * `/proc/self/fd/N`: the inode already checked, never the path again.
 * Closes `file`.
 */
export function asFsFile(file: File): Deno.FsFile {
  try {
    return Deno.openSync(`/proc/self/fd/${file.fd}`, { read: true, write: true });
  } finally {
    file.close();
  }
}

/**
 * Listens on a Unix socket at `path` whose mode is 0600 from the moment it
 * exists: the umask is 0177 during `bind`, so no other user can ever
 * connect. A stale socket at `path` is replaced; anything else there is
 * an error (bind fails with EADDRINUSE).
 */
export function listenPrivateUnix(path: string): Deno.UnixListener {
  try {
    if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
  } catch {
    // nothing there
  }
  const previous = Deno.umask(0o177);
  try {
    return Deno.listen({ transport: "unix", path });
  } finally {
    Deno.umask(previous);
  }
}
