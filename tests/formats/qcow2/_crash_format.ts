/**
 * qcow2 as the crash simulator (tests/_helpers/crash_sim.ts) sees it: the
 * layouts worth simulating, each a {@linkcode CrashFormat}. Used by
 * crash_sim_test.ts and bench/crash.sh.
 * @module
 */
import { createQcow2 } from "../../../src/formats/qcow2/create.ts";
import { Qcow2Driver } from "../../../src/formats/qcow2/qcow2.ts";
import { checkQcow2File } from "../../../src/formats/qcow2/check.ts";
import { RawDriver } from "../../../src/formats/raw/raw.ts";
import type { ImageFile } from "../../../src/formats/image_file.ts";
import type { CrashFormat } from "../../_helpers/crash_sim.ts";
import { MemoryFile } from "../../_helpers/fault_file.ts";

/**
 * qcow2 images created with `-o options`, over an in-memory raw backing
 * file when `backed`. v2 images have no dirty bit: their leaks stay until
 * `check --repair`, as with QEMU.
 */
function qcow2CrashFormat(
  name: string,
  options: Record<string, string>,
  backed = false,
): CrashFormat {
  let base: Uint8Array = new Uint8Array(0);
  return {
    name,
    qemuFormat: "qcow2",
    qemuCheck: true,
    reopenKeepsLeaks: options.compat === "0.10",
    async create(path, sizeBytes, rng) {
      base = backed ? rng.bytes(sizeBytes) : new Uint8Array(sizeBytes);
      const backingName = backed ? "base.raw" : undefined;
      if (backed) await Deno.writeFile(`${path.slice(0, path.lastIndexOf("/"))}/base.raw`, base);
      await createQcow2(path, {
        sizeBytes,
        options,
        backingName,
        backingFormat: backingName && "raw",
      });
      return base.slice();
    },
    open: (path: string, file: ImageFile, readOnly: boolean) =>
      Qcow2Driver.open(path, { readOnly }, {
        openFile: () => Promise.resolve(file),
        openBacking: () =>
          Promise.resolve(new RawDriver("aio", new MemoryFile("base.raw", base, false))),
      }),
    check: (_path: string, file: ImageFile) => checkQcow2File(file, { repair: false }),
  };
}

/** v3, 4 KiB clusters: an L2 slice and a refcount block per cluster. */
export const QCOW2_V3 = qcow2CrashFormat("qcow2-v3", { cluster_size: "4K" });

/** v3, 512-byte clusters, 64-bit refcounts: refcount blocks and the table grow often. */
export const QCOW2_SMALL = qcow2CrashFormat("qcow2-small", {
  cluster_size: "512",
  refcount_bits: "64",
});

/** v2 (compat 0.10), 16 KiB clusters: no dirty bit, no zero clusters. */
export const QCOW2_V2 = qcow2CrashFormat("qcow2-v2", { compat: "0.10", cluster_size: "16K" });

/** v3 over a raw backing file, 4 KiB clusters: copy-on-write of partial clusters. */
export const QCOW2_BACKED = qcow2CrashFormat("qcow2-backed", { cluster_size: "4K" }, true);
