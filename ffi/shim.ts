/**
 * Loads `shim/libaio_shim.so` and declares its symbols. Every other module
 * in `ffi/` goes through {@linkcode shim}; nothing else calls `dlopen`.
 *
 * The library is looked up in `$BLKTAP_SHIM`, then beside the sources. In a
 * `deno compile`d executable the embedded copy can be read but not
 * dlopen()ed in place: it is copied into an anonymous memory file
 * (`memfd_create`) and loaded through `/proc/self/fd/N`. Nothing is written
 * to or loaded from a shared folder, so no other user can substitute the
 * code this process runs (a file planted in `/tmp` is never looked at).
 * @module
 */

const SHIM_ABI_VERSION = 8;

const SYMBOLS = {
  shim_abi_version: { parameters: [], result: "i32" },
  shim_open: { parameters: ["buffer", "i32", "i32"], result: "i64" },
  shim_close: { parameters: ["i32"], result: "i64" },
  shim_pread: { parameters: ["i32", "u64", "u64", "i64"], result: "i64" },
  shim_pread_cached: { parameters: ["i32", "buffer", "u32", "i64"], result: "i64" },
  // The same off the JavaScript thread: a large copy runs beside it.
  shim_pread_cached_beside: {
    name: "shim_pread_cached",
    parameters: ["i32", "buffer", "u32", "i64"],
    result: "i64",
    nonblocking: true,
  },
  shim_all_cached: { parameters: ["i32", "i64", "i64"], result: "i64" },
  shim_dup_socket: { parameters: ["i32", "u64"], result: "i64" },
  shim_socket_sndbuf: { parameters: ["i32", "i32"], result: "i64" },
  shim_shutdown: { parameters: ["i32"], result: "i64" },
  // Off the JavaScript thread: it may wait for the socket to take bytes.
  shim_send_file: {
    parameters: ["i32", "buffer", "u32", "i32", "i64", "u32", "i32"],
    result: "i64",
    nonblocking: true,
  },
  shim_pwrite: { parameters: ["i32", "u64", "u64", "i64"], result: "i64" },
  // The same off the JavaScript thread: a page-cache write may wait (dirty throttling).
  shim_pwrite_beside: {
    name: "shim_pwrite",
    parameters: ["i32", "u64", "u64", "i64"],
    result: "i64",
    nonblocking: true,
  },
  shim_fdatasync: { parameters: ["i32"], result: "i64" },
  shim_fsync: { parameters: ["i32"], result: "i64" },
  shim_ftruncate: { parameters: ["i32", "i64"], result: "i64" },
  shim_fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i64" },
  shim_lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  shim_fsize: { parameters: ["i32", "buffer"], result: "i64" },
  shim_fallocated: { parameters: ["i32"], result: "i64" },
  shim_ioctl: { parameters: ["i32", "u64", "u64"], result: "i64" },
  shim_poll: { parameters: ["i32", "i32", "i32"], result: "i64", nonblocking: true },
  shim_ofd_lock: { parameters: ["i32", "i32", "i32", "i64", "i64"], result: "i64" },
  shim_alloc_aligned: { parameters: ["u64"], result: "i64" },
  shim_mmap_shared: { parameters: ["i32", "u64", "i64"], result: "i64" },
  shim_munmap: { parameters: ["u64", "u64"], result: "i64" },
  shim_memcpy: { parameters: ["u64", "u64", "u64"], result: "i64" },
  shim_fence: { parameters: [], result: "void" },
  shim_io_create: { parameters: ["i32", "u32"], result: "i64" },
  shim_io_destroy: { parameters: ["u64"], result: "i64" },
  shim_io_events: { parameters: ["u64"], result: "i64" },
  shim_io_submit: { parameters: ["u64", "buffer", "u32"], result: "i64" },
  shim_io_reap: { parameters: ["u64"], result: "i64" },
  // Runs off the JavaScript thread: it only sleeps until completions may be there.
  shim_io_wait: { parameters: ["u64", "i64"], result: "i64", nonblocking: true },
  // The same wait on the JavaScript thread (a process with nothing else to do while it waits).
  shim_io_wait_here: { name: "shim_io_wait", parameters: ["u64", "i64"], result: "i64" },
  // The same, also returning when a shared ring's index moves (on the JavaScript thread).
  shim_io_wait_ring: { parameters: ["u64", "i64", "u64", "u32", "i64"], result: "i64" },
} as const satisfies Deno.ForeignLibraryInterface;

