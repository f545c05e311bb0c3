/**
 * What an export advertises is what its driver does: nbdinfo (the oracle)
 * reads the flags of each format's export, served in-process and through
 * ctrl's ring, and TRIM really deallocates where it is advertised.
 */
import assert from "node:assert/strict";
import type { BlockDriver } from "../../../src/formats/driver.ts";
import { openImage } from "../../../src/formats/open_image.ts";
import { createQcow } from "../../../src/formats/qcow/create.ts";
import { createVmdk } from "../../../src/formats/vmdk/create.ts";
import { withNbdServer } from "../../_helpers/nbd_harness.ts";
import { hasTool, run } from "../../_helpers/tools.ts";
import { CtrlHarness, qcowImage, rawImage } from "../../_helpers/ctrl_harness.ts";

const MiB = 1 << 20;
const missingPeers = ["nbdinfo", "qemu-io"].filter((t) => !hasTool(t));
if (missingPeers.length > 0) console.log(`ignored: missing ${missingPeers.join(", ")}`);

/** The nbdinfo --json fields a capability decides. */
interface Advertised {
  is_read_only: boolean;
  can_trim: boolean;
  can_zero: boolean;
  can_fast_zero: boolean;
  can_cache: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
}

const FIELDS: (keyof Advertised)[] = [
  "is_read_only",
  "can_trim",
  "can_zero",
  "can_fast_zero",
  "can_cache",
  "can_flush",
  "can_fua",
  "can_multi_conn",
];

async function nbdinfo(uri: string): Promise<Advertised> {
  const out = await run("nbdinfo", ["--json", uri]);
  assert.equal(out.code, 0, out.stderr);
  const info = JSON.parse(out.stdout).exports[0];
  return Object.fromEntries(FIELDS.map((f) => [f, info[f]])) as unknown as Advertised;
}

/** The flags a driver's capabilities call for, seen through a front end that can(not) zero fast. */
function expected(driver: BlockDriver, readOnly: boolean, fastZeroCarried: boolean): Advertised {
  const c = driver.capabilities;
  const writable = !readOnly && c.canWrite;
  return {
    is_read_only: !writable,
    can_trim: writable && c.canDiscard,
    can_zero: writable,
    can_fast_zero: writable && c.canZero && fastZeroCarried,
    can_cache: false,
    can_flush: c.canFlush,
    can_fua: writable && c.canFlush,
    can_multi_conn: c.canMultiConn,
  };
}

const yes = true;
const no = false;
/** Per format, in-process: trim, zero, fast zero, cache (read-write unless said). */
const IN_PROCESS: Record<string, [boolean, boolean, boolean, boolean]> = {
  aio: [yes, yes, yes, no],
  sync: [yes, yes, yes, no],
  ram: [yes, yes, yes, no],
  qcow: [no, yes, no, no],
  vmdk: [no, yes, no, no],
  "aio-ro": [no, no, no, no],
};

async function sparseFile(path: string, sizeBytes: number): Promise<string> {
  const file = await Deno.open(path, { write: true, create: true });
  await file.truncate(sizeBytes);
  file.close();
  return path;
}

