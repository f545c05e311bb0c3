/**
 * Child process of the crash test: opens a vmdk, prints READY, then runs
 * seeded batches of concurrent writes, flushing after every third batch and
 * printing `F n` once batches `< n` are durable. The parent kills it with
 * SIGKILL at a random moment. Usage: _crash_writer.ts IMAGE SEED
 */
import { openVmdk } from "../../../src/formats/vmdk/vmdk.ts";
import { crash_batches_max, crash_batches_per_flush, crashBatch } from "./_crash_plan.ts";
import { Random } from "../../_helpers/random.ts";

const [path, seedText] = Deno.args;
const driver = await openVmdk(path);
const rng = new Random(Number(seedText));
const encoder = new TextEncoder();
Deno.stdout.writeSync(encoder.encode("READY\n"));
for (let b = 0; b < crash_batches_max; b += 1) {
  const batch = crashBatch(rng, driver.sizeBytes);
  await Promise.all(batch.map((w) => driver.write(w.offset, w.data)));
  if ((b + 1) % crash_batches_per_flush === 0) {
    await driver.flush();
    Deno.stdout.writeSync(encoder.encode(`F ${b + 1}\n`));
  }
}
await driver.close();
Deno.stdout.writeSync(encoder.encode("DONE\n"));
