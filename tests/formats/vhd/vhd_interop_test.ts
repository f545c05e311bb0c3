/**
 * VHD images between blktap, QEMU and libvhdi: images QEMU makes and
 * writes (dynamic, fixed, force_size) read identically through blktap,
 * blktap's writes into them read identically through QEMU, and QEMU's map
 * agrees with our block status; images blktap makes (all three
 * subformats) are read right by QEMU (dynamic, fixed) and libvhdi. A
 * differencing disk laid out as Hyper-V writes it (locators in sectors,
 * `C:` paths) finds its parent by either locator, and refuses a parent
 * whose UUID is not the one recorded.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { createVhd } from "../../../src/formats/vhd/create.ts";
import {
  encodeDynamicHeader,
  encodeLocatorPath,
  PLATFORM_W2KU,
  PLATFORM_W2RU,
} from "../../../src/formats/vhd/dynamic_header.ts";
import { readVhdImage } from "../../../src/formats/vhd/image.ts";
import { openImageFile } from "../../../src/formats/raw/open_file.ts";
import { mapImage } from "../../../src/tools/map.ts";
import { imageInfo } from "../../../src/tools/info.ts";
import { testSeed } from "../../_helpers/random.ts";
import { runOk } from "../../_helpers/tools.ts";
import { inTempDir, mergeRanges, ourDataRanges } from "../qcow/_util.ts";
import {
  assertQemuReads,
  assertReads,
  assertVhdiReads,
  createChild,
  hasQemu,
  hasVhdiInfo,
  readAll,
  vhdiInfo,
  vhdimountWorks,
  writeRandomly,
} from "./_vhd_util.ts";

const MiB = 1 << 20;

async function qemuMapData(image: string): Promise<[number, number][]> {
  const out = JSON.parse(
    await runOk("qemu-img", ["map", "-U", "-f", "vpc", "--output=json", image]),
  ) as {
    start: number;
    length: number;
    data: boolean;
  }[];
  return mergeRanges(out.filter((e) => e.data).map((e) => [e.start, e.start + e.length]));
}

const QEMU_IMAGES: { name: string; options: string; size: string }[] = [
  { name: "dynamic", options: "subformat=dynamic", size: "13M" },
  { name: "fixed", options: "subformat=fixed", size: "5M" },
  {
    name: "force-size",
    options: "subformat=dynamic,force_size=on",
    size: String(7 * MiB + 3 * 512),
  },
];

for (const spec of QEMU_IMAGES) {
  Deno.test({
    name: `vhd interop: QEMU's ${spec.name} image reads the same through blktap, and back`,
    ignore: !hasQemu,
    fn: () =>
      inTempDir(async (dir) => {
        const rng = testSeed(`vhd-qemu-${spec.name}`);
        const image = `${dir}/q.vhd`;
        await runOk("qemu-img", [
          "create",
          "-q",
          "-f",
          "vpc",
          "-o",
          spec.options,
          image,
          spec.size,
        ]);
        const commands = [
          "-c",
          "write -P 0x5a 0 64k",
          "-c",
          "write -P 0x11 3M 4k",
          "-c",
          "write -P 0x22 2047k 2k",
        ];
        await runOk("qemu-io", ["-f", "vpc", ...commands, image]);
        await runOk("qemu-img", ["convert", "-f", "vpc", "-O", "raw", image, `${dir}/q.raw`]);
        const model = await Deno.readFile(`${dir}/q.raw`);
        const driver = await openImage(image);
        try {
          await assertReads(driver, model, "blktap reading QEMU's image");
          if (spec.name !== "fixed") {
            assert.deepEqual(await ourDataRanges(driver), await qemuMapData(image), "allocation");
          }
          await writeRandomly(driver, model, rng, 60);
        } finally {
          await driver.close();
        }
        await assertQemuReads(dir, image, model);
        if (await vhdimountWorks()) await assertVhdiReads(image, model);
      }),
  });
}

Deno.test({
  name: "vhd interop: blktap's dynamic and fixed images read right through QEMU and libvhdi",
  ignore: !hasQemu,
  fn: () =>
    inTempDir(async (dir) => {
      const rng = testSeed("vhd-ours");
      for (const subformat of ["dynamic", "fixed"] as const) {
        const image = `${dir}/${subformat}.vhd`;
        await createVhd(image, { sizeBytes: 11 * MiB + 4096 + 512, subformat, forceSize: true });
        const driver = await openImage(image);
        const model = new Uint8Array(driver.sizeBytes);
        try {
          await writeRandomly(driver, model, rng, 80);
        } finally {
          await driver.close();
        }
        await assertQemuReads(dir, image, model);
        if (hasVhdiInfo) {
          const info = await vhdiInfo(image);
          assert.equal(info["Disk type"], subformat === "fixed" ? "Fixed" : "Dynamic");
          assert.match(info["Media size"], new RegExp(`\\(${model.byteLength} bytes\\)`));
        }
        if (await vhdimountWorks()) await assertVhdiReads(image, model);
      }
    }),
});

/**
 * Rewrites the header of differencing `image` with Hyper-V style locators
 * (W2ku first, with a drive letter; `data_space` in sectors), their data
 * placed where the footer was, the footer moved behind them.
 */