/** The shim's symbols, typed. */
export type ShimSymbols = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

function candidatePaths(): string[] {
  const paths: string[] = [];
  const fromEnv = Deno.env.get("BLKTAP_SHIM");
  if (fromEnv) paths.push(fromEnv);
  paths.push(new URL("../shim/libaio_shim.so", import.meta.url).pathname);
  return paths;
}

// libc, reached before the shim exists: for the in-memory copy.
const LIBC_SYMBOLS = {
  memfd_create: { parameters: ["buffer", "u32"], result: "i32" },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  close: { parameters: ["i32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

const MFD_CLOEXEC = 0x1;
/** Linux 6.3+: an executable memfd even where vm.memfd_noexec defaults to no-exec. */
const MFD_EXEC = 0x10;
const EINVAL = 22;

type Libc = Deno.DynamicLibrary<typeof LIBC_SYMBOLS>["symbols"];

function errnoOf(libc: Libc): number {
  const pointer = libc.__errno_location();
  return pointer ? new Deno.UnsafePointerView(pointer).getInt32() : 0;
}

function createMemfd(libc: Libc, name: string): number {
  const cName = new TextEncoder().encode(`${name}\0`);
  let fd = libc.memfd_create(cName, MFD_CLOEXEC | MFD_EXEC);
  // Kernels before 6.3 refuse the flag they do not know; their memfds are executable.
  if (fd < 0 && errnoOf(libc) === EINVAL) fd = libc.memfd_create(cName, MFD_CLOEXEC);
  if (fd < 0) throw new Error(`memfd_create: errno ${errnoOf(libc)}`);
  return fd;
}

/**
 * Loads a shared library from `bytes` without a file anyone else can
 * reach: the bytes go into an anonymous memory file of this process
 * (`memfd_create`), which is dlopen()ed through `/proc/self/fd/N` and then
 * closed (the mapping keeps the code).
 */
export function dlopenFromMemory<S extends Deno.ForeignLibraryInterface>(
  bytes: Uint8Array,
  symbols: S,
  name = "blktap-shim",
): Deno.DynamicLibrary<S> {
  const libc = Deno.dlopen("libc.so.6", LIBC_SYMBOLS);
  try {
    const fd = createMemfd(libc.symbols, name);
    try {
      for (let done = 0; done < bytes.byteLength;) {
        const wrote = Number(
          libc.symbols.write(fd, bytes.subarray(done), BigInt(bytes.byteLength - done)),
        );
        if (wrote <= 0) throw new Error(`write(memfd): errno ${errnoOf(libc.symbols)}`);
        done += wrote;
      }
      return Deno.dlopen(`/proc/self/fd/${fd}`, symbols);
    } finally {
      libc.symbols.close(fd);
    }
  } finally {
    libc.close();
  }
}

function checkAbi(lib: Deno.DynamicLibrary<typeof SYMBOLS>): Deno.DynamicLibrary<typeof SYMBOLS> {
  const abi = lib.symbols.shim_abi_version();
  if (abi !== SHIM_ABI_VERSION) {
    lib.close();
    throw new Error(`ABI version ${abi}, expected ${SHIM_ABI_VERSION}: rebuild with make`);
  }
  return lib;
}

function load(): Deno.DynamicLibrary<typeof SYMBOLS> {
  const failures: string[] = [];
  for (const path of candidatePaths()) {
    try {
      return checkAbi(Deno.dlopen(path, SYMBOLS));
    } catch (error) {
      failures.push(`${path}: ${(error as Error).message}`);
    }
    // Embedded in a compiled executable: readable, not mappable in place.
    let bytes: Uint8Array;
    try {
      bytes = Deno.readFileSync(path);
    } catch {
      continue;
    }
    try {
      return checkAbi(dlopenFromMemory(bytes, SYMBOLS));
    } catch (error) {
      failures.push(`${path} (copied to memory): ${(error as Error).message}`);
    }
  }
  throw new Error(
    `cannot load the I/O shim (run 'make' to build shim/libaio_shim.so):\n  ${
      failures.join("\n  ")
    }`,
  );
}

/** The loaded shim's symbols. */
export const shim: ShimSymbols = load().symbols;
