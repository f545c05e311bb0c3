/**
 * `blktap ctrl --cache writeback` on a raw image answers reads of cached
 * bytes and large writes itself (src/ring/page_cache.ts). qemu-io, the
 * client, must see every answered write and discard, across disk-process
 * restarts; a write ctrl answered is in the file and survives a SIGKILLed
 * disk process; nothing is answered while the minor is paused; a QoS limit
 * sends every request to the disk process, which enforces it. Large cached
 * reads are sent from the file with sendfile: qemu-io and nbdcopy must get
 * the image's bytes.
 */
import assert from "node:assert/strict";
import { assertExportIs, CtrlHarness, waitRunning } from "../_helpers/ctrl_harness.ts";
import { missingTools, runOk } from "../_helpers/tools.ts";

const MiB = 1 << 20;
const ignore = missingTools("qemu-io", "qemu-img").length > 0;

async function answeredInCtrl(h: CtrlHarness): Promise<Record<string, number>> {
  const stats = await h.request({ op: "stats", minor: 0 });
  return stats.answeredInCtrl as Record<string, number>;
}

/** Reads ctrl answered from the page cache, copied or sent with sendfile. */
async function cachedReads(h: CtrlHarness): Promise<number> {
  const answered = await answeredInCtrl(h);
  return answered.cachedReads + answered.cachedSends;
}

async function cachedWrites(h: CtrlHarness): Promise<number> {
  return (await answeredInCtrl(h)).cachedWrites;
}

function qemuIo(h: CtrlHarness, ...commands: string[]): Promise<string> {
  return runOk("qemu-io", ["-f", "raw", ...commands.flatMap((c) => ["-c", c]), h.nbdUri("tap0")]);
}

