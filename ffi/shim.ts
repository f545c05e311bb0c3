/**
 * Loads `shim/libaio_shim.so` and declares its symbols. Every other module
 * in `ffi/` goes through {@linkcode shim}; nothing else calls `dlopen`.
 *
 * The library is looked up in `$BLKTAP_SHIM`, then beside the sources. In a
 * `deno compile`d executable the embedded copy cannot be dlopen()ed in place,
 * so it is written once to a content-addressed file in the temp folder.
 * @module
 */

const SHIM_ABI_VERSION = 3;

const SYMBOLS = {
  shim_abi_version: { parameters: [], result: "i32" },
  shim_open: { parameters: ["buffer", "i32", "i32"], result: "i64" },
  shim_close: { parameters: ["i32"], result: "i64" },
  shim_pread: { parameters: ["i32", "u64", "u64", "i64"], result: "i64" },
  shim_pwrite: { parameters: ["i32", "u64", "u64", "i64"], result: "i64" },
  shim_fdatasync: { parameters: ["i32"], result: "i64" },
  shim_fsync: { parameters: ["i32"], result: "i64" },
  shim_ftruncate: { parameters: ["i32", "i64"], result: "i64" },
  shim_fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i64" },
  shim_lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  shim_fsize: { parameters: ["i32", "buffer"], result: "i64" },
  shim_fallocated: { parameters: ["i32"], result: "i64" },
  shim_ioctl: { parameters: ["i32", "u64", "u64"], result: "i64" },
  shim_ofd_lock: { parameters: ["i32", "i32", "i32", "i64", "i64"], result: "i64" },
  shim_alloc_aligned: { parameters: ["u64"], result: "i64" },
  shim_mmap_shared: { parameters: ["i32", "u64", "i64"], result: "i64" },
  shim_munmap: { parameters: ["u64", "u64"], result: "i64" },
  shim_memcpy: { parameters: ["u64", "u64", "u64"], result: "i64" },
  shim_fence: { parameters: [], result: "void" },
  shim_aio_create: { parameters: ["u32"], result: "i64" },
  shim_aio_destroy: { parameters: ["u64"], result: "i64" },
  shim_aio_events: { parameters: ["u64"], result: "i64" },
  shim_aio_submit: { parameters: ["u64", "buffer", "u32"], result: "i64" },
  shim_aio_wait: {
    parameters: ["u64", "u32", "i64"],
    result: "i64",
    nonblocking: true,
  },
  // The same wait without leaving the JavaScript thread, for polling with a
  // zero timeout: it avoids a thread hop when completions are already there.
  shim_aio_poll: {
    name: "shim_aio_wait",
    parameters: ["u64", "u32", "i64"],
    result: "i64",
  },
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

// Copies an embedded library to a real file once, named by its content.
function extractEmbedded(path: string): string {
  const bytes = Deno.readFileSync(path);
  const tmp = Deno.env.get("TMPDIR") ?? "/tmp";
  // Synchronous hashing keeps module loading synchronous: a cheap FNV-1a.
  let hash = 0xcbf29ce484222325n;
  for (let i = 0; i < bytes.length; i += 1) {
    hash = ((hash ^ BigInt(bytes[i])) * 0x100000001b3n) & 0xffffffffffffffffn;
  }
  const target = `${tmp}/blktap-shim-${hash.toString(16)}.so`;
  try {
    Deno.statSync(target);
  } catch {
    const partial = `${target}.${Deno.pid}`;
    Deno.writeFileSync(partial, bytes, { mode: 0o755 });
    Deno.renameSync(partial, target);
  }
  return target;
}

function load(): Deno.DynamicLibrary<typeof SYMBOLS> {
  const failures: string[] = [];
  for (const path of candidatePaths()) {
    for (const attempt of [() => path, () => extractEmbedded(path)]) {
      try {
        const lib = Deno.dlopen(attempt(), SYMBOLS);
        const abi = lib.symbols.shim_abi_version();
        if (abi !== SHIM_ABI_VERSION) {
          throw new Error(`ABI version ${abi}, expected ${SHIM_ABI_VERSION}: rebuild with make`);
        }
        return lib;
      } catch (error) {
        failures.push(`${path}: ${(error as Error).message}`);
      }
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