Deno.test({
  name: "nbd export: nbdinfo sees exactly what each format's driver does, served in process",
  ignore: missingPeers.length > 0,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "blktap-export-" });
    const drivers: Record<string, BlockDriver> = {};
    try {
      await sparseFile(`${dir}/a.raw`, 8 * MiB);
      await sparseFile(`${dir}/s.raw`, 8 * MiB);
      await createQcow(`${dir}/q.qcow`, { sizeBytes: 8 * MiB });
      createVmdk(`${dir}/v.vmdk`, 8 * MiB);
      drivers.aio = await openImage(`aio:${dir}/a.raw`);
      drivers.sync = await openImage(`sync:${dir}/s.raw`);
      drivers.ram = await openImage(`ram:blktap-export-test-${crypto.randomUUID()},size=8M`);
      drivers.qcow = await openImage(`qcow:${dir}/q.qcow`);
      drivers.vmdk = await openImage(`vmdk:${dir}/v.vmdk`);
      drivers["aio-ro"] = await openImage(`aio:${dir}/a.raw`, { readOnly: true });
      const exports = Object.entries(drivers).map(([name, driver]) => ({
        name,
        driver,
        readOnly: name.endsWith("-ro"),
      }));
      await withNbdServer(exports, async (h) => {
        for (const e of exports) {
          const seen = await nbdinfo(h.uri(e.name));
          assert.deepEqual(seen, expected(e.driver, e.readOnly, true), e.name);
          const [trim, zero, fastZero, cache] = IN_PROCESS[e.name];
          assert.deepEqual(
            [seen.can_trim, seen.can_zero, seen.can_fast_zero, seen.can_cache],
            [trim, zero, fastZero, cache],
            e.name,
          );
        }
        // TRIM deallocates: the file gives its space back and reads zeros.
        await assertTrimFrees(h.uri("aio"), `${dir}/a.raw`);
        await assertTrimReadsZeros(h.uri("ram"));
      });
    } finally {
      for (const driver of Object.values(drivers)) await driver.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

function allocatedBytes(path: string): number {
  return (Deno.statSync(path).blocks ?? 0) * 512;
}

async function qemuIo(uri: string, command: string): Promise<void> {
  const out = await run("qemu-io", ["-f", "raw", "-c", command, uri]);
  assert.equal(out.code, 0, `${command}: ${out.stdout}${out.stderr}`);
  assert.doesNotMatch(out.stdout, /failed|error/i, `${command}: ${out.stdout}`);
}

/** Writes 4 MiB, trims it: `du` shrinks by it and it reads as zeros. */
async function assertTrimFrees(uri: string, path: string): Promise<void> {
  await qemuIo(uri, "write -P 0x5a 1M 4M");
  await qemuIo(uri, "flush");
  const written = allocatedBytes(path);
  assert.ok(written >= 4 * MiB, `allocated ${written}`);
  await qemuIo(uri, "discard 1M 4M");
  await qemuIo(uri, "read -P 0 1M 4M");
  const trimmed = allocatedBytes(path);
  assert.ok(written - trimmed >= 4 * MiB, `allocated ${written} -> ${trimmed}`);
}

async function assertTrimReadsZeros(uri: string): Promise<void> {
  await qemuIo(uri, "write -P 0xa5 0 2M");
  await qemuIo(uri, "discard 0 2M");
  await qemuIo(uri, "read -P 0 0 2M");
}

Deno.test({
  name: "nbd export: through ctrl each disk advertises its disk process's driver, minus fast zero",
  ignore: missingPeers.length > 0,
  async fn() {
    const h = await CtrlHarness.start();
    const ram = `ram:blktap-export-test-${crypto.randomUUID()},size=8M`;
    try {
      const raw = await rawImage(h.dir, "a.raw", 8 * MiB);
      // Its own file: an image is attached read-write once, or read-only any number of times.
      const rawRo = await rawImage(h.dir, "ro.raw", 8 * MiB);
      const qcow = await qcowImage(h.dir, "q.qcow", 8);
      const vmdk = `${h.dir}/v.vmdk`;
      createVmdk(vmdk, 8 * MiB);
      const disks: [string, string, boolean, boolean][] = [
        // name, image, read-only, trim advertised
        ["raw", `aio:${raw}`, false, true],
        ["ram", ram, false, true],
        ["qcow", `qcow:${qcow}`, false, false],
        ["vmdk", `vmdk:${vmdk}`, false, false],
        ["raw-ro", `aio:${rawRo}`, true, false],
      ];
      for (const [name, image, readOnly] of disks) {
        await h.request({ op: "create", image, name, readOnly });
      }
      for (const [name, , readOnly, trim] of disks) {
        const seen = await nbdinfo(h.nbdUri(name));
        assert.deepEqual(seen, {
          is_read_only: readOnly,
          can_trim: trim,
          can_zero: !readOnly,
          can_fast_zero: false, // a blkif ring has no write-zeroes: zeros travel as data
          can_cache: false,
          can_flush: true,
          can_fua: !readOnly,
          can_multi_conn: true,
        }, name);
      }
      // The whole path: NBD TRIM -> ring DISCARD -> disk process -> punch hole.
      await assertTrimFrees(h.nbdUri("raw"), raw);
      await assertTrimReadsZeros(h.nbdUri("ram"));
      // Its last detach removes the RAM disk from /dev/shm.
      await h.request({ op: "destroy", minor: "ram" });
    } finally {
      await h.close();
    }
  },
});

/** Loop devices can be attached here (root, /dev/loop-control). */
const haveLoop = (() => {
  try {
    return new Deno.Command("losetup", { args: ["-f"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
})();

Deno.test({
  name:
    "nbd export: a raw block device advertises no TRIM, and a WRITE_ZEROES that may trim zeroes it",
  ignore: missingPeers.length > 0 || !haveLoop,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "blktap-export-bdev-" });
    const backing = await sparseFile(`${dir}/backing.raw`, 8 * MiB);
    const attach = await run("losetup", ["-f", "--show", backing]);
    assert.equal(attach.code, 0, attach.stderr);
    const device = attach.stdout.trim();
    let driver: BlockDriver | undefined;
    try {
      driver = await openImage(`aio:${device}`);
      assert.equal(driver.capabilities.canDiscard, false);
      await withNbdServer([{ name: "dev", driver }], async (h) => {
        const seen = await nbdinfo(h.uri("dev"));
        assert.equal(seen.can_trim, false);
        assert.equal(seen.can_zero, true);
        await qemuIo(h.uri("dev"), "write -P 0x33 0 1M");
        // -u: the client allows a hole (no NO_HOLE flag); a block device has none to give.
        await qemuIo(h.uri("dev"), "write -z -u 0 1M");
        await qemuIo(h.uri("dev"), "read -P 0 0 1M");
      });
    } finally {
      await driver?.close();
      await run("losetup", ["-d", device]);
      await Deno.remove(dir, { recursive: true });
    }
  },
});
