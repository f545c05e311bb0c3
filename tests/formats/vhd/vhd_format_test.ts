/**
 * The VHD structures on their own: geometry and sizes agree with
 * `qemu-img create -f vpc` (QEMU is the oracle for the rounding), which
 * size a reader believes for each creator, footer checksums, parent
 * locator paths as Hyper-V and Xen write them, and the probe.
 */
import assert from "node:assert/strict";
import {
  calculateGeometry,
  CHS_MAX,
  decodeFooter,
  encodeFooter,
  planSize,
  virtualSizeOf,
} from "../../../src/formats/vhd/footer.ts";
import {
  decodeLocatorPath,
  encodeLocatorPath,
  PLATFORM_MACX,
  PLATFORM_W2KU,
  PLATFORM_W2RU,
} from "../../../src/formats/vhd/dynamic_header.ts";
import { createVhd } from "../../../src/formats/vhd/create.ts";
import { probeFormat } from "../../../src/formats/open_image.ts";
import { imageInfo } from "../../../src/tools/info.ts";
import { runOk } from "../../_helpers/tools.ts";
import { hasQemu, qemuInfo } from "./_vhd_util.ts";
import { inTempDir } from "../qcow/_util.ts";

const MiB = 1 << 20;

Deno.test("vhd geometry: the specification's table (spot values)", () => {
  assert.deepEqual(calculateGeometry(2097152), { cylinders: 2080, heads: 16, sectorsPerTrack: 63 });
  assert.deepEqual(calculateGeometry(20480), { cylinders: 301, heads: 4, sectorsPerTrack: 17 });
  assert.deepEqual(calculateGeometry(65535 * 16 * 255 + 1000), CHS_MAX);
  // Rounded up until the geometry holds the size, as qemu-img does.
  assert.equal(planSize(1 << 30, false).sizeBytes, 1073995776);
  assert.equal(planSize(1 << 30, true).sizeBytes, 1 << 30);
  assert.deepEqual(planSize(1 << 30, true).geometry, CHS_MAX);
  assert.throws(() => planSize(2041 * 2 ** 30, true), /2040 GiB/);
});

Deno.test({
  name: "vhd sizes: blktap create rounds every size as qemu-img create -f vpc does",
  ignore: !hasQemu,
  fn: () =>
    inTempDir(async (dir) => {
      const sizes = [
        1,
        512,
        1000,
        1 * MiB,
        7 * MiB + 3,
        100 * MiB,
        1023 * MiB,
        8 * 2 ** 30,
        130 * 2 ** 30,
        300 * 2 ** 30,
      ];
      for (const size of sizes) {
        for (const force of [false, true]) {
          const ours = `${dir}/ours-${size}-${force}.vhd`;
          const theirs = `${dir}/qemu-${size}-${force}.vhd`;
          await createVhd(ours, { sizeBytes: size, subformat: "dynamic", forceSize: force });
          await runOk("qemu-img", [
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            `force_size=${force ? "on" : "off"}`,
            theirs,
            String(size),
          ]);
          const want = (await qemuInfo(theirs))["virtual-size"];
          assert.equal(
            (await qemuInfo(ours))["virtual-size"],
            want,
            `qemu reads ours, ${size} force=${force}`,
          );
          assert.equal((await imageInfo(ours)).virtualSizeBytes, want, `we read ours, ${size}`);
          assert.equal((await imageInfo(theirs)).virtualSizeBytes, want, `we read qemu's, ${size}`);
          await Deno.remove(ours);
          await Deno.remove(theirs);
        }
      }
    }),
});

function footerWith(app: string, sizeBytes: number, geometry = calculateGeometry(sizeBytes / 512)) {
  const bytes = encodeFooter({
    diskType: 3,
    dataOffset: 512,
    sizeBytes,
    geometry,
    uuid: new Uint8Array(16),
    timestamp: 0,
  });
  bytes.set(new TextEncoder().encode(app), 28);
  const view = new DataView(bytes.buffer);
  view.setUint32(64, 0);
  let sum = 0;
  for (const b of bytes) sum += b;
  view.setUint32(64, (~sum) >>> 0);
  return decodeFooter("x.vhd", bytes, "footer");
}

