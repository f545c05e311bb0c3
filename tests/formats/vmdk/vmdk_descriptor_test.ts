/**
 * The descriptor and what the driver refuses: delta links (clear
 * "unsupported"), unsupported create types, read-only extents and
 * read-only subformats; extents of several types assembled in order.
 */
import assert from "node:assert/strict";
import { BlockError } from "../../../src/formats/driver.ts";
import { openImage } from "../../../src/formats/open_image.ts";
import { DescriptorError, parseDescriptor } from "../../../src/formats/vmdk/descriptor.ts";
import { createVmdk } from "../../../src/formats/vmdk/create.ts";
import { openVmdk } from "../../../src/formats/vmdk/vmdk.ts";
import { blktap } from "../../_helpers/tools.ts";
import { HAVE_QEMU, qemuImg, qemuToVmdk } from "./_vmdk_helpers.ts";

const QEMU_DESCRIPTOR = `# Disk DescriptorFile
version=1
CID=739c43f1
parentCID=ffffffff
createType="twoGbMaxExtentFlat"

# Extent description
RW 4194304 FLAT "disk-f001.vmdk" 0
RW 2097152 FLAT "disk-f002.vmdk" 0

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "6241"
ddb.adapterType = "ide"
`;

Deno.test("vmdk descriptor: parses what QEMU writes, names the line at fault", () => {
  const d = parseDescriptor(QEMU_DESCRIPTOR);
  assert.equal(d.createType, "twoGbMaxExtentFlat");
  assert.equal(d.cid, "739c43f1");
  assert.equal(d.parentCid, "ffffffff");
  assert.deepEqual(d.extents.map((e) => [e.access, e.sizeSectors, e.type, e.fileName]), [
    ["RW", 4194304, "FLAT", "disk-f001.vmdk"],
    ["RW", 2097152, "FLAT", "disk-f002.vmdk"],
  ]);
  assert.equal(d.values.get("ddb.adapterType"), "ide");
  assert.throws(() => parseDescriptor(QEMU_DESCRIPTOR.replace("RW 2097152", "RW x")), {
    name: "Error",
    message: /line 9: cannot parse/,
  });
  assert.throws(() => parseDescriptor("version=1\n"), DescriptorError);
  assert.throws(
    () => parseDescriptor('version=9\ncreateType="x"\n'),
    /unsupported descriptor version/,
  );
  assert.throws(
    () => parseDescriptor(QEMU_DESCRIPTOR.replace(' "disk-f002.vmdk" 0', ' "disk-f002.vmdk"')),
    /FLAT extent without an offset/,
  );
});

Deno.test("vmdk: flat, zero and read-only extents are assembled in order", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vmdk-desc-" });
  try {
    await Deno.writeFile(`${dir}/a.bin`, new Uint8Array(2048).fill(1));
    await Deno.writeFile(`${dir}/b.bin`, new Uint8Array(4096).fill(2));
    await Deno.writeTextFile(
      `${dir}/d.vmdk`,
      QEMU_DESCRIPTOR.replace(
        /RW 4194304.*\nRW 2097152.*\n/,
        'RW 2 FLAT "a.bin" 2\nRW 3 ZERO\nRDONLY 4 FLAT "b.bin" 0\n',
      ),
    );
    const d = await openImage(`${dir}/d.vmdk`);
    assert.equal(d.format, "vmdk");
    assert.equal(d.sizeBytes, 9 * 512);
    const bytes = new Uint8Array(d.sizeBytes);
    await d.read(0, bytes);
    assert.deepEqual([bytes[0], bytes[1023], bytes[1024], bytes[2559], bytes[2560], bytes[4607]], [
      1,
      1,
      0,
      0,
      2,
      2,
    ]);
    await d.write(100, new Uint8Array([7]));
    await assert.rejects(() => d.write(2600, new Uint8Array([7])), /RDONLY FLAT extent/);
    await assert.rejects(() => d.write(1100, new Uint8Array([7])), /ZERO extent/);
    await d.close();
    assert.equal((await Deno.readFile(`${dir}/a.bin`))[1124], 7);
    await Deno.writeTextFile(
      `${dir}/bad.vmdk`,
      QEMU_DESCRIPTOR.replace("twoGbMaxExtentFlat", "vmfsSparse"),
    );
    await assert.rejects(() => openVmdk(`${dir}/bad.vmdk`), /unsupported vmdk createType/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "vmdk: delta links are refused as unsupported; streamOptimized opens read-only",
  ignore: !HAVE_QEMU,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vmdk-delta-" });
    try {
      createVmdk(`${dir}/base.vmdk`, 1 << 20);
      const created = await qemuImg(
        "create",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        `${dir}/delta.vmdk`,
      );
      assert.equal(created.code, 0, created.stderr);
      await assert.rejects(() => openImage(`${dir}/delta.vmdk`), (e: unknown) => {
        assert.ok(e instanceof BlockError);
        assert.equal(e.code, "EOPNOTSUPP");
        assert.match(e.message, /delta\.vmdk: unsupported: vmdk delta link with parentCID=/);
        return true;
      });
      const cli = await blktap(["info", `${dir}/delta.vmdk`]);
      assert.equal(cli.code, 1);
      assert.match(cli.stderr, /unsupported: vmdk delta link/);

      await Deno.writeFile(`${dir}/src.raw`, new Uint8Array(1 << 20).fill(3));
      const stream = `${dir}/s.vmdk`;
      await qemuToVmdk(`${dir}/src.raw`, stream, "streamOptimized");
      await assert.rejects(() => openImage(stream), /streamOptimized vmdk images are read-only/);
      const ro = await openImage(stream, { readOnly: true });
      assert.equal(ro.capabilities.canWrite, false);
      await ro.close();
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
