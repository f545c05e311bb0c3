/**
 * Errors from system calls made through the shim, named as a C programmer
 * would read them: `pwrite(/img/a.raw): ENOSPC (No space left on device)`.
 * @module
 */

const ERRNO_NAMES: Record<number, [string, string]> = {
  1: ["EPERM", "Operation not permitted"],
  2: ["ENOENT", "No such file or directory"],
  4: ["EINTR", "Interrupted system call"],
  5: ["EIO", "Input/output error"],
  6: ["ENXIO", "No such device or address"],
  9: ["EBADF", "Bad file descriptor"],
  11: ["EAGAIN", "Resource temporarily unavailable"],
  12: ["ENOMEM", "Cannot allocate memory"],
  13: ["EACCES", "Permission denied"],
  14: ["EFAULT", "Bad address"],
  16: ["EBUSY", "Device or resource busy"],
  17: ["EEXIST", "File exists"],
  19: ["ENODEV", "No such device"],
  20: ["ENOTDIR", "Not a directory"],
  21: ["EISDIR", "Is a directory"],
  22: ["EINVAL", "Invalid argument"],
  24: ["EMFILE", "Too many open files"],
  25: ["ENOTTY", "Inappropriate ioctl for device"],
  26: ["ETXTBSY", "Text file busy"],
  27: ["EFBIG", "File too large"],
  28: ["ENOSPC", "No space left on device"],
  29: ["ESPIPE", "Illegal seek"],
  30: ["EROFS", "Read-only file system"],
  32: ["EPIPE", "Broken pipe"],
  38: ["ENOSYS", "Function not implemented"],
  40: ["ELOOP", "Too many levels of symbolic links"],
  61: ["ENODATA", "No data available"],
  74: ["EBADMSG", "Bad message"],
  95: ["EOPNOTSUPP", "Operation not supported"],
  104: ["ECONNRESET", "Connection reset by peer"],
  110: ["ETIMEDOUT", "Connection timed out"],
  116: ["ESTALE", "Stale file handle"],
  122: ["EDQUOT", "Disk quota exceeded"],
};

/** Name of an errno value, e.g. `ENOENT`; `E<n>` for unknown values. */
export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno]?.[0] ?? `E${errno}`;
}

/** A failed system call: which call, on which file, and the errno. */
export class SysError extends Error {
  /** Positive errno value (`2` for ENOENT). */
  readonly errno: number;
  /** The errno's symbolic name (`ENOENT`). */
  readonly code: string;
  /** The system call that failed (`open`, `io_submit`, ...). */
  readonly syscall: string;
  /** The file or object the call was about, if any. */
  readonly path: string;

  constructor(syscall: string, errno: number, path = "") {
    const [code, text] = ERRNO_NAMES[errno] ?? [`E${errno}`, "Unknown error"];
    super(`${syscall}${path ? `(${path})` : ""}: ${code} (${text})`);
    this.name = "SysError";
    this.errno = errno;
    this.code = code;
    this.syscall = syscall;
    this.path = path;
  }
}

/**
 * Turns a shim return value (>= 0 or -errno) into a number, throwing a
 * {@linkcode SysError} for negative values.
 */
export function check(result: number | bigint, syscall: string, path = ""): number {
  const value = Number(result);
  if (value < 0) throw new SysError(syscall, -value, path);
  return value;
}
