/**
 * `blktap check` on VHD images (QEMU has no vhd check, so ours is the only
 * judge): it must find a BAT entry pointing past the end, into metadata or
 * at another block, a bad or mismatched footer, a Xen batmap that
 * disagrees with the bitmaps, and report leaked space; `--repair` must fix
 * only what is safe (a footer from the good one, leaked space at the end)
 * and keep every byte of data. Exit codes: 0 clean, 1 corrupt, 2 unusable.
 */
import assert from "node:assert/strict";
import { openImage } from "../../../src/formats/open_image.ts";
import { createVhd } from "../../../src/formats/vhd/create.ts";
import { checkVhd } from "../../../src/formats/vhd/check.ts";
import { vhdChecksum } from "../../../src/formats/vhd/footer.ts";
import { blktap } from "../../_helpers/tools.ts";
import { inTempDir } from "../qcow/_util.ts";
import { assertReads } from "./_vhd_util.ts";

const MiB = 1 << 20;
const BAT_AT = 1536;

/** A dynamic image with data in blocks 0 and 2; returns its path and content. */
async function sample(dir: string, name = "s.vhd"): Promise<{ path: string; model: Uint8Array }> {
  const path = `${dir}/${name}`;
  await createVhd(path, { sizeBytes: 8 * MiB, subformat: "dynamic", forceSize: true });
  const driver = await openImage(path);
  const model = new Uint8Array(driver.sizeBytes);
  model.fill(1, 100, 70_000);
  model.fill(2, 4 * MiB + 5, 4 * MiB + 9000);
  await driver.write(0, model.subarray(0, 70_000));
  await driver.write(4 * MiB, model.subarray(4 * MiB, 4 * MiB + 9000));
  await driver.close();
  return { path, model };
}

async function edit(
  path: string,
  change: (bytes: Uint8Array, view: DataView) => Uint8Array | void,
) {
  const bytes = await Deno.readFile(path);
  const changed = change(bytes, new DataView(bytes.buffer)) ?? bytes;
  await Deno.writeFile(path, changed);
}

async function exitCode(path: string, ...args: string[]): Promise<number> {
  return (await blktap(["check", ...args, path])).code;
}

Deno.test("vhd check: a clean image, a fixed image; exit 0", async () => {
  await inTempDir(async (dir) => {
    const { path } = await sample(dir);
    assert.deepEqual(await checkVhd(path, { repair: false }), {
      corruptions: [],
      leakedClusters: 0,
    });
    await createVhd(`${dir}/f.vhd`, { sizeBytes: 3 * MiB, subformat: "fixed" });
    assert.deepEqual(await checkVhd(`${dir}/f.vhd`, { repair: false }), {
      corruptions: [],
      leakedClusters: 0,
    });
    assert.equal(await exitCode(path), 0);
  });
});

Deno.test("vhd check: BAT entries past the end, into metadata, onto another block; exit 1", async () => {
  await inTempDir(async (dir) => {
    const cases: [string, (v: DataView, bytes: Uint8Array) => void, RegExp][] = [
      [
        "past the end",
        (v, b) => v.setUint32(BAT_AT + 4, b.byteLength / 512 + 10),
        /BAT entry 1 .* past the data area/,
      ],
      [
        "into the BAT",
        (v) => v.setUint32(BAT_AT + 4, BAT_AT / 512),
        /BAT entry 1 .*overlaps the BAT/,
      ],
      [
        "onto block 0",
        (v) => v.setUint32(BAT_AT + 4, v.getUint32(BAT_AT) + 1),
        /block 0 and block 1 overlap/,
      ],
      ["beyond the disk", (v, b) => {
        // A BAT longer than the disk (other writers size it for growth), entry 7 set.
        v.setUint32(512 + 28, 8);
        v.setUint32(512 + 36, vhdChecksum(b.subarray(512, 1536), 36));
        v.setUint32(BAT_AT + 7 * 4, v.getUint32(BAT_AT));
      }, /BAT entry 7 is set, but the disk has only 4 blocks/],
    ];
    for (const [what, change, message] of cases) {
      const { path } = await sample(dir, `${what.replaceAll(" ", "-")}.vhd`);
      await edit(path, (bytes, view) => change(view, bytes));
      const report = await checkVhd(path, { repair: false });
      assert.ok(report.corruptions.some((c) => message.test(c)), `${what}: ${report.corruptions}`);
      assert.equal(await exitCode(path), 1, what);
      // The driver refuses such an image rather than serve or write through it.
      await assert.rejects(openImage(path), message, what);
      // Repair changes no BAT entry.
      const before = await Deno.readFile(path);
      await checkVhd(path, { repair: true });
      assert.deepEqual(
        (await Deno.readFile(path)).subarray(BAT_AT, BAT_AT + 512),
        before.subarray(BAT_AT, BAT_AT + 512),
      );
    }
  });
});