async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<false>((resolve) => timer = setTimeout(() => resolve(false), ms));
  const settled = promise.then(() => true, () => true);
  try {
    return await Promise.race([settled, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

Deno.test({
  name: "ctrl writeback: cached reads see every answered write and discard, across restarts",
  ignore,
  fn: async () => {
    const h = await CtrlHarness.start(["--restart-limit", "10"]);
    try {
      const image = `${h.dir}/disk.raw`;
      await Deno.writeFile(image, new Uint8Array(16 * MiB).fill(0x5a));
      await h.request({ op: "create", image: `aio:${image}`, cache: "writeback" });
      await qemuIo(h, "read -P 0x5a 0 4M", "read -P 0x5a 8M 4k");
      const before = await cachedReads(h);
      assert.ok(before > 0, "bytes in the page cache are read by ctrl");

      await qemuIo(
        h,
        "write -P 0x11 64k 64k",
        "read -P 0x11 64k 64k",
        "read -P 0x5a 0 64k",
        "discard 1M 1M",
        "read -P 0 1M 1M",
        "read -P 0x5a 2M 2M",
      );
      assert.ok(await cachedReads(h) > before);

      const killed = await h.diskPid(0);
      Deno.kill(killed, "SIGKILL");
      // Read while the disk process is gone: answered once a new one serves.
      await qemuIo(h, "read -P 0x11 64k 64k", "read -P 0 1M 1M");
      await waitRunning(h.runDir, { replacing: [killed] });
      const afterRestart = await cachedReads(h);
      await qemuIo(h, "write -P 0x22 3M 4k", "read -P 0x22 3M 4k", "read -P 0x11 64k 64k");
      assert.ok(await cachedReads(h) > afterRestart, "the new disk process's file is read too");
      await assertExportIs(h, "tap0", image);
    } finally {
      await h.close();
    }
  },
});

Deno.test({
  name:
    "ctrl writeback: large writes answered in ctrl are in the file and survive a SIGKILLed disk",
  ignore,
  fn: async () => {
    const h = await CtrlHarness.start(["--restart-limit", "10"]);
    try {
      const image = `${h.dir}/disk.raw`;
      await Deno.writeFile(image, new Uint8Array(8 * MiB).fill(0x5a));
      await h.request({ op: "create", image: `aio:${image}`, cache: "writeback" });
      await qemuIo(h, "write -P 0x41 1M 1M", "write -P 0x42 3M 64k", "write -P 0x43 5M 4k");
      assert.equal(await cachedWrites(h), 2, "the two large writes, not the 4 KiB one");

      // The disk process that would have written them is gone: ctrl put them in the file.
      Deno.kill(await h.diskPid(0), "SIGKILL");
      const file = await Deno.readFile(image);
      assert.ok(file.subarray(MiB, 2 * MiB).every((b) => b === 0x41), "1 MiB write in the file");
      assert.ok(file.subarray(3 * MiB, 3 * MiB + 65536).every((b) => b === 0x42));
      assert.ok(file.subarray(5 * MiB, 5 * MiB + 4096).every((b) => b === 0x43));
      assert.ok(file.subarray(0, MiB).every((b) => b === 0x5a), "nothing else written");
      await qemuIo(h, "read -P 0x41 1M 1M", "read -P 0x42 3M 64k", "read -P 0x5a 2M 1M");
      await assertExportIs(h, "tap0", image);
    } finally {
      await h.close();
    }
  },
});

Deno.test({
  name: "ctrl writeback: a paused minor answers no cached read; a QoS limit turns them off",
  ignore,
  fn: async () => {
    const h = await CtrlHarness.start();
    try {
      const image = `${h.dir}/disk.raw`;
      await Deno.writeFile(image, new Uint8Array(4 * MiB).fill(0x33));
      await h.request({ op: "create", image: `aio:${image}`, cache: "writeback" });
      await qemuIo(h, "read -P 0x33 0 1M");

      await h.request({ op: "pause", minor: 0 });
      // Read-only: a read-write client would wait for its flush at exit anyway.
      const held = runOk("qemu-io", [
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x33 0 64k",
        h.nbdUri("tap0"),
      ]);
      assert.equal(await settlesWithin(held, 500), false, "a read is held while paused");
      const writesBefore = await cachedWrites(h);
      const heldWrite = qemuIo(h, "write -P 0x34 1M 1M");
      assert.equal(await settlesWithin(heldWrite, 500), false, "a write is held while paused");
      await h.request({ op: "resume", minor: 0 });
      await held;
      await heldWrite;
      assert.equal(await cachedWrites(h), writesBefore, "the held write went to the disk process");
      await qemuIo(h, "read -P 0x34 1M 1M");

      await h.request({ op: "qos", minor: 0, maxIops: 100_000 });
      const limited = await cachedReads(h);
      const limitedWrites = await cachedWrites(h);
      await qemuIo(h, "read -P 0x33 0 1M", "read -P 0x33 64k 4k", "write -P 0x35 2M 1M");
      assert.equal(await cachedReads(h), limited, "with a limit, the disk process reads");
      assert.equal(await cachedWrites(h), limitedWrites, "and writes");
      await h.request({ op: "qos", minor: 0, maxIops: 0 });
      await qemuIo(h, "read -P 0x33 0 1M");
      assert.ok(await cachedReads(h) > limited, "without one, ctrl reads again");
    } finally {
      await h.close();
    }
  },
});

Deno.test({
  name: "ctrl writeback: large cached reads sent with sendfile carry the image's bytes",
  ignore: ignore || missingTools("nbdcopy").length > 0,
  fn: async () => {
    const h = await CtrlHarness.start();
    try {
      const image = `${h.dir}/disk.raw`;
      const bytes = new Uint8Array(24 * MiB);
      for (let i = 0; i < bytes.length; i += 65536) {
        crypto.getRandomValues(bytes.subarray(i, i + 65536));
      }
      bytes.fill(0, 20 * MiB, 22 * MiB); // zeros, still data: sent as data
      await Deno.writeFile(image, bytes);
      // A hole: reads over it are sent as data and hole chunks, the usual way.
      await runOk("fallocate", [
        "--punch-hole",
        "--offset",
        `${4 * MiB}`,
        "--length",
        `${MiB}`,
        image,
      ]);
      await h.request({ op: "create", image: `aio:${image}`, cache: "writeback" });

      const copy = `${h.dir}/copy.raw`;
      await runOk("nbdcopy", ["--requests=8", "--request-size=1048576", h.nbdUri("tap0"), copy]);
      await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", image, copy]);
      const sent = (await answeredInCtrl(h)).cachedSends;
      assert.ok(sent > 0, "large reads of cached bytes are sent from the file");

      // An answered write is what the next sent read shows, at odd offsets too.
      await qemuIo(
        h,
        "write -P 0x77 3M 1M",
        "read -P 0x77 3M 1M",
        "write -P 0x78 5000k 96k",
        "read -P 0x78 5000k 96k",
      );
      assert.ok((await answeredInCtrl(h)).cachedSends > sent);
      await assertExportIs(h, "tap0", image);
    } finally {
      await h.close();
    }
  },
});
