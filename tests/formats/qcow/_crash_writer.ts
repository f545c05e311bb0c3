/**
 * Writer process for the SIGKILL crash test: opens a qcow image, then
 * writes seeded batches (see `crashBatch`), flushing after each and
 * appending the batch number to a log once the flush returned. The test
 * kills it at a random moment and replays the batches from the seed.
 *
 * usage: _crash_writer.ts IMAGE LOG SEED DISK_BYTES
 */
import { QcowDriver } from "../../../src/formats/qcow/qcow.ts";
import { RawDriver } from "../../../src/formats/raw/raw.ts";
import { openImageFile } from "../../../src/formats/raw/open_file.ts";
import { Random } from "../../_helpers/random.ts";
import { crashBatch } from "./_util.ts";

const [image, log, seedText, diskText] = Deno.args;
const rng = new Random(Number(seedText));
// Only the drivers it needs: a short start keeps the kill loop fast.
const folder = image.slice(0, image.lastIndexOf("/"));
const disk = await QcowDriver.open(image, {}, {
  openFile: (path, options) => openImageFile(path, options),
  openBacking: async (name) =>
    new RawDriver("aio", await openImageFile(`${folder}/${name}`, { readOnly: true })),
});
const append = (line: string) => Deno.writeTextFileSync(log, `${line}\n`, { append: true });
append("ready");
for (let batch = 0;; batch += 1) {
  const writes = crashBatch(rng, Number(diskText));
  await Promise.all(writes.map(([offset, data]) => disk.write(offset, data)));
  await disk.flush();
  append(String(batch));
}
