/**
 * An NBD server in a process of its own, so a test can read its RSS: one
 * export "d", a slow in-memory disk (every read and write takes DELAY_MS),
 * the limits given as JSON. Prints `ready` once listening; answers each
 * line on stdin with its payload accounting and counters as JSON; exits
 * when stdin closes. Usage: _budget_server.ts SOCKET DELAY_MS LIMITS_JSON
 */
import { startNbdServer } from "../../../src/frontends/nbd/server.ts";
import { MemoryDriver } from "../../_helpers/memory_driver.ts";

const [socket, delayMs, limits] = Deno.args;
const driver = new MemoryDriver(64 << 20, { delayMs: Number(delayMs) });
const nbdExport = { name: "d", driver, readOnly: false };
const server = await startNbdServer({
  unixPath: socket,
  lookup: (name) => (name === "d" ? nbdExport : undefined),
  list: () => [nbdExport],
  limits: JSON.parse(limits),
});
const say = (text: string) => Deno.stdout.writeSync(new TextEncoder().encode(`${text}\n`));
say("ready");
for await (const _ of Deno.stdin.readable.pipeThrough(new TextDecoderStream())) {
  say(JSON.stringify({ memory: server.payloadMemory, stats: server.stats }));
}
await server.close();
