/**
 * Load generator for one image through blktap's own driver stack (no
 * front end): `depth` concurrent requests of `bs` bytes for `seconds`,
 * from page-aligned buffers as the ring's data pages are. Prints one
 * `key=value` line, like ../shared/bench/nbd-load.sh.
 *
 *   deno run -A bench/raw_load.ts --image aio:/path --rw read --bs 1048576 --depth 8 --seconds 10
 * @module
 */
import { parseArgs } from "node:util";
import { openImage } from "../src/formats/open_image.ts";
import { NativeMemory } from "../ffi/memory.ts";

const { values } = parseArgs({
  options: {
    image: { type: "string" },
    rw: { type: "string", default: "read" },
    bs: { type: "string", default: "1048576" },
    depth: { type: "string", default: "8" },
    seconds: { type: "string", default: "10" },
    cache: { type: "string", default: "none" },
  },
});
if (!values.image) throw new Error("--image TYPE:PATH is required");
const blockBytes = Number(values.bs);
const depth = Number(values.depth);
const random = values.rw!.startsWith("rand");
const writing = values.rw!.endsWith("write");
const cache = values.cache === "writeback" ? "writeback" : "none";

const driver = await openImage(values.image, { cache });
const blocks = Math.floor(driver.sizeBytes / blockBytes);
let nextBlock = 0;
let ops = 0;
const deadline = performance.now() + Number(values.seconds) * 1000;

async function worker(buffer: Uint8Array): Promise<void> {
  while (performance.now() < deadline) {
    const block = random ? Math.floor(Math.random() * blocks) : nextBlock++ % blocks;
    if (writing) await driver.write(block * blockBytes, buffer);
    else await driver.read(block * blockBytes, buffer);
    ops += 1;
  }
}

const buffers = Array.from({ length: depth }, () => {
  const memory = NativeMemory.allocate(blockBytes);
  crypto.getRandomValues(memory.bytes.subarray(0, Math.min(blockBytes, 65536)));
  return memory.bytes.subarray(0, blockBytes);
});
const started = performance.now();
await Promise.all(buffers.map(worker));
if (writing) await driver.flush();
const seconds = (performance.now() - started) / 1000;
await driver.close();
console.log(
  `iops=${(ops / seconds).toFixed(0)} MBps=${(ops * blockBytes / seconds / 1e6).toFixed(1)}`,
);
