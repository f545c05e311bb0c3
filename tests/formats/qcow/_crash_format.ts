/**
 * qcow as the crash simulator (tests/_helpers/crash_sim.ts) sees it: the
 * layouts worth simulating, each a {@linkcode CrashFormat}. Used by
 * crash_sim_test.ts and bench/crash.sh.
 * @module
 */
import { createQcow } from "../../../src/formats/qcow/create.ts";
import { QcowDriver } from "../../../src/formats/qcow/qcow.ts";
import { checkQcowFile } from "../../../src/formats/qcow/check.ts";
import { RawDriver } from "../../../src/formats/raw/raw.ts";
import type { ImageFile } from "../../../src/formats/image_file.ts";
import type { CrashFormat } from "../../_helpers/crash_sim.ts";
import { MemoryFile } from "../../_helpers/fault_file.ts";
import { runOk } from "../../_helpers/tools.ts";

/** qcow images made by `create(path, size)`, over an in-memory raw backing file when `backed`. */
function qcowCrashFormat(
  name: string,
  create: (path: string, sizeBytes: number) => Promise<void>,
  backed: boolean,
): CrashFormat {
  let base: Uint8Array = new Uint8Array(0);
  return {
    name,
    qemuFormat: "qcow",
    async create(path, sizeBytes, rng) {
      base = backed ? rng.bytes(sizeBytes) : new Uint8Array(sizeBytes);
      if (backed) await Deno.writeFile(`${path.slice(0, path.lastIndexOf("/"))}/base.raw`, base);
      await create(path, sizeBytes);
      return base.slice();
    },
    open: (path: string, file: ImageFile, readOnly: boolean) =>
      QcowDriver.open(path, { readOnly }, {
        openFile: () => Promise.resolve(file),
        openBacking: () =>
          Promise.resolve(new RawDriver("aio", new MemoryFile("base.raw", base, false))),
      }),
    check: (_path: string, file: ImageFile) => checkQcowFile(file, { repair: false }),
  };
}

/** blktap's layout: standalone, 4 KiB clusters, 2 MiB extents (qcow-create). */
export const QCOW_BLKTAP = qcowCrashFormat(
  "qcow-blktap",
  (path, sizeBytes) => createQcow(path, { sizeBytes }),
  false,
);

/** Over a raw backing file: 512-byte clusters, copy-on-write (qcow-create with a backing file). */
export const QCOW_BACKED = qcowCrashFormat(
  "qcow-backed",
  (path, sizeBytes) => createQcow(path, { sizeBytes, backingName: "base.raw" }),
  true,
);

/** As QEMU creates it (no Xen header, no extents); needs qemu-img. */
export const QCOW_QEMU = qcowCrashFormat(
  "qcow-qemu",
  (path, sizeBytes) =>
    runOk("qemu-img", ["create", "-q", "-f", "qcow", path, String(sizeBytes)]).then(() => {}),
  false,
);
