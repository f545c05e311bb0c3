/**
 * A separate process attached to a RAM disk, driven line by line on stdin:
 * `write OFFSET BYTE LENGTH`, `read OFFSET LENGTH` (prints the bytes as hex),
 * `close`. Prints `ok` after each command. Usage: _ram_peer.ts SPEC
 */
import { openImage } from "../../../src/formats/open_image.ts";

const driver = await openImage(Deno.args[0]);
const encoder = new TextEncoder();
const say = (text: string) => Deno.stdout.writeSync(encoder.encode(`${text}\n`));
say("ready");
let pending = "";
for await (const chunk of Deno.stdin.readable.pipeThrough(new TextDecoderStream())) {
  pending += chunk;
  let newline;
  while ((newline = pending.indexOf("\n")) >= 0) {
    const [verb, ...args] = pending.slice(0, newline).split(" ");
    pending = pending.slice(newline + 1);
    if (verb === "write") {
      const [offset, value, length] = args.map(Number);
      await driver.write(offset, new Uint8Array(length).fill(value));
      say("ok");
    } else if (verb === "read") {
      const [offset, length] = args.map(Number);
      const bytes = new Uint8Array(length);
      await driver.read(offset, bytes);
      say(Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(""));
    } else if (verb === "close") {
      await driver.close();
      say("ok");
      Deno.exit(0);
    }
  }
}
