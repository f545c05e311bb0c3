/**
 * A writer process killed with SIGKILL again and again on one qcow2 image
 * (answered writes are not flushed): after each kill every answered batch
 * reads back, our check and `qemu-img check` find no corruption (leaks
 * allowed: the dirty image), and the next writer's open reclaims the leaks,
 * so the image closed at the end has none.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { createQcow2 } from "../../../src/formats/qcow2/create.ts";
import { checkQcow2 } from "../../../src/formats/qcow2/check.ts";
import { Random, testSeed } from "../../_helpers/random.ts";
import { killWriterAfter } from "../../_helpers/kill_writer.ts";
import {
  assertQemuClean,
  assertQemuReads,
  hasQemu,
  inTempDir,
  killBatch,
  readAll,
} from "./_util.ts";

const disk_bytes = 16 << 20;
const kills_max = 50;
const run_time_ms = 50_000;
const writer = new URL("./_kill_writer.ts", import.meta.url).pathname;

Deno.test({
  name: "qcow2 SIGKILL loop: answered writes survive, leaks are reclaimed by the next writer",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const rng = testSeed("qcow2 kill");
      const image = `${dir}/k.qcow2`;
      await createQcow2(image, { sizeBytes: disk_bytes, options: { cluster_size: "16K" } });
      let model: Uint8Array = new Uint8Array(disk_bytes);
      let kills = 0;
      let answered = 0;
      let leaked = 0;
      const started = Date.now();
      for (; kills < kills_max && Date.now() - started < run_time_ms; kills += 1) {
        const seed = rng.int(0, 2 ** 31);
        const log = `${dir}/w${kills}.log`;
        await killWriterAfter(writer, [image, log, String(seed)], log, rng.int(5, 250));
        const logged = (await Deno.readTextFile(log)).trim().split("\n").length - 1;
        answered += logged;
        const replay = new Random(seed);
        const stable = model.slice();
        for (let b = 0; b < logged; b += 1) {
          for (const op of killBatch(replay, disk_bytes)) {
            if (op.data) stable.set(op.data, op.offset);
            else stable.fill(0, op.offset, op.offset + op.length);
          }
        }
        const ambiguous = new Uint8Array(disk_bytes);
        for (const op of killBatch(replay, disk_bytes)) {
          ambiguous.fill(1, op.offset, op.offset + op.length);
        }
        const ours = await checkQcow2(image, { repair: false });
        assert.equal(ours.unusable, undefined, `kill ${kills}: ${ours.unusable}`);
        assert.deepEqual(ours.corruptions, [], `kill ${kills}`);
        leaked += ours.leakedClusters;
        const check = await assertQemuClean(image, true);
        assert.equal(check.leaks, ours.leakedClusters, `kill ${kills}: leak counts agree`);
        const driver = await openImage(image, { readOnly: true, cache: "writeback" });
        try {
          model = await readAll(driver);
        } finally {
          await driver.close();
        }
        for (let i = 0; i < disk_bytes; i += 1) {
          if (!ambiguous[i] && model[i] !== stable[i]) {
            assert.fail(
              `kill ${kills}: byte ${i} is ${model[i]}, an answered write left ${stable[i]}`,
            );
          }
        }
      }
      console.log(
        `${kills} kills, ${answered} answered batches verified, ${leaked} leaked clusters seen`,
      );
      assert.ok(kills >= 10, `only ${kills} kills`);
      // The last writer's leaks: the next writable open reclaims them.
      const last = await openImage(image);
      await last.close();
      await assertQemuClean(image);
      const ours = await checkQcow2(image, { repair: false });
      assert.equal(ours.leakedClusters, 0);
      await assertQemuReads(dir, image, model);
    });
  },
});
