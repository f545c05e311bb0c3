/**
 * vmdk as the crash simulator (tests/_helpers/crash_sim.ts) sees it: the
 * layouts worth simulating, each a {@linkcode CrashFormat}. Used by
 * crash_sim_test.ts and bench/crash.sh.
 * @module
 */
import { createVmdk, type CreateVmdkOptions } from "../../../src/formats/vmdk/create.ts";
import { openVmdk } from "../../../src/formats/vmdk/vmdk.ts";
import { vmdkCheck } from "../../../src/formats/vmdk/check.ts";
import type { ImageFile } from "../../../src/formats/image_file.ts";
import type { CrashFormat } from "../../_helpers/crash_sim.ts";

/** monolithicSparse images made by createVmdk with `options`. */
function vmdkCrashFormat(name: string, options: CreateVmdkOptions): CrashFormat {
  return {
    name,
    qemuFormat: "vmdk",
    qemuCheck: true,
    create(path, sizeBytes) {
      createVmdk(path, sizeBytes, options);
      return Promise.resolve(new Uint8Array(sizeBytes));
    },
    open: (path: string, file: ImageFile, readOnly: boolean) =>
      openVmdk(path, { readOnly }, () => Promise.resolve(file)),
    check: (path: string, file: ImageFile) =>
      vmdkCheck(path, { repair: false }, () => Promise.resolve(file)),
  };
}

/** monolithicSparse as QEMU and VMware make it: every grain table preallocated, 64 KiB grains. */
export const VMDK_PREALLOCATED = vmdkCrashFormat("vmdk-preallocated", { grainBytes: 65536 });

/** Grain tables allocated by writes (directory entries are metadata too), 4 KiB grains. */
export const VMDK_ON_DEMAND = vmdkCrashFormat("vmdk-on-demand", {
  grainBytes: 4096,
  preallocateTables: false,
});
