/**
 * Writer process of the vmdk SIGKILL test: opens a vmdk read-write (a
 * restarted disk process does the same, recovering what a killed one
 * left), then writes seeded batches, flushing after every third, and logs
 * every answered write (tests/_helpers/acked_writes.ts). The parent kills
 * it at a random moment. Usage: _crash_writer.ts IMAGE LOG SEED
 */
import { openVmdk } from "../../../src/formats/vmdk/vmdk.ts";
import { writeLoggedBatches } from "../../_helpers/acked_writes.ts";

export const crash_batches_per_flush = 3;
const crash_batches_max = 600;

if (import.meta.main) {
  const [path, log, seedText] = Deno.args;
  const driver = await openVmdk(path);
  const append = (line: string) => Deno.writeTextFileSync(log, `${line}\n`, { append: true });
  await writeLoggedBatches(
    driver,
    Number(seedText),
    append,
    crash_batches_per_flush,
    crash_batches_max,
  );
  await driver.close();
  append("done");
}
