/**
 * `blktap check`: exit 0 for clean images (leaks allowed), 1 for corrupt
 * ones, 2 when the image cannot be checked (including formats without a
 * check, such as raw); `--repair` fixes what it safely can; `--json`.
 */
import assert from "node:assert/strict";
import { createVmdk } from "../../src/formats/vmdk/create.ts";
import { openVmdk } from "../../src/formats/vmdk/vmdk.ts";
import { checkImage } from "../../src/tools/check.ts";
import { blktap } from "../_helpers/tools.ts";
import { haveQemu, qemuImg } from "../_helpers/qemu.ts";

async function patchU32(path: string, offsetBytes: number, value: number) {
  const file = await Deno.open(path, { write: true });
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, value, true);
  await file.seek(offsetBytes, Deno.SeekMode.Start);
  await file.write(bytes);
  file.close();
}

/** A vmdk with three allocated grains; returns its table locations. */
async function makeImage(path: string) {
  createVmdk(path, 8 << 20);
  const d = await openVmdk(path);
  for (const offset of [0, 65536, 5 << 20]) await d.write(offset, new Uint8Array(1000).fill(1));
  const extent = d.sparseExtents[0];
  const gt = extent.directory[0] * 512;
  const rgt = extent.redundantDirectory![0] * 512;
  await d.close();
  return { gt, rgt };
}

/** Two grains at one place, and a grain past the end of the file. */
async function makeCorrupt(dir: string): Promise<string> {
  const corrupt = `${dir}/corrupt.vmdk`;
  const tables = await makeImage(corrupt);
  const view = new DataView((await Deno.readFile(corrupt)).buffer);
  await patchU32(corrupt, tables.gt + 1 * 4, view.getUint32(tables.gt, true));
  await patchU32(corrupt, tables.gt + 9 * 4, 0x7fffff00);
  return corrupt;
}

