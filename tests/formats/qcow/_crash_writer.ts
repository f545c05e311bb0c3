/**
 * Writer process of the qcow SIGKILL loop: opens a qcow image read-write
 * (a restarted disk process does the same, reclaiming what a killed one
 * left), then writes seeded batches and logs every answered write
 * (tests/_helpers/acked_writes.ts). The test kills it at a random moment.
 *
 * usage: _crash_writer.ts IMAGE LOG SEED
 */
import { QcowDriver } from "../../../src/formats/qcow/qcow.ts";
import { RawDriver } from "../../../src/formats/raw/raw.ts";
import { openImageFile } from "../../../src/formats/raw/open_file.ts";
import { writeLoggedBatches } from "../../_helpers/acked_writes.ts";

const [image, log, seedText] = Deno.args;
// Only the drivers it needs: a short start keeps the kill loop fast.
const folder = image.slice(0, image.lastIndexOf("/"));
const disk = await QcowDriver.open(image, {}, {
  openFile: (path, options) => openImageFile(path, options),
  openBacking: async (name) =>
    new RawDriver("aio", await openImageFile(`${folder}/${name}`, { readOnly: true })),
});
const append = (line: string) => Deno.writeTextFileSync(log, `${line}\n`, { append: true });
await writeLoggedBatches(disk, Number(seedText), append, 4);
