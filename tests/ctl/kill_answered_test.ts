/**
 * A killed disk process loses no answered write, for the formats that keep
 * metadata (qcow, vmdk), and for a raw image through the page cache, whose
 * large writes ctrl answers itself (src/ring/page_cache.ts): clients write over NBD through ctrl — no flush at
 * all — while the disk process is SIGKILLed again and again; ctrl restarts
 * it and re-issues what it had not answered (it keeps no copy of answered
 * writes). Every write is answered in the end, so the disk must equal the
 * clients' model exactly; after `destroy` (a clean stop) the image has no
 * corruption and no leaked cluster, and reads the same through a fresh
 * driver.
 */
import assert from "node:assert/strict";
import * as P from "../../src/frontends/nbd/protocol.ts";
import { openImage } from "../../src/formats/open_image.ts";
import { checkQcow } from "../../src/formats/qcow/check.ts";
import { vmdkCheck } from "../../src/formats/vmdk/check.ts";
import { createVmdk } from "../../src/formats/vmdk/create.ts";
import type { CheckReport } from "../../src/formats/inspect.ts";
import { RawNbdClient } from "../_helpers/nbd_client.ts";
import { type Random, testSeed } from "../_helpers/random.ts";
import { CtrlHarness, qcowImage } from "../_helpers/ctrl_harness.ts";

const MiB = 1 << 20;
const size_bytes = 32 * MiB;
const connections = 8;
/** Each connection owns the 64 KiB stripes whose number modulo `connections` is its own. */
const stripe_bytes = 64 << 10;
/** The load runs until this many kills (restarts are slow under load), within `load_ms_max`. */
const kills_min = 5;
const load_ms_max = 90_000;

/** One connection writing random ranges of its own stripes; the model follows each answer. */
async function writer(
  client: RawNbdClient,
  c: number,
  rng: Random,
  model: Uint8Array,
  until: () => boolean,
): Promise<number> {
  let answered = 0;
  const stripes = size_bytes / stripe_bytes / connections;
  while (!until()) {
    const stripe = rng.int(0, stripes - 1) * connections + c;
    const sectors = rng.int(1, stripe_bytes / 512);
    const first = rng.int(0, stripe_bytes / 512 - sectors);
    const offset = stripe * stripe_bytes + first * 512;
    const data = rng.bytes(sectors * 512);
    const error = await client.command(P.NBD_CMD_WRITE, 0, offset, data.byteLength, data);
    assert.equal(error, 0, `write at ${offset} failed: NBD error ${error}`);
    model.set(data, offset);
    answered += 1;
  }
  return answered;
}

/** Kills the disk process `kills_min` times, each a while after it serves again; then stops the load. */
async function killLoop(h: CtrlHarness, minor: number, rng: Random, stop: () => void) {
  let kills = 0;
  const deadline = Date.now() + load_ms_max;
  while (kills < kills_min && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, rng.int(300, 900)));
    const m = (await h.list()).find((x) => x.minor === minor)!;
    if (m.state === "running" && typeof m.pid === "number") {
      Deno.kill(m.pid, "SIGKILL");
      kills += 1;
    }
  }
  await new Promise((r) => setTimeout(r, 500)); // writes go on through the last restart
  stop();
  return kills;
}

async function loadWithKills(
  h: CtrlHarness,
  image: string,
  name: string,
  check: (path: string) => Promise<CheckReport>,
  cache?: "writeback",
) {
  const rng = testSeed(`kill answered ${name}`);
  const { minor } = await h.request({ op: "create", image, name, cache }) as { minor: number };
  const model = new Uint8Array(size_bytes);
  const clients = await Promise.all(Array.from({ length: connections }, async () => {
    const client = await RawNbdClient.connect(`${h.runDir}/nbd.sock`);
    await client.go(name);
    return client;
  }));
  try {
    let stopped = false;
    const until = () => stopped;
    const [kills, ...answered] = await Promise.all([
      killLoop(h, minor, rng, () => (stopped = true)),
      ...clients.map((client, c) => writer(client, c, rng, model, until)),
    ]);
    const writes = answered.reduce((a, b) => a + b, 0);
    console.log(`${name}: ${kills} kills, ${writes} writes answered, none flushed`);
    assert.ok(kills >= kills_min, `only ${kills} kills`);
    for (let at = 0; at < size_bytes; at += MiB) {
      const got = await clients[0].read(at, MiB);
      const want = model.subarray(at, at + MiB);
      const diff = got.findIndex((b, i) => b !== want[i]);
      assert.equal(diff, -1, `${name}: byte ${at + diff} lost an answered write`);
    }
  } finally {
    for (const client of clients) client.close();
  }
  if (cache === "writeback") {
    const stats = await h.request({ op: "stats", minor });
    const { cachedWrites } = stats.answeredInCtrl as { cachedWrites: number };
    assert.ok(cachedWrites > 0, `${name}: ctrl answered some writes itself`);
  }
  await h.request({ op: "destroy", minor });
  const path = image.slice(image.indexOf(":") + 1);
  const report = await check(path);
  assert.deepEqual(report.corruptions, [], `${name}: check`);
  assert.equal(report.leakedClusters, 0, `${name}: every leak of the kills was reclaimed`);
  const driver = await openImage(image, { readOnly: true, cache: "writeback" });
  try {
    const got = new Uint8Array(size_bytes);
    await driver.read(0, got);
    assert.ok(got.every((b, i) => b === model[i]), `${name}: the image holds every answered write`);
  } finally {
    await driver.close();
  }
}

Deno.test("ctrl: SIGKILLed qcow and vmdk disk processes lose no answered write (no flush), leak nothing", async () => {
  const h = await CtrlHarness.start(["--restart-limit", "1000"]);
  try {
    const qcow = await qcowImage(h.dir, "disk.qcow", size_bytes / MiB);
    await loadWithKills(h, `qcow:${qcow}`, "q", (p) => checkQcow(p, { repair: false }));
    createVmdk(`${h.dir}/disk.vmdk`, size_bytes);
    await loadWithKills(
      h,
      `vmdk:${h.dir}/disk.vmdk`,
      "v",
      (p) => vmdkCheck(p, { repair: false }),
    );
  } finally {
    await h.close();
  }
});

Deno.test("ctrl: a SIGKILLed raw writeback disk process loses no answered write, ctrl's or its own", async () => {
  const h = await CtrlHarness.start(["--restart-limit", "1000"]);
  try {
    const raw = `${h.dir}/disk.raw`;
    await Deno.writeFile(raw, new Uint8Array(size_bytes));
    const noMetadata = (): Promise<CheckReport> =>
      Promise.resolve({ corruptions: [], leakedClusters: 0 });
    await loadWithKills(h, `aio:${raw}`, "r", noMetadata, "writeback");
  } finally {
    await h.close();
  }
});
