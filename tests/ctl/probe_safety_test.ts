/**
 * A guest must never reach host files through format probing (QEMU's
 * CVE-2008-2004 class). Guests, through ctrl's NBD socket and straight
 * through the ring, write hostile heads (a qcow header whose backing file is
 * a host file, a qcow2 header, a vmdk descriptor with a FLAT extent on the
 * host file, a vhd footer) into sector 0 of raw disks attached by path
 * alone (probed) and as `aio:PATH`. Then every disk process is SIGKILLed and
 * ctrl is restarted: an inotify watch proves no process ever opened the
 * host file, which is unchanged; the disks still read as raw with what the
 * guest wrote, or the write was refused when it would have changed the
 * probed format (only for disks attached by path alone).
 */
import assert from "node:assert/strict";
import { CtrlHarness, qcowImage, rawImage, waitRunning } from "../_helpers/ctrl_harness.ts";
import { RingCtrl } from "./_ring_ctrl.ts";
import { RawNbdClient } from "../_helpers/nbd_client.ts";
import { hostileHeads } from "../_helpers/hostile_heads.ts";
import { OpenWatch } from "../_helpers/open_watch.ts";
import { MAIN_TS, sha256File } from "../_helpers/tools.ts";
import * as P from "../../src/frontends/nbd/protocol.ts";
import { ctlRequest } from "../../src/ctl/client.ts";
import { probeHead } from "../../src/formats/open_image.ts";
import { REGISTRY_NAME } from "../../src/cli/run_dir.ts";

const KiB = 1024;
const disk_bytes = 1 << 20;
const head_bytes = 4 * KiB;
const marker_offset = 64 * KiB;

/** A guest on a minor: its writes answer undefined or the error. */
interface Guest {
  write(name: string, offset: number, data: Uint8Array): Promise<string | undefined>;
  read(name: string, offset: number, length: number): Promise<Uint8Array>;
}

/** The ctrl under test, whichever way it is run. */
interface CtrlUnderTest {
  runDir: string;
  guest: Guest;
  /** What the guest sees of a refused write. */
  refusal: RegExp;
  restart(): Promise<void>;
}

function nbdGuest(runDir: string): Guest {
  const connect = async (name: string) => {
    const client = await RawNbdClient.connect(`${runDir}/nbd.sock`);
    await client.go(name);
    return client;
  };
  return {
    async write(name, offset, data) {
      const client = await connect(name);
      try {
        const error = await client.command(P.NBD_CMD_WRITE, 0, offset, data.byteLength, data);
        return error === 0 ? undefined : `NBD error ${error}`;
      } finally {
        client.close();
      }
    },
    async read(name, offset, length) {
      const client = await connect(name);
      try {
        return await client.read(offset, length);
      } finally {
        client.close();
      }
    },
  };
}

async function list(runDir: string): Promise<Record<string, unknown>[]> {
  return (await ctlRequest(runDir, { op: "list" })).minors as Record<string, unknown>[];
}

interface Disk {
  name: string;
  path: string;
  head: string;
  head_bytes: Uint8Array;
  /** Attached by path alone (probed raw, guarded). */
  probed: boolean;
  /** The write of the head was refused. */
  refused?: string;
}

