/**
 * Writer process for the SIGKILL crash test: opens a qcow image, then
 * writes seeded batches (see `crashBatch`), flushing after each and
 * appending the batch number to a log once the flush returned. The test
 * kills it at a random moment and replays the batches from the seed.
 *
 * usage: _crash_writer.ts IMAGE LOG SEED DISK_BYTES
 */
import { openImage } from "../../../src/formats/open_image.ts";
import { Random } from "../../_helpers/random.ts";
import { crashBatch } from "./_util.ts";

const [image, log, seedText, diskText] = Deno.args;
const rng = new Random(Number(seedText));
const disk = await openImage(image);
const append = (line: string) => Deno.writeTextFileSync(log, `${line}\n`, { append: true });
append("ready");
for (let batch = 0;; batch += 1) {
  const writes = crashBatch(rng, Number(diskText));
  await Promise.all(writes.map(([offset, data]) => disk.write(offset, data)));
  await disk.flush();
  append(String(batch));
}
