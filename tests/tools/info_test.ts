/**
 * `blktap info` against `qemu-img info --backing-chain`: format, virtual
 * size, cluster size and the chain; allocation against `qemu-img map`.
 */
import assert from "node:assert/strict";
import { createVmdk } from "../../src/formats/vmdk/create.ts";
import { openImage } from "../../src/formats/open_image.ts";
import { imageInfo } from "../../src/tools/info.ts";
import { blktap, run } from "../_helpers/tools.ts";
import { haveQemu, qemuMap } from "../_helpers/qemu.ts";

interface QemuInfo {
  "virtual-size": number;
  "cluster-size"?: number;
  format: string;
  filename: string;
}

async function qemuInfo(path: string): Promise<QemuInfo[]> {
  const r = await run("qemu-img", ["info", "--output=json", "--backing-chain", path]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

Deno.test({
  name: "info: format, sizes, allocation and backing chain agree with qemu-img",
  ignore: !haveQemu,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "blktap-info-" });
    try {
      const vmdk = `${dir}/disk.vmdk`;
      createVmdk(vmdk, 10 << 20);
      const d = await openImage(vmdk);
      await d.write(100_000, new Uint8Array(200_000).fill(3));
      await d.close();
      const raw = `${dir}/base.raw`;
      await run("qemu-img", ["create", "-f", "raw", raw, "4M"]);
      const top = `${dir}/top.qcow`;
      await run("qemu-img", ["create", "-f", "qcow", "-b", "base.raw", "-F", "raw", top]);

      const info = await imageInfo(vmdk);
      const [q] = await qemuInfo(vmdk);
      assert.equal(info.format, q.format);
      assert.equal(info.virtualSizeBytes, q["virtual-size"]);
      assert.equal(info.clusterSizeBytes, q["cluster-size"]);
      assert.equal(info.details?.createType, "monolithicSparse");
      const dataBytes = (await qemuMap(vmdk)).filter((e) => e.data)
        .reduce((sum, e) => sum + e.length, 0);
      assert.equal(info.allocatedBytes, dataBytes);
      assert.equal(info.fileSizeBytes, (await Deno.stat(vmdk)).size);
      assert.deepEqual(info.backingChain, []);

      const chain = await imageInfo(top);
      const qchain = await qemuInfo(top);
      assert.equal(chain.format, "qcow");
      assert.equal(chain.backingFile, "base.raw");
      assert.equal(chain.backingChain.length, qchain.length - 1);
      assert.equal(chain.backingChain[0].format, "raw");
      assert.equal(chain.backingChain[0].virtualSizeBytes, qchain[1]["virtual-size"]);
      assert.equal(chain.virtualSizeBytes, qchain[0]["virtual-size"]);

      const cli = await blktap(["info", "--json", top]);
      assert.equal(cli.code, 0, cli.stderr);
      assert.equal(JSON.parse(cli.stdout).backingChain.length, 1);
      const human = await blktap(["info", vmdk]);
      assert.match(human.stdout, /file format: vmdk/);
      assert.match(human.stdout, /virtual size: 10\.0 MiB \(10485760 bytes\)/);
      const missing = await blktap(["info", `${dir}/nope.vmdk`]);
      assert.equal(missing.code, 1);
      assert.match(missing.stderr, /nope\.vmdk/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