async function scenario(ctrl: CtrlUnderTest, dir: string, explicitHeads: number): Promise<void> {
  await Deno.mkdir(`${dir}/images`);
  await Deno.mkdir(`${dir}/host`);
  const canary = `${dir}/host/canary`;
  await Deno.writeFile(canary, crypto.getRandomValues(new Uint8Array(64 * KiB)));
  const canaryHash = await sha256File(canary);
  const watch = OpenWatch.start(canary);
  try {
    const disks: Disk[] = [];
    const heads = hostileHeads(canary, disk_bytes);
    const attachments = [
      ...heads.map((h) => ({ ...h, probed: true })),
      ...heads.slice(0, explicitHeads).map((h) => ({ ...h, probed: false })),
    ];
    for (const [i, { name, head, probed }] of attachments.entries()) {
      const path = `${dir}/images/disk${i}.raw`;
      await Deno.writeFile(path, new Uint8Array(disk_bytes));
      const created = await ctlRequest(ctrl.runDir, {
        op: "create",
        image: probed ? path : `aio:${path}`,
      });
      disks.push({ name: String(created.name), path, head: name, head_bytes: head, probed });
    }
    const marker = new Uint8Array(4 * KiB).fill(0x5a);
    for (const d of disks) {
      d.refused = await ctrl.guest.write(d.name, 0, d.head_bytes);
      assert.equal(await ctrl.guest.write(d.name, marker_offset, marker), undefined);
    }
    // Every disk process dies, and then ctrl.
    const first = await list(ctrl.runDir);
    for (const m of first) Deno.kill(m.pid as number, "SIGKILL");
    await waitRunning(ctrl.runDir, { replacing: first.map((m) => m.pid as number) });
    const second = await list(ctrl.runDir);
    await ctrl.restart();
    await waitRunning(ctrl.runDir, { replacing: second.map((m) => m.pid as number) });
    // The guests go on; what they see is checked once the host file is.
    const after = new Uint8Array(4 * KiB).fill(0xa5);
    const writes: (string | undefined)[] = [];
    const reads: (Uint8Array | Error)[] = [];
    for (const d of disks) {
      writes.push(await ctrl.guest.write(d.name, 32 * KiB, after));
      const length = marker_offset + marker.byteLength;
      reads.push(await ctrl.guest.read(d.name, 0, length).catch((e: Error) => e));
    }

    assert.deepEqual(watch.events(), [], "no process opened, read or wrote the host file");
    assert.equal(await sha256File(canary), canaryHash, "the host file is unchanged");
    const sizes = (await list(ctrl.runDir)).map((m) => m.sizeBytes);
    assert.deepEqual(sizes, disks.map(() => disk_bytes), "every disk still has its raw size");
    for (const [i, d] of disks.entries()) {
      const probes = probeHead(d.head_bytes);
      const refusedByDesign = d.probed && probes !== undefined;
      const what = `${d.head} (${d.probed ? "probed" : "aio:"})`;
      if (refusedByDesign) assert.match(d.refused ?? "", ctrl.refusal, `${what}: refused`);
      else assert.equal(d.refused, undefined, `${what}: the write is accepted`);
      const expected = refusedByDesign ? new Uint8Array(head_bytes) : d.head_bytes;
      const read = reads[i];
      if (read instanceof Error) throw read;
      assert.equal(writes[i], undefined, `${what}: written after the restarts`);
      assert.deepEqual(read.subarray(0, head_bytes), expected, `${what}: reads as raw`);
      assert.deepEqual(read.subarray(32 * KiB, 36 * KiB), after, what);
      assert.deepEqual(read.subarray(marker_offset), marker, what);
    }
    const registry = JSON.parse(await Deno.readTextFile(`${ctrl.runDir}/${REGISTRY_NAME}`));
    assert.deepEqual(
      registry.minors.map((m: Record<string, unknown>) => [m.image, m.probedRaw]),
      disks.map((d) => [`aio:${d.path}`, d.probed]),
      "the recorded format is what every open uses",
    );
  } finally {
    watch.close();
  }
}

Deno.test("probe safety: hostile heads through ctrl's NBD socket, disk processes killed, ctrl restarted", async () => {
  const h = await CtrlHarness.start();
  try {
    const ctrl = {
      runDir: h.runDir,
      guest: nbdGuest(h.runDir),
      refusal: new RegExp(`^NBD error ${P.NBD_EIO}$`),
      restart: async () => {
        await h.killCtrl();
        await h.startCtrl();
      },
    };
    await scenario(ctrl, h.dir, 4);
  } finally {
    await h.close();
  }
});

