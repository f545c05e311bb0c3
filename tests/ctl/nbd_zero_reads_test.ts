/**
 * Reads of a new qcow2's unallocated clusters through `blktap ctrl` are
 * answered in ctrl from what the disk process called zeros, as one NBD hole
 * chunk (src/frontends/nbd/transmission.ts): real clients — QEMU's NBD
 * client and libnbd's nbdcopy, both negotiating structured replies — must
 * read zeros there, the written data elsewhere, and the whole export must
 * equal the image as `qemu-img compare` reads it.
 */
import assert from "node:assert/strict";
import { assertExportIs, CtrlHarness } from "../_helpers/ctrl_harness.ts";
import { missingTools, runOk } from "../_helpers/tools.ts";

const ignore = missingTools("qemu-img", "qemu-io", "nbdcopy").length > 0;

async function zeroReads(h: CtrlHarness): Promise<number> {
  const stats = await h.request({ op: "stats", minor: 0 });
  return (stats.answeredInCtrl as { zeroReads: number }).zeroReads;
}

Deno.test({
  name: "ctrl zero reads: a new qcow2's holes read as zeros through QEMU and libnbd clients",
  ignore,
  fn: async () => {
    const h = await CtrlHarness.start();
    try {
      const image = `${h.dir}/fresh.qcow2`;
      await runOk("qemu-img", ["create", "-q", "-f", "qcow2", image, "64M"]);
      await h.request({ op: "create", image: `qcow2:${image}` });
      const qemuIo = (...commands: string[]) =>
        runOk("qemu-io", ["-f", "raw", ...commands.flatMap((c) => ["-c", c]), h.nbdUri("tap0")]);
      // The first read misses and has ctrl learn the disk's zeros.
      await qemuIo("write -P 0x5a 1M 4k", "write -P 0x6b 40M 64k", "read -P 0 8M 4k");
      const before = await zeroReads(h);
      // 4 KiB reads beside the data, inside the written cluster's tail, and a large one.
      await qemuIo(
        "read -P 0 2M 4k",
        "read -P 0x5a 1M 4k",
        "read -P 0 1052672 60k",
        "read -P 0 48M 4M",
        "read -P 0x6b 40M 64k",
        "readv -P 0 63M 4k 4k 8k",
      );
      assert.ok(await zeroReads(h) >= before + 3, "reads of zeros were answered in ctrl");
      // libnbd: the whole disk copied, then the same compared by QEMU.
      const copy = `${h.dir}/copy.raw`;
      await runOk("nbdcopy", [h.nbdUri("tap0"), copy]);
      await runOk("qemu-img", ["compare", "-U", "-f", "raw", "-F", "qcow2", copy, image]);
      await assertExportIs(h, "tap0", image);
    } finally {
      await h.close();
    }
  },
});
