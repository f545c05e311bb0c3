/**
 * A disk kept busy by a steady load still answers control messages (ctrl's
 * stats, pause, resume, qos; destroy begins with a pause) promptly: the
 * disk process waits for its completions on the JavaScript thread
 * (ffi/aio.ts `waitOnThisThread`), and that wait must give the event loop,
 * which reads ctrl's channel, a turn while completions keep arriving — not
 * only once the load stops.
 *
 * The disk is served as the disk process serves it (the thread wait, the
 * ring watch, an aio raw image), in this process; the load is a front end
 * that keeps the ring full, as a guest behind the kernel module does; the
 * control messages travel over a kick channel, as ctrl's do.
 */
import assert from "node:assert/strict";
import { waitOnThisThread, watchRingWhileWaiting } from "../../ffi/aio.ts";
import { addressOf } from "../../ffi/memory.ts";
import { SRING_REQ_PROD } from "../../src/ring/blkif.ts";
import { KickChannel } from "../../src/ring/kick_channel.ts";
import { openImage } from "../../src/formats/open_image.ts";
import { servedRing } from "../_helpers/ring_pair.ts";
import { rawImage } from "../_helpers/ctrl_harness.ts";

/** Longest a control round trip to a busy disk may take. */
const call_round_trip_ms_max = 500;
/** The load stops after this long at most (a starved call returns then). */
const load_ms_max = 4000;
const depth = 16;
const read_bytes = 4096;
const image_bytes = 64 << 20;

async function unixPair(dir: string): Promise<[Deno.Conn, Deno.Conn]> {
  const listener = Deno.listen({ transport: "unix", path: `${dir}/channel` });
  const pair = await Promise.all([
    Deno.connect({ transport: "unix", path: `${dir}/channel` }),
    listener.accept(),
  ]);
  listener.close();
  return pair;
}

Deno.test("disk: control messages are answered promptly while completions keep arriving", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-busy-" });
  // Reads of holes complete at once: completions never stop arriving.
  const driver = await openImage(`aio:${await rawImage(dir, "busy.raw", image_bytes)}`);
  // No block status for the front end, or it would answer those reads itself.
  const { disk, ring, server } = servedRing(driver, { extents: false });
  const [ctrlEnd, diskEnd] = await unixPair(dir);
  const replies = new Map<number, () => void>();
  const ignore = { onKick: () => {}, onClose: () => {} };
  const ctrl = new KickChannel(ctrlEnd, {
    ...ignore,
    onMessage: (m) => replies.get(m.seq as number)?.(),
  });
  const diskChannel = new KickChannel(diskEnd, {
    ...ignore,
    onMessage: (m) => diskChannel.send({ t: "reply", seq: m.seq, stats: server().stats() }),
  });
  // As the disk process (src/disk/disk_command.ts) waits for its I/O.
  waitOnThisThread(200);
  watchRingWhileWaiting({
    address: addressOf(ring) + SRING_REQ_PROD,
    seen: () => server().seenRequestIndex,
    moved: () => server().kick(),
    spinUs: 0,
  });
  const started = performance.now();
  let callsDone = false;
  let reads = 0;
  const reader = async () => {
    const buffer = disk.borrowBuffer(read_bytes)!;
    while (!callsDone && performance.now() - started < load_ms_max) {
      await disk.read(Math.floor(Math.random() * (image_bytes / read_bytes)) * read_bytes, buffer);
      reads += 1;
    }
    disk.returnBuffer(buffer);
  };
  try {
    const load = Promise.all(Array.from({ length: depth }, reader));
    const times: number[] = [];
    for (let seq = 1; seq <= 10; seq += 1) {
      const sent = performance.now();
      const answered = new Promise<void>((resolve) => replies.set(seq, resolve));
      ctrl.send({ t: "call", seq, op: "stats" });
      await answered;
      times.push(Math.round(performance.now() - sent));
    }
    const readsDuringCalls = reads;
    callsDone = true;
    await load;
    assert.ok(readsDuringCalls >= depth, `the load did not run: ${readsDuringCalls} reads`);
    assert.ok(
      Math.max(...times) <= call_round_trip_ms_max,
      `control round trips under load, ms: ${times.join(" ")} (${readsDuringCalls} reads)`,
    );
  } finally {
    callsDone = true;
    waitOnThisThread(0);
    watchRingWhileWaiting(undefined);
    ctrl.close();
    diskChannel.close();
    server().stop();
    await driver.close();
    await Deno.remove(dir, { recursive: true });
  }
});