Deno.test("vhd size: Virtual PC and old QEMU images by geometry, the rest by current_size", () => {
  const size = 10_000_000 - (10_000_000 % 512); // not a geometry size
  const chs = calculateGeometry(size / 512);
  const chsBytes = chs.cylinders * chs.heads * chs.sectorsPerTrack * 512;
  assert.notEqual(chsBytes, size);
  for (const app of ["vpc ", "qemu"]) {
    assert.equal(virtualSizeOf(footerWith(app, size)), chsBytes, app);
  }
  for (const app of ["win ", "qem2", "tap\0", "d2v ", "CTXS", "wa\0\0", "vbox"]) {
    assert.equal(virtualSizeOf(footerWith(app, size)), size, app);
  }
  // The maximum geometry means current_size for everyone.
  assert.equal(virtualSizeOf(footerWith("qemu", size, { ...CHS_MAX })), size);
});

Deno.test("vhd footer: a wrong checksum is refused, naming the file and the field", () => {
  const bytes = encodeFooter({
    diskType: 2,
    dataOffset: Number.MAX_SAFE_INTEGER,
    sizeBytes: MiB,
    geometry: calculateGeometry(2048),
    uuid: new Uint8Array(16),
    timestamp: 0,
  });
  assert.equal(decodeFooter("a.vhd", bytes, "footer").currentSizeBytes, MiB);
  bytes[50] ^= 1;
  assert.throws(
    () => decodeFooter("a.vhd", bytes, "footer at offset 7"),
    /a\.vhd: footer at offset 7: checksum/,
  );
});

Deno.test("vhd locators: Hyper-V, Xen and our own paths decode to POSIX paths", () => {
  const utf16le = (text: string) => {
    const out = new Uint8Array(text.length * 2);
    for (let i = 0; i < text.length; i += 1) out[i * 2] = text.charCodeAt(i);
    return out;
  };
  assert.equal(decodeLocatorPath(PLATFORM_W2RU, utf16le(".\\base.vhd")), "base.vhd");
  assert.equal(decodeLocatorPath(PLATFORM_W2RU, utf16le("..\\b\\base.vhd")), "../b/base.vhd");
  assert.equal(decodeLocatorPath(PLATFORM_W2KU, utf16le("C:\\vms\\base.vhd")), "/vms/base.vhd");
  assert.equal(decodeLocatorPath(PLATFORM_W2KU, utf16le(".\\base.vhd")), "base.vhd"); // Xen
  assert.equal(decodeLocatorPath(PLATFORM_W2KU, utf16le("\\\\server\\share\\b.vhd")), undefined);
  const macx = new TextEncoder().encode("file://./base.vhd");
  assert.equal(decodeLocatorPath(PLATFORM_MACX, macx), "base.vhd");
  assert.equal(
    decodeLocatorPath(PLATFORM_MACX, new TextEncoder().encode("file:///x/b.vhd")),
    "/x/b.vhd",
  );
  assert.equal(decodeLocatorPath(PLATFORM_W2RU, new Uint8Array(4)), undefined);
  for (const path of ["base.vhd", "../up/b.vhd", "sub/dir/c.vhd"]) {
    assert.equal(decodeLocatorPath(PLATFORM_W2RU, encodeLocatorPath(PLATFORM_W2RU, path)), path);
  }
  assert.equal(
    decodeLocatorPath(PLATFORM_W2KU, encodeLocatorPath(PLATFORM_W2KU, "/a/b.vhd")),
    "/a/b.vhd",
  );
});

Deno.test("vhd probe: dynamic by the copy at offset 0, fixed (only) by the footer at the end", async () => {
  await inTempDir(async (dir) => {
    await createVhd(`${dir}/d.vhd`, { sizeBytes: 4 * MiB, subformat: "dynamic" });
    await createVhd(`${dir}/f.vhd`, { sizeBytes: 4 * MiB, subformat: "fixed" });
    assert.equal(await probeFormat(`${dir}/d.vhd`), "vhd");
    assert.equal(await probeFormat(`${dir}/f.vhd`), "vhd");
    await Deno.writeFile(`${dir}/r.raw`, new Uint8Array(4096));
    assert.equal(await probeFormat(`${dir}/r.raw`), "aio");
    // The end footer alone identifies only fixed disks (as QEMU): a dynamic or
    // differencing footer a guest writes at the end of a raw disk, naming a header
    // and parents, does not make it probe as vhd.
    const dynamic = await Deno.readFile(`${dir}/d.vhd`);
    const raw = new Uint8Array(1 << 20);
    raw.set(dynamic.subarray(dynamic.byteLength - 512), raw.byteLength - 512);
    await Deno.writeFile(`${dir}/tail.raw`, raw);
    assert.equal(await probeFormat(`${dir}/tail.raw`), "aio");
  });
});
