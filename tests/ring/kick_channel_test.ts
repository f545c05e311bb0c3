import assert from "node:assert/strict";
import { KickChannel } from "../../src/ring/kick_channel.ts";

async function connectedPair() {
  const dir = await Deno.makeTempDir({ prefix: "blktap-kick-" });
  const path = `${dir}/s`;
  const listener = Deno.listen({ transport: "unix", path });
  const [client, server] = await Promise.all([
    Deno.connect({ transport: "unix", path }),
    listener.accept(),
  ]);
  listener.close();
  return { client, server, dir };
}

function recorder() {
  const events: string[] = [];
  const closed = Promise.withResolvers<void>();
  return {
    events,
    closed: closed.promise,
    handlers: {
      onKick: () => events.push("kick"),
      onMessage: (m: Record<string, unknown>) => events.push(JSON.stringify(m)),
      onClose: () => closed.resolve(),
    },
  };
}

Deno.test("kick channel: kicks and JSON messages arrive in order, large ones whole", async () => {
  const { client, server, dir } = await connectedPair();
  const a = recorder();
  const b = recorder();
  const left = new KickChannel(client, a.handlers);
  const right = new KickChannel(server, b.handlers);
  try {
    const big = "x".repeat(300_000);
    left.send({ t: "hello", n: 1 });
    left.kick();
    left.kick(); // coalesces with the one still queued
    left.send({ t: "big", big });
    left.kick();
    const bigEvent = JSON.stringify({ t: "big", big });
    for (let i = 0; i < 200 && !b.events.includes(bigEvent); i += 1) {
      await new Promise((r) => setTimeout(r, 5));
    }
    assert.equal(b.events[0], JSON.stringify({ t: "hello", n: 1 }));
    assert.ok(b.events.includes(JSON.stringify({ t: "big", big })));
    const kicks = b.events.filter((e) => e === "kick").length;
    assert.ok(kicks >= 1 && kicks <= 2, `${kicks} kicks`);
    right.close();
    await a.closed;
    assert.equal(left.closed, true);
  } finally {
    left.close();
    right.close();
    await Deno.remove(dir, { recursive: true });
  }
});
