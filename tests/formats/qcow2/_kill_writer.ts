/**
 * Writer process for the qcow2 SIGKILL test: opens the image (a writable
 * open repairs what the previous kill left), then runs seeded batches of
 * writes and write-zeroes without flushing, appending the batch number to
 * a log once every operation of it was answered. The test kills it at a
 * random moment and replays the batches from the seed.
 *
 * usage: _kill_writer.ts IMAGE LOG SEED
 */
import { openImage } from "../../../src/formats/open_image.ts";
import { Random } from "../../_helpers/random.ts";
import { killBatch } from "./_util.ts";

const [image, log, seedText] = Deno.args;
const rng = new Random(Number(seedText));
const disk = await openImage(`qcow2:${image}`);
const append = (line: string) => Deno.writeTextFileSync(log, `${line}\n`, { append: true });
append("ready");
for (let batch = 0;; batch += 1) {
  const ops = killBatch(rng, disk.sizeBytes);
  await Promise.all(
    ops.map((op) =>
      op.data ? disk.write(op.offset, op.data) : disk.writeZeroes(op.offset, op.length)
    ),
  );
  append(String(batch)); // answered: must survive the kill, flushed or not
  if (batch % 7 === 6) await disk.flush();
}