Deno.test("vhd check: a bad footer copy is found and --repair rewrites it from the end footer", async () => {
  await inTempDir(async (dir) => {
    const { path, model } = await sample(dir);
    await edit(path, (bytes) => {
      bytes[40] ^= 0xff; // current_size in the copy: checksum no longer matches
    });
    const report = await checkVhd(path, { repair: false });
    assert.match(report.corruptions.join(), /footer copy at offset 0: checksum/);
    assert.equal(await exitCode(path), 1);
    const repaired = await blktap(["check", "--repair", path]);
    assert.equal(repaired.code, 0, repaired.stdout);
    assert.match(repaired.stdout, /footer copy at offset 0 rewritten/);
    const bytes = await Deno.readFile(path);
    assert.deepEqual(bytes.subarray(0, 512), bytes.subarray(bytes.byteLength - 512));
    const driver = await openImage(path);
    await assertReads(driver, model, "after repair");
    await driver.close();
  });
});

Deno.test("vhd check: a torn end footer; the image still opens by its copy; --repair moves a good one there", async () => {
  await inTempDir(async (dir) => {
    const { path, model } = await sample(dir);
    const length = (await Deno.stat(path)).size;
    await edit(path, (bytes) => bytes.fill(0xc7, length - 512));
    assert.match(
      (await checkVhd(path, { repair: false })).corruptions.join(),
      /footer at offset \d+: no 'conectix' cookie/,
    );
    const driver = await openImage(path, { readOnly: true });
    await assertReads(driver, model, "through the copy");
    await driver.close();
    const repaired = await checkVhd(path, { repair: true });
    assert.match(repaired.repaired!.join(), /footer rewritten/);
    assert.deepEqual(await checkVhd(path, { repair: false }), {
      corruptions: [],
      leakedClusters: 0,
    });
    const after = await openImage(path, { readOnly: true });
    await assertReads(after, model, "after repair");
    await after.close();
  });
});

Deno.test("vhd check: two valid footers that differ are reported and left alone", async () => {
  await inTempDir(async (dir) => {
    const { path } = await sample(dir);
    await edit(path, (bytes, view) => {
      view.setUint32(24, 12345); // timestamp of the copy, checksum recomputed
      view.setUint32(64, vhdChecksum(bytes.subarray(0, 512), 64));
    });
    const report = await checkVhd(path, { repair: true });
    assert.match(report.corruptions.join(), /differs from the footer at the end/);
    assert.deepEqual(report.repaired, []);
    assert.equal(await exitCode(path), 1);
  });
});

Deno.test("vhd check: space an interrupted allocation left is a leak (exit 0), and --repair cuts it", async () => {
  await inTempDir(async (dir) => {
    const { path, model } = await sample(dir);
    const length = (await Deno.stat(path)).size;
    // What a crash after the footer moved but before the BAT entry leaves.
    await edit(path, (bytes) => {
      const grown = new Uint8Array(length + 3 * MiB);
      grown.set(bytes);
      grown.set(bytes.subarray(length - 512), grown.byteLength - 512);
      grown.fill(0x77, length + 4096, length + 8192);
      return grown;
    });
    const report = await checkVhd(path, { repair: false });
    assert.deepEqual(report.corruptions, []);
    assert.ok(report.leakedClusters >= 1, `leaks: ${report.leakedClusters}`);
    assert.equal(await exitCode(path), 0);
    const repaired = await checkVhd(path, { repair: true });
    assert.match(repaired.repaired!.join(), /unreferenced space .* cut/);
    assert.equal((await Deno.stat(path)).size, length);
    assert.deepEqual(await checkVhd(path, { repair: false }), {
      corruptions: [],
      leakedClusters: 0,
    });
    const driver = await openImage(path, { readOnly: true });
    await assertReads(driver, model, "after cutting the leak");
    await driver.close();
  });
});

