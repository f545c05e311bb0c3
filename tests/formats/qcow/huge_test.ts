/**
 * qcow images as large as QEMU opens them: a 16 TiB image QEMU created
 * (64 MiB of L1 table) and the largest QEMU 7.2 opens (an L1 table of
 * 268435392 entries, 2 GiB: 512 TiB - 128 MiB). Both open, take writes at
 * high offsets and read them back while the process stays within a memory
 * bound set by the caches, not by the virtual size; QEMU reads what we
 * wrote and maps what we map. One L1 entry more is refused, as QEMU does.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { checkQcow } from "../../../src/formats/qcow/check.ts";
import { encodeHeader } from "../../../src/formats/qcow/header.ts";
import { run, runOk } from "../../_helpers/tools.ts";
import { hasQemu, inTempDir, mergeRanges } from "./_util.ts";

const TiB = 2 ** 40;
const MiB = 2 ** 20;
/** Peak resident memory allowed to the child (Deno itself takes about 100 MiB). */
const rss_bytes_max = 320 * MiB;
const pattern_bytes = 64 << 10;
/** The largest L1 table QEMU 7.2 reads (see header.ts, l1_entries_max). */
const qemu_l1_entries_max = 268_435_392;
const writer = new URL("./_huge_writer.ts", import.meta.url).pathname;

/** A qcow laid out as QEMU lays out a standalone image, the L1 table a sparse hole. */
async function sparseQemuLayout(path: string, l1Entries: number): Promise<number> {
  const sizeBytes = l1Entries * 2 * MiB;
  const head = new Uint8Array(48);
  encodeHeader({ sizeBytes, clusterBits: 12, l2Bits: 9, l1TableOffset: 48 }, head);
  await Deno.writeFile(path, head);
  await Deno.truncate(path, 48 + l1Entries * 8);
  return sizeBytes;
}

function highOffsets(sizeBytes: number): number[] {
  return [
    0,
    3 * TiB + 12345 * 512,
    Math.floor(sizeBytes / 2 / 4096) * 4096,
    sizeBytes - pattern_bytes,
  ];
}

async function writeInChild(image: string, offsets: number[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", "-A", writer, image, String(pattern_bytes), ...offsets.map(String)],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  assert.ok(out.success, text.decode(out.stderr));
  const result = JSON.parse(text.decode(out.stdout)) as { sizeBytes: number; peakRssBytes: number };
  console.log(
    `${image}: ${result.sizeBytes} bytes served, peak RSS ${result.peakRssBytes >> 20} MiB`,
  );
  assert.ok(result.peakRssBytes < rss_bytes_max, `peak RSS ${result.peakRssBytes} bytes`);
  return result;
}

/** QEMU reads each pattern where we wrote it, and zeros just past it. */
async function assertQemuReads(image: string, offsets: number[]) {
  const commands = offsets.flatMap((o, n) => [
    "-c",
    `read -P ${n + 1} ${o} ${pattern_bytes}`,
    ...(o + pattern_bytes + 4096 <= offsets[offsets.length - 1]
      ? ["-c", `read -P 0 ${o + pattern_bytes} 4096`]
      : []),
  ]);
  const result = await run("qemu-io", ["-f", "qcow", ...commands, image]);
  assert.equal(result.code, 0, result.stderr);
  assert.doesNotMatch(result.stdout, /Pattern verification failed/, result.stdout);
}

/** `qemu-img map` of a window around each offset shows data where we do. */
async function assertQemuMaps(image: string, offsets: number[]) {
  const driver = await openImage(image, { readOnly: true });
  try {
    for (const o of offsets) {
      const start = Math.max(0, o - 4 * MiB);
      const length = Math.min(8 * MiB, driver.sizeBytes - start);
      const out = await runOk("qemu-img", [
        "map",
        "--output=json",
        `--start-offset=${start}`,
        `--max-length=${length}`,
        image,
      ]);
      const theirs = mergeRanges(
        (JSON.parse(out) as { start: number; length: number; data: boolean }[])
          .filter((e) => e.data).map((e) => [e.start, e.start + e.length]),
      );
      const extents = await driver.blockStatus(start, length);
      const ours = mergeRanges(
        extents.filter((e) => !e.hole).map((e) => [e.offsetBytes, e.offsetBytes + e.lengthBytes]),
      );
      assert.deepEqual(ours, theirs, `map around ${o}`);
    }
  } finally {
    await driver.close();
  }
}

Deno.test({
  name:
    "qcow: a 16 TiB image QEMU created opens, takes writes at high offsets with bounded memory; QEMU reads and maps them",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const image = `${dir}/big.qcow`;
      await runOk("qemu-img", ["create", "-q", "-f", "qcow", image, "16T"]);
      const offsets = highOffsets(16 * TiB);
      const { sizeBytes } = await writeInChild(image, offsets);
      assert.equal(sizeBytes, 16 * TiB);
      await assertQemuReads(image, offsets);
      await assertQemuMaps(image, offsets);
      const report = await checkQcow(image, { repair: false });
      assert.deepEqual(report.corruptions, []);
      assert.equal(report.leakedClusters, 0);
    });
  },
});

Deno.test("qcow: the largest image QEMU opens (L1 of 268435392 entries) takes writes at high offsets with bounded memory; one entry more is refused", async () => {
  await inTempDir(async (dir) => {
    const image = `${dir}/max.qcow`;
    const size = await sparseQemuLayout(image, qemu_l1_entries_max);
    const offsets = highOffsets(size);
    const { sizeBytes } = await writeInChild(image, offsets);
    assert.equal(sizeBytes, size);
    const report = await checkQcow(image, { repair: false });
    assert.deepEqual(report.corruptions, []);
    await sparseQemuLayout(`${dir}/over.qcow`, qemu_l1_entries_max + 1);
    await assert.rejects(openImage(`${dir}/over.qcow`), /too large.*268435393 entries/);
  });
});

Deno.test({
  name: "qcow: the largest image QEMU opens: QEMU reads what we wrote at high offsets",
  ignore: !hasQemu,
  fn: async () => {
    await inTempDir(async (dir) => {
      const image = `${dir}/max.qcow`;
      const size = await sparseQemuLayout(image, qemu_l1_entries_max);
      const offsets = highOffsets(size);
      await writeInChild(image, offsets);
      await assertQemuReads(image, offsets);
      await sparseQemuLayout(`${dir}/over.qcow`, qemu_l1_entries_max + 1);
      assert.notEqual((await run("qemu-img", ["info", `${dir}/over.qcow`])).code, 0);
    });
  },
});
