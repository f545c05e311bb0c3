/**
 * Child of huge_test.ts, so its memory is measured alone: opens a qcow
 * image read-write, writes a pattern (byte = n + 1) of `length` bytes at
 * each offset n, reads them back, closes, and prints one JSON line with
 * the virtual size and the peak resident memory (VmHWM).
 *
 * usage: _huge_writer.ts IMAGE LENGTH OFFSET...
 */
import { openImage } from "../../../src/formats/open_image.ts";

const [image, lengthText, ...offsets] = Deno.args;
const length = Number(lengthText);
const driver = await openImage(`qcow:${image}`);
for (const [n, text] of offsets.entries()) {
  await driver.write(Number(text), new Uint8Array(length).fill(n + 1));
}
for (const [n, text] of offsets.entries()) {
  const got = new Uint8Array(length);
  await driver.read(Number(text), got);
  if (!got.every((b) => b === n + 1)) throw new Error(`offset ${text} did not read back`);
}
const sizeBytes = driver.sizeBytes;
await driver.close();
const status = await Deno.readTextFile("/proc/self/status");
const peakRssBytes = Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) * 1024;
console.log(JSON.stringify({ sizeBytes, peakRssBytes }));