Deno.test({
  name: "check: qemu-img check agrees that the corrupt vmdk is corrupt and the clean one clean",
  ignore: !haveQemu,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "blktap-check-" });
    try {
      const corrupt = await makeCorrupt(dir);
      assert.equal((await checkImage(corrupt)).status, 1);
      const qemu = await qemuImg("check", corrupt);
      assert.notEqual(qemu.code, 0, `qemu-img check: ${qemu.stdout}`);
      const clean = `${dir}/clean.vmdk`;
      await makeImage(clean);
      assert.equal((await checkImage(clean)).status, 0);
      const qemuClean = await qemuImg("check", clean);
      assert.equal(qemuClean.code, 0, `qemu-img check: ${qemuClean.stdout}${qemuClean.stderr}`);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("check: clean, leaked, corrupt, repaired and unusable vmdk images", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-check-" });
  try {
    const clean = `${dir}/clean.vmdk`;
    await makeImage(clean);
    assert.equal((await checkImage(clean)).status, 0);

    // An interrupted allocation: grain and redundant entry written, primary not.
    const leaked = `${dir}/leaked.vmdk`;
    const { rgt } = await makeImage(leaked);
    const end = (await Deno.stat(leaked)).size;
    await Deno.writeFile(leaked, new Uint8Array(65536).fill(5), { append: true });
    await patchU32(leaked, rgt + 7 * 4, end / 512);
    const leakResult = await checkImage(leaked);
    assert.equal(leakResult.status, 0);
    assert.equal(leakResult.report.leakedClusters, 1);
    const repairedLeak = await checkImage(leaked, true);
    assert.equal(repairedLeak.status, 0);
    assert.equal(repairedLeak.report.leakedClusters, 0);
    assert.equal((await Deno.stat(leaked)).size, end);

    // An interrupted table allocation: tables and redundant directory entry only.
    const tableLeak = `${dir}/tableleak.vmdk`;
    createVmdk(tableLeak, 8 << 20, { preallocateTables: false });
    const t = await openVmdk(tableLeak);
    const rgdSector = t.sparseExtents[0].layout.header.redundantDirectoryOffsetSectors;
    await t.close();
    const tableEnd = (await Deno.stat(tableLeak)).size;
    await Deno.writeFile(tableLeak, new Uint8Array(65536), { append: true });
    await patchU32(tableLeak, rgdSector * 512, tableEnd / 512 + 4);
    const tableLeakResult = await checkImage(tableLeak);
    assert.equal(tableLeakResult.status, 0, JSON.stringify(tableLeakResult));
    assert.equal(tableLeakResult.report.leakedClusters, 1);
    const tableRepaired = await checkImage(tableLeak, true);
    assert.equal(tableRepaired.report.leakedClusters, 0, JSON.stringify(tableRepaired));
    assert.equal((await Deno.stat(tableLeak)).size, tableEnd);

    const corrupt = await makeCorrupt(dir);
    const corruptResult = await checkImage(corrupt);
    assert.equal(corruptResult.status, 1);
    assert.ok(corruptResult.report.corruptions.some((c) => /both use offset/.test(c)));
    assert.ok(corruptResult.report.corruptions.some((c) => /past the end/.test(c)));
    const cli = await blktap(["check", "--json", corrupt]);
    assert.equal(cli.code, 1);
    assert.equal(JSON.parse(cli.stdout).status, 1);

    // Primary and redundant tables disagree: repair copies the primary.
    const diverged = `${dir}/diverged.vmdk`;
    const t2 = await makeImage(diverged);
    await patchU32(diverged, t2.rgt, 12345);
    assert.equal((await checkImage(diverged)).status, 1);
    const fixed = await checkImage(diverged, true);
    assert.equal(fixed.status, 0, JSON.stringify(fixed));
    assert.ok(fixed.repaired!.length > 0);

    // Unusable: garbage header, raw image (no check), missing file.
    const garbage = `${dir}/garbage.vmdk`;
    await Deno.writeFile(garbage, new TextEncoder().encode("KDMV but nothing else"));
    assert.equal((await checkImage(`vmdk:${garbage}`)).status, 2);
    const raw = `${dir}/disk.raw`;
    await Deno.writeFile(raw, new Uint8Array(65536));
    const rawResult = await blktap(["check", raw]);
    assert.equal(rawResult.code, 2);
    assert.match(rawResult.stdout, /no check for raw images/);
    assert.equal((await blktap(["check", `${dir}/missing.vmdk`])).code, 2);
    const ok = await blktap(["check", clean]);
    assert.equal(ok.code, 0);
    assert.match(ok.stdout, /No errors were found/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("check: a qcow that is its own backing file, two backing each other, a missing backing file: exit 2 naming the chain", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-check-" });
  try {
    const create = async (path: string, backing: string) => {
      const made = await blktap(["qcow-create", "4", path, backing]);
      assert.equal(made.code, 0, made.stderr);
    };
    // Its own backing file: made over a placeholder, then moved onto the placeholder's name.
    await Deno.writeFile(`${dir}/self.qcow`, new Uint8Array(4 << 20));
    await create(`${dir}/tmp.qcow`, "self.qcow");
    await Deno.rename(`${dir}/tmp.qcow`, `${dir}/self.qcow`);
    // a.qcow -> b.qcow -> a.qcow.
    await Deno.writeFile(`${dir}/b.qcow`, new Uint8Array(4 << 20));
    await create(`${dir}/a.qcow`, "b.qcow");
    await create(`${dir}/tmp.qcow`, "a.qcow");
    await Deno.rename(`${dir}/tmp.qcow`, `${dir}/b.qcow`);
    // A backing file that is gone.
    await Deno.writeFile(`${dir}/gone.raw`, new Uint8Array(4 << 20));
    await create(`${dir}/orphan.qcow`, "gone.raw");
    await Deno.remove(`${dir}/gone.raw`);

    const cases: [string, RegExp][] = [
      ["self.qcow", /backing file loop: .*self\.qcow -> .*self\.qcow/],
      ["a.qcow", /backing file loop: .*a\.qcow -> .*b\.qcow -> .*a\.qcow/],
      [
        "orphan.qcow",
        /backing file .*gone\.raw not found \(chain: .*orphan\.qcow -> .*gone\.raw\)/,
      ],
    ];
    for (const [name, message] of cases) {
      const path = `${dir}/${name}`;
      const result = await checkImage(path);
      assert.equal(result.status, 2, `${name}: ${JSON.stringify(result)}`);
      assert.match(result.report.unusable ?? "", message);
      const cli = await blktap(["check", path]);
      assert.equal(cli.code, 2, `${name}: ${cli.stdout}`);
      assert.doesNotMatch(cli.stdout, /No errors/);
      assert.match(cli.stderr, message, `${name}: stderr names the chain`);
      assert.equal(cli.stderr.trim().split("\n").length, 1, `${name}: one line on stderr`);
      const json = await blktap(["check", "--json", path]);
      assert.equal(json.code, 2);
      assert.equal(JSON.parse(json.stdout).status, 2);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("check: a corrupt image's verdict is on stderr as well as its ERROR lines on stdout", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-check-" });
  try {
    const corrupt = await makeCorrupt(dir);
    const cli = await blktap(["check", corrupt]);
    assert.equal(cli.code, 1);
    const errors = cli.stdout.split("\n").filter((l) => l.startsWith("ERROR: ")).length;
    assert.ok(errors > 0, cli.stdout);
    assert.equal(cli.stderr, `blktap check: ${corrupt}: corrupt (${errors} errors)\n`);
    const clean = `${dir}/clean.vmdk`;
    await makeImage(clean);
    const ok = await blktap(["check", clean]);
    assert.equal(ok.code, 0);
    assert.equal(ok.stderr, "", "nothing on stderr for a clean image");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