Deno.test("probe safety: hostile heads straight through the ring, disk processes killed, ctrl restarted", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-ring-guest-" });
  const ring = new RingCtrl(`${dir}/run`, `${dir}/shm`);
  await Deno.mkdir(ring.shmDir);
  const pids = new Set<number>();
  try {
    await ring.start();
    const ctrl = {
      runDir: ring.runDir,
      guest: ring,
      refusal: /write failed \(blkif status -1\)/,
      restart: async () => {
        for (const m of await list(ring.runDir)) pids.add(m.pid as number);
        await ring.kill();
        await ring.start();
      },
    };
    await scenario(ctrl, dir, 1);
    for (const m of await list(ring.runDir)) pids.add(m.pid as number);
  } finally {
    await ring.kill();
    for (const pid of pids) {
      try {
        // Only a disk process of this ctrl: a remembered pid may have been reused.
        const cmdline = Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0").join(" ");
        if (cmdline.includes(ring.runDir)) Deno.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

async function blktapIn(cwd: string, args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", "-A", MAIN_TS, ...args],
    cwd,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

Deno.test("probe safety: create says what it probed, warns for a writable raw, records an absolute type:path", async () => {
  const h = await CtrlHarness.start();
  try {
    const raw = await rawImage(h.dir, "disk.raw", disk_bytes);
    const qcow = await qcowImage(h.dir, "disk.qcow", 1);
    const create = (args: string[]) =>
      blktapIn(h.dir, ["create", ...args, "--json", "--run-dir", h.runDir]);

    const probedRaw = await create(["disk.raw"]);
    assert.equal(probedRaw.code, 0, probedRaw.stderr);
    assert.deepEqual(
      pick(JSON.parse(probedRaw.stdout)),
      { image: `aio:${raw}`, format: "aio", probed: true },
    );
    assert.match(probedRaw.stderr, /disk\.raw: format not given, probed as raw \(aio:\//);
    assert.match(
      probedRaw.stderr,
      /WARNING: Image format was not specified for '.*disk\.raw' and probing guessed raw/,
    );
    await h.request({ op: "destroy", minor: 0 });

    const readOnly = await create(["disk.raw", "--readonly"]);
    assert.doesNotMatch(readOnly.stderr, /WARNING/, "read-only: nothing to guard");
    const probedQcow = await create(["./disk.qcow"]);
    assert.deepEqual(
      pick(JSON.parse(probedQcow.stdout)),
      { image: `qcow:${qcow}`, format: "qcow", probed: true },
    );
    assert.doesNotMatch(probedQcow.stderr, /WARNING/);
    await h.request({ op: "destroy", minor: 0 });
    const named = await create([`aio:disk.raw`]);
    assert.deepEqual(
      pick(JSON.parse(named.stdout)),
      { image: `aio:${raw}`, format: "aio", probed: false },
    );
    assert.equal(named.stderr, "", "a named format: nothing to say");
    await rawImage(h.dir, "other.raw", disk_bytes);
    const plain = await blktapIn(h.dir, ["create", "other.raw", "--run-dir", h.runDir]);
    assert.match(plain.stdout, /^2\nnbd\+unix:\/\/\/tap2\?socket=/, "minor, then URI");
  } finally {
    await h.close();
  }
});

function pick(result: Record<string, unknown>) {
  return { image: result.image, format: result.format, probed: result.probed };
}

Deno.test("probe safety: a registry from an older blktap (bare paths) becomes raw with the guard, or is refused", async () => {
  const h = await CtrlHarness.start();
  try {
    const plain = await rawImage(h.dir, "plain.raw", disk_bytes);
    const hostile = await rawImage(h.dir, "hostile.raw", disk_bytes);
    const canary = `${h.dir}/canary`;
    await Deno.writeFile(canary, new Uint8Array(64 * KiB).fill(7));
    await h.request({ op: "create", image: `aio:${plain}` });
    await h.request({ op: "create", image: `aio:${hostile}` });
    await h.killCtrl();
    // What the previous version recorded: the path alone. And since then,
    // the guest of the second disk wrote a qcow header.
    const registryPath = `${h.runDir}/${REGISTRY_NAME}`;
    const registry = JSON.parse(await Deno.readTextFile(registryPath));
    for (const m of registry.minors) {
      m.image = m.image.replace(/^aio:/, "");
      delete m.probedRaw;
    }
    await Deno.writeTextFile(registryPath, JSON.stringify(registry));
    const file = await Deno.open(hostile, { write: true });
    await file.write(hostileHeads(canary, disk_bytes)[0].head);
    file.close();
    const watch = OpenWatch.start(canary);
    try {
      await h.startCtrl();
      await waitRunning(h.runDir, { minors: [0] });
      const minors = await h.list();
      assert.equal(minors[0].image, `aio:${plain}`, "probed raw once more, recorded");
      assert.equal(minors[1].state, "failed");
      const stats = await h.request({ op: "stats", minor: 1 });
      assert.match(String(stats.failure), /probes as qcow.*create it again with its format named/);
      const saved = JSON.parse(await Deno.readTextFile(registryPath));
      assert.deepEqual(
        saved.minors.map((m: Record<string, unknown>) => [m.image, m.probedRaw]),
        [[`aio:${plain}`, true], [hostile, undefined]],
      );
      assert.deepEqual(watch.events(), [], "the header's backing file was never opened");
      // The upgraded disk is guarded from now on.
      const error = await nbdGuest(h.runDir).write(
        "tap0",
        0,
        hostileHeads(canary, disk_bytes)[0].head,
      );
      assert.ok(error, "the hostile write is refused");
    } finally {
      watch.close();
    }
  } finally {
    await h.close();
  }
});