async function hyperVLocators(image: string, relative: string, absolute: string): Promise<void> {
  const file = await openImageFile(image, { engine: "sync" });
  try {
    const vhd = await readVhdImage(file);
    let at = vhd.dataEndBytes;
    const locators = [];
    for (const [code, path] of [[PLATFORM_W2KU, absolute], [PLATFORM_W2RU, relative]] as const) {
      const payload = encodeLocatorPath(code, path);
      const sectors = Math.ceil(payload.byteLength / 512);
      const padded = new Uint8Array(sectors * 512);
      padded.set(payload);
      await file.write(at, padded);
      locators.push({
        platformCode: code,
        dataSpace: sectors,
        dataLengthBytes: payload.byteLength,
        dataOffsetBytes: at,
      });
      at += sectors * 512;
    }
    await file.write(at, vhd.footer.bytes);
    await file.write(vhd.footer.dataOffset, encodeDynamicHeader({ ...vhd.header!, locators }));
    await file.flush();
  } finally {
    await file.close();
  }
}

Deno.test("vhd differencing: Hyper-V locators, moved images, wrong parents", async () => {
  await inTempDir(async (dir) => {
    const rng = testSeed("vhd-hyperv");
    await Deno.mkdir(`${dir}/a`);
    await createVhd(`${dir}/a/base.vhd`, {
      sizeBytes: 4 * MiB,
      subformat: "dynamic",
      forceSize: true,
    });
    const base = await openImage(`${dir}/a/base.vhd`);
    const parentData = rng.bytes(base.sizeBytes);
    await base.write(0, parentData);
    await base.close();
    await createChild(`${dir}/a/child.vhd`, "base.vhd", "vhd");
    // W2ku names a path that does not exist; W2ru finds the parent.
    await hyperVLocators(`${dir}/a/child.vhd`, "base.vhd", "/nowhere/base.vhd");
    let child = await openImage(`${dir}/a/child.vhd`);
    await assertReads(child, parentData, "through W2ru");
    const model = parentData.slice();
    const written = rng.bytes(5000);
    model.set(written, 3000);
    await child.write(3000, written);
    await child.close();
    // Only W2ku (absolute, with a drive letter) names the parent now.
    await hyperVLocators(`${dir}/a/child.vhd`, "elsewhere.vhd", `C:${dir}/a/base.vhd`);
    child = await openImage(`${dir}/a/child.vhd`);
    await assertReads(child, model, "child over its parent");
    await child.close();
    // A parent with another UUID is refused, naming why.
    await Deno.rename(`${dir}/a/base.vhd`, `${dir}/a/base.old`);
    await createVhd(`${dir}/a/base.vhd`, {
      sizeBytes: 4 * MiB,
      subformat: "dynamic",
      forceSize: true,
    });
    await assert.rejects(openImage(`${dir}/a/child.vhd`), /UUID/);
    await Deno.remove(`${dir}/a/base.vhd`);
    await assert.rejects(
      openImage(`${dir}/a/child.vhd`),
      /cannot open the parent.*base\.vhd.*not found/s,
    );
  });
});

Deno.test("vhd differencing: info names the parent, map shows which layer holds each range, libvhdi agrees", async () => {
  await inTempDir(async (dir) => {
    await createVhd(`${dir}/base.vhd`, {
      sizeBytes: 6 * MiB,
      subformat: "dynamic",
      forceSize: true,
    });
    const base = await openImage(`${dir}/base.vhd`);
    const model = new Uint8Array(base.sizeBytes);
    model.fill(3, 0, 3 * MiB);
    await base.write(0, model.subarray(0, 3 * MiB));
    await base.close();
    await createChild(`${dir}/child.vhd`, "base.vhd", "vhd", 1 << 20);
    const child = await openImage(`${dir}/child.vhd`);
    model.fill(9, 1 * MiB + 4096, 1 * MiB + 8192);
    await child.write(1 * MiB + 4096, model.subarray(1 * MiB + 4096, 1 * MiB + 8192));
    model.fill(8, 5 * MiB, 5 * MiB + 512);
    await child.write(5 * MiB, model.subarray(5 * MiB, 5 * MiB + 512));
    assert.deepEqual(await readAll(child), model);
    await child.close();
    const info = await imageInfo(`${dir}/child.vhd`);
    assert.equal(info.format, "vhd");
    assert.equal(info.clusterSizeBytes, 1 << 20);
    assert.equal(info.backingFile, "base.vhd");
    assert.equal(info.backingFormat, "vhd");
    assert.equal(info.backingChain[0].details?.subformat, "dynamic");
    assert.deepEqual(
      [info.details?.subformat, info.details?.creator, info.details?.parent_name],
      ["differencing", "tap 1.3 (Wi2k)", "base.vhd"],
    );
    assert.match(String(info.details?.geometry), /^\d+\/\d+\/\d+$/);
    assert.match(String(info.details?.parent_locators), /^W2ru:base\.vhd, W2ku:\/.*base\.vhd$/);
    const map = await mapImage(`${dir}/child.vhd`);
    const depthAt = (offset: number) =>
      map.find((e) => e.start <= offset && offset < e.start + e.length)!;
    assert.equal(depthAt(0).depth, 1);
    assert.equal(depthAt(1 * MiB + 4096).depth, 0);
    assert.equal(depthAt(1 * MiB + 8192).depth, 1);
    assert.equal(depthAt(5 * MiB).depth, 0);
    assert.equal(depthAt(5 * MiB).length, 4096, "4 KiB units made present");
    assert.equal(depthAt(4 * MiB).present, false);
    if (await vhdimountWorks()) await assertVhdiReads(`${dir}/child.vhd`, model);
  });
});
