/**
 * Writer process for the SIGKILL test: opens a VHD as the disk process
 * does (O_DIRECT), keeps DEPTH writes with disjoint ranges in flight, and
 * never flushes. Before issuing write i it logs `w i OFFSET LENGTH`; once
 * the write is answered it logs `a i`. Write i's bytes come from its seed,
 * so the test can rebuild them. The test kills it at a random moment.
 *
 * usage: _kill_writer.ts IMAGE LOG SEED DEPTH
 */
import { openImage } from "../../../src/formats/open_image.ts";
import { Random } from "../../_helpers/random.ts";
import { killWriteData } from "./_kill_plan.ts";
import { vhdWrite } from "./_vhd_util.ts";

const [image, log, seedText, depthText] = Deno.args;
const seed = Number(seedText);
const rng = new Random(seed);
const disk = await openImage(`vhd:${image}`);
const append = (line: string) => Deno.writeTextFileSync(log, `${line}\n`, { append: true });
const inFlight = new Map<number, [number, number]>();
append("ready");
let next = 0;
const worker = async () => {
  for (;;) {
    let [offset, length] = vhdWrite(rng, disk.sizeBytes, 2 << 20);
    while ([...inFlight.values()].some(([o, l]) => offset < o + l && o < offset + length)) {
      [offset, length] = vhdWrite(rng, disk.sizeBytes, 2 << 20);
    }
    const i = next++;
    inFlight.set(i, [offset, length]);
    append(`w ${i} ${offset} ${length}`);
    await disk.write(offset, killWriteData(seed, i, length));
    append(`a ${i}`);
    inFlight.delete(i);
  }
};
await Promise.all(Array.from({ length: Number(depthText) }, worker));
