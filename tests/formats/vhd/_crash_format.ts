/**
 * vhd as the crash simulator (tests/_helpers/crash_sim.ts) sees it: the
 * subformats and layouts worth simulating, each a {@linkcode CrashFormat}.
 * Used by crash_sim_test.ts and bench/crash.sh. QEMU reads dynamic and
 * fixed images (`qemu-img compare`; it has no check for vpc) but no
 * differencing ones, so those are judged by our check and the model alone.
 * @module
 */
import { createVhd, type VhdParentSpec } from "../../../src/formats/vhd/create.ts";
import { openVhd } from "../../../src/formats/vhd/format.ts";
import { checkVhdFile } from "../../../src/formats/vhd/check.ts";
import { readVhdImage } from "../../../src/formats/vhd/image.ts";
import { DynamicVhdDriver } from "../../../src/formats/vhd/vhd.ts";
import { RawDriver } from "../../../src/formats/raw/raw.ts";
import type { BlockDriver } from "../../../src/formats/driver.ts";
import type { OpenContext } from "../../../src/formats/format_entry.ts";
import type { ImageFile } from "../../../src/formats/image_file.ts";
import type { CrashFormat } from "../../_helpers/crash_sim.ts";
import { MemoryFile, stateBytes } from "../../_helpers/fault_file.ts";
import type { Random } from "../../_helpers/random.ts";

/** What lies beneath a differencing layout: its parent's name, bytes and opener. */
interface Beneath {
  name: string;
  /** Makes the parent file in `dir` for a disk of `sizeBytes`; returns its guest view. */
  make(dir: string, sizeBytes: number, rng: Random): Promise<Uint8Array>;
  /** Opens the parent read-only over its bytes as `make` left them. */
  open(file: ImageFile): Promise<BlockDriver>;
  /** All zeros for a raw parent (Xen's convention), else the parent's footer UUID. */
  uuid(file: ImageFile): Promise<Uint8Array>;
}

/** VHDs of one layout: `beneath` set makes differencing disks over it. */
function vhdCrashFormat(
  name: string,
  subformat: "dynamic" | "fixed",
  blockBytes: number,
  beneath?: Beneath,
): CrashFormat {
  let parentBytes: Uint8Array = new Uint8Array(0);
  const context = (file: ImageFile): OpenContext => ({
    openFile: () => Promise.resolve(file),
    openBacking: () => beneath!.open(new MemoryFile(beneath!.name, parentBytes, false)),
  });
  return {
    name,
    qemuFormat: beneath ? undefined : "vpc",
    async create(path, sizeBytes, rng) {
      const dir = path.slice(0, path.lastIndexOf("/"));
      let prior: Uint8Array = new Uint8Array(sizeBytes);
      let parent: VhdParentSpec | undefined;
      if (beneath) {
        prior = await beneath.make(dir, sizeBytes, rng);
        parentBytes = await Deno.readFile(`${dir}/${beneath.name}`);
        parent = {
          relativePath: beneath.name,
          absolutePath: `${dir}/${beneath.name}`,
          uuid: await beneath.uuid(new MemoryFile(beneath.name, parentBytes, false)),
          mtime: new Date(),
          sizeBytes,
        };
      }
      await createVhd(path, { sizeBytes, subformat, blockBytes, forceSize: true, parent });
      return prior;
    },
    open: (path: string, file: ImageFile, readOnly: boolean) =>
      openVhd(path, { readOnly }, context(file)),
    check: (_path: string, file: ImageFile) => checkVhdFile(file, { repair: false }),
  };
}

/** A raw parent holding random bytes. */
const RAW_BENEATH: Beneath = {
  name: "base.raw",
  async make(dir, sizeBytes, rng) {
    const bytes = rng.bytes(sizeBytes);
    await Deno.writeFile(`${dir}/base.raw`, bytes);
    return bytes;
  },
  open: (file) => Promise.resolve(new RawDriver("aio", file)),
  uuid: () => Promise.resolve(new Uint8Array(16)),
};

/** A dynamic VHD parent (64 KiB blocks) with every other block written with random bytes. */
const VHD_BENEATH: Beneath = {
  name: "base.vhd",
  async make(dir, sizeBytes, rng) {
    const path = `${dir}/base.vhd`;
    const blockBytes = 64 << 10;
    await createVhd(path, { sizeBytes, subformat: "dynamic", blockBytes, forceSize: true });
    const file = new MemoryFile(path, await Deno.readFile(path), true);
    const driver = await openDynamic(file, false);
    const view = new Uint8Array(sizeBytes);
    try {
      for (let at = 0; at < sizeBytes; at += 2 * blockBytes) {
        const data = rng.bytes(Math.min(blockBytes, sizeBytes - at));
        await driver.write(at, data);
        view.set(data, at);
      }
    } finally {
      await driver.close();
    }
    await Deno.writeFile(path, stateBytes(file.contents));
    return view;
  },
  open: (file) => openDynamic(file, true),
  uuid: async (file) => (await readVhdImage(file)).footer.uuid,
};

/** A dynamic VHD without a parent over `file`. */
async function openDynamic(file: ImageFile, readOnly: boolean): Promise<BlockDriver> {
  const none: OpenContext = {
    openFile: () => Promise.resolve(file),
    openBacking: () => Promise.reject(new Error(`${file.path} has no parent`)),
  };
  return await DynamicVhdDriver.openImage(file, await readVhdImage(file), { readOnly }, none);
}

/** Dynamic, 2 MiB blocks (QEMU's and Hyper-V's default): few allocations, large ones. */
export const VHD_DYNAMIC = vhdCrashFormat("vhd-dynamic", "dynamic", 2 << 20);

/** Dynamic, 8 KiB blocks: an allocation (footer moved, bitmap, BAT entry) every few writes. */
export const VHD_DYNAMIC_SMALL = vhdCrashFormat("vhd-dynamic-small", "dynamic", 8 << 10);

/** Differencing over a raw parent, 32 KiB blocks: partial bitmaps, units completed from beneath. */
export const VHD_DIFF_RAW = vhdCrashFormat("vhd-diff-raw", "dynamic", 32 << 10, RAW_BENEATH);

/** Differencing over a dynamic VHD parent (half its blocks allocated), 16 KiB blocks. */
export const VHD_DIFF_VHD = vhdCrashFormat("vhd-diff-vhd", "dynamic", 16 << 10, VHD_BENEATH);

/** Fixed: the disk's bytes then the footer; writes never touch the footer. */
export const VHD_FIXED = vhdCrashFormat("vhd-fixed", "fixed", 2 << 20);

/** Every vhd layout by name (bench/crash.sh). */
export const VHD_LAYOUTS: Record<string, CrashFormat> = Object.fromEntries(
  [VHD_DYNAMIC, VHD_DYNAMIC_SMALL, VHD_DIFF_RAW, VHD_DIFF_VHD, VHD_FIXED].map((f) => [f.name, f]),
);