Deno.test("vhd check: a block a crash left unnamed is a leak; once zeroed, new blocks reuse it", async () => {
  await inTempDir(async (dir) => {
    const path = `${dir}/gap.vhd`;
    await createVhd(path, { sizeBytes: 8 * MiB, subformat: "dynamic", forceSize: true });
    let driver = await openImage(path);
    const model = new Uint8Array(driver.sizeBytes);
    for (const block of [0, 1, 2]) {
      model.fill(block + 1, block * 2 * MiB, block * 2 * MiB + 4096);
      await driver.write(block * 2 * MiB, model.subarray(block * 2 * MiB, block * 2 * MiB + 4096));
    }
    await driver.close();
    // Block 1's BAT entry never reached the disk: its bytes are referenced by nothing.
    await edit(path, (_, view) => view.setUint32(BAT_AT + 4, 0xffffffff));
    model.fill(0, 2 * MiB, 4 * MiB);
    const report = await checkVhd(path, { repair: false });
    assert.deepEqual(report.corruptions, []);
    assert.equal(report.leakedClusters, 1);
    const repaired = await checkVhd(path, { repair: true });
    assert.match(repaired.repaired!.join(), /unreferenced bytes at \d+\.\.\d+ zeroed/);
    assert.deepEqual(await checkVhd(path, { repair: false }), {
      corruptions: [],
      leakedClusters: 0,
    });
    const length = (await Deno.stat(path)).size;
    driver = await openImage(path);
    model.fill(9, 6 * MiB, 6 * MiB + 100);
    await driver.write(6 * MiB, model.subarray(6 * MiB, 6 * MiB + 100));
    await assertReads(driver, model, "after reusing the gap");
    await driver.close();
    assert.equal((await Deno.stat(path)).size, length, "the new block went into the gap");
    assert.deepEqual(await checkVhd(path, { repair: false }), {
      corruptions: [],
      leakedClusters: 0,
    });
  });
});

Deno.test("vhd check: a Xen batmap that calls a block full must match the BAT and the bitmap", async () => {
  await inTempDir(async (dir) => {
    const { path } = await sample(dir);
    // Xen's batmap sits right after the BAT; in our layout that is the gap before block 0.
    await edit(path, (bytes, view) => {
      const header = BAT_AT + 512;
      bytes.set(new TextEncoder().encode("tdbatmap"), header);
      view.setUint32(header + 8, 0);
      view.setUint32(header + 12, header + 512);
      view.setUint32(header + 16, 1);
      bytes[header + 512] = 0b1100_0000; // blocks 0 (full, fine) and 1 (not allocated)
    });
    const report = await checkVhd(path, { repair: false });
    assert.deepEqual(report.corruptions, [
      "Xen batmap marks block 1 full, but the BAT has no valid entry for it",
    ]);
    assert.equal(report.leakedClusters, 0, "the batmap is metadata, not a leak");
  });
});

Deno.test("vhd check: not a VHD, or cut short, is unusable (exit 2)", async () => {
  await inTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/junk.vhd`, new Uint8Array(4096).fill(9));
    const junk = await checkVhd(`${dir}/junk.vhd`, { repair: false });
    assert.match(junk.unusable!, /no valid footer/);
    assert.equal(await exitCode(`vhd:${dir}/junk.vhd`), 2);
    const { path } = await sample(dir);
    await edit(path, (bytes) => bytes.slice(0, 1000));
    assert.equal(await exitCode(`vhd:${path}`), 2);
  });
});
