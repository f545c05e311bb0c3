/**
 * `blktap create`: the image form for every format with a `create` hook
 * (QEMU reads each image at the size qemu-img would give it and checks it
 * where it can), sizes with suffixes and from the backing file, never
 * overwriting, usage errors that name the problem (exit 2), and the
 * dispatch between making an image and attaching one.
 */
import assert from "node:assert/strict";
import { formatEntry, formatNames, openImage } from "../../src/formats/open_image.ts";
import { isImageCreation } from "../../src/cli/create_command.ts";
import { checkImage } from "../../src/tools/check.ts";
import { blktap, hasTool, inTempDir, run, runOk } from "../_helpers/tools.ts";

const hasQemu = hasTool("qemu-img");
/** Every registered format that can create images (qcow2 joins when it has a hook). */
const CREATABLE = formatNames().filter((name) => formatEntry(name)?.create && name !== "sync");
/** QEMU's name for ours. */
const QEMU_NAME: Record<string, string> = { aio: "raw", vhd: "vpc" };
/** Formats `qemu-img check` checks (the others say "does not support checks"). */
const QEMU_CHECKS = new Set(["vmdk", "qcow2"]);

function inDir(fn: (dir: string) => Promise<void>): Promise<void> {
  return inTempDir(fn, "blktap-create-");
}

async function qemuVirtualSize(path: string, format: string): Promise<number> {
  const info = JSON.parse(await runOk("qemu-img", ["info", "-f", format, "--output=json", path]));
  return info["virtual-size"];
}

Deno.test("create: the form is told by the arguments", () => {
  assert.equal(isImageCreation(["-f", "qcow", "a", "1G"]), true);
  assert.equal(isImageCreation(["a.img", "1G"]), true);
  assert.equal(isImageCreation(["-fvhd", "a.vhd", "1G"]), true);
  assert.equal(isImageCreation(["-b", "base.vhd", "child.vhd"]), true);
  assert.equal(isImageCreation(["qcow:/img/a.qcow"]), false);
  assert.equal(isImageCreation(["qcow:/img/a.qcow", "--name", "vm", "--run-dir", "/tmp/x"]), false);
  assert.equal(isImageCreation(["--readonly", "aio:/dev/sdb", "--cache", "writeback"]), false);
  // Valued options of the attach form, known or added later, take their value along.
  assert.equal(isImageCreation(["qcow:/img/a.qcow", "--allow-path", "/img/base"]), false);
  assert.equal(isImageCreation(["qcow:/img/a.qcow", "--some-new-option", "7"]), false);
  assert.equal(isImageCreation(["/img/a.qcow", "/img/b.qcow"]), false, "no SIZE: not an image");
});

Deno.test({
  name: `create: every format (${
    CREATABLE.join(", ")
  }) makes an image QEMU reads at qemu-img's size`,
  ignore: !hasQemu,
  fn: () =>
    inDir(async (dir) => {
      for (const name of CREATABLE) {
        const qemuName = QEMU_NAME[name] ?? name;
        for (const size of ["1G", "10M", "7340544", "1.5M"]) {
          const ours = `${dir}/ours-${size}.${name}`;
          const theirs = `${dir}/theirs-${size}.${name}`;
          const made = await blktap(["create", "-f", name, ours, size]);
          assert.equal(made.code, 0, made.stderr);
          assert.match(made.stdout, new RegExp(`^Formatting '${ours}', fmt=`));
          await runOk("qemu-img", ["create", "-q", "-f", qemuName, theirs, size]);
          const want = await qemuVirtualSize(theirs, qemuName);
          assert.equal(await qemuVirtualSize(ours, qemuName), want, `${name} ${size}`);
          const driver = await openImage(`${name}:${ours}`, { readOnly: true, cache: "writeback" });
          assert.equal(driver.sizeBytes, want, `${name} ${size} through blktap`);
          await driver.close();
          if (QEMU_CHECKS.has(qemuName)) await runOk("qemu-img", ["check", "-f", qemuName, ours]);
          if (formatEntry(name)!.check) {
            assert.equal((await checkImage(`${name}:${ours}`)).status, 0);
          }
        }
      }
    }),
});

Deno.test("create: -o options per format, and the size from the backing file", async () => {
  await inDir(async (dir) => {
    const ok = async (...args: string[]) => {
      const result = await blktap(["create", "-q", ...args]);
      assert.equal(result.code, 0, `${args.join(" ")}: ${result.stderr}`);
      assert.equal(result.stdout, "");
    };
    await ok("-f", "vhd", "-o", "subformat=fixed", `${dir}/f.vhd`, "3M");
    assert.equal(
      (await Deno.stat(`${dir}/f.vhd`)).size,
      (await openImage(`${dir}/f.vhd`)).sizeBytes + 512,
    );
    await ok(
      "-f",
      "vhd",
      "-o",
      "block_size=512K",
      "-o",
      "force_size=on",
      `${dir}/b.vhd`,
      "5000000",
    );
    const b = await openImage(`${dir}/b.vhd`, { readOnly: true });
    assert.equal(b.sizeBytes, 4999680 + 512, "rounded to a sector, not to a geometry");
    await b.close();
    await ok("-f", "raw", "-o", "preallocation=falloc", `${dir}/p.raw`, "1M");
    assert.ok((await Deno.stat(`${dir}/p.raw`)).blocks! * 512 >= 1 << 20, "space reserved");
    await ok("-f", "qcow", "-o", "preallocation=full", `${dir}/r.qcow`, "4M");
    // -b without SIZE: the backing file's size; stored relative to the new image.
    await ok("-f", "qcow", "-b", "p.raw", `${dir}/over.qcow`);
    await ok("-f", "vhd", "-b", "b.vhd", `${dir}/child.vhd`);
    await ok("-f", "vhd", "-b", "p.raw", "-F", "raw", `${dir}/rawchild.vhd`);
    for (
      const [image, size] of [["over.qcow", 1 << 20], ["child.vhd", 4999680 + 512], [
        "rawchild.vhd",
        1 << 20,
      ]] as const
    ) {
      const d = await openImage(`${dir}/${image}`, { readOnly: true });
      assert.equal(d.sizeBytes, size, image);
      await d.close();
    }
  });
});

Deno.test("create: never overwrites; usage errors name the problem and exit 2", async () => {
  await inDir(async (dir) => {
    await Deno.writeTextFile(`${dir}/exists.vhd`, "keep me");
    const exists = await blktap(["create", "-f", "vhd", `${dir}/exists.vhd`, "1M"]);
    assert.equal(exists.code, 1);
    assert.match(exists.stderr, /already exists/);
    assert.equal(await Deno.readTextFile(`${dir}/exists.vhd`), "keep me");
    const cases: [string[], RegExp][] = [
      [["-f", "nosuch", `${dir}/a`, "1M"], /unknown format 'nosuch'/],
      [["-f", "vhd", "-o", "colour=red", `${dir}/a`, "1M"], /vhd: unknown option 'colour'/],
      [
        ["-f", "vhd", "-o", "block_size=3K", `${dir}/a`, "1M"],
        /block size 3072 is not a power of two/,
      ],
      [
        ["-f", "vhd", "-o", "subformat=sparse", `${dir}/a`, "1M"],
        /subformat: expected dynamic or fixed/,
      ],
      [["-f", "vhd", "-o", "nokey", `${dir}/a`, "1M"], /'nokey' is not key=value/],
      [["-f", "qcow", `${dir}/a`], /missing SIZE/],
      [["-f", "qcow", `${dir}/a`, "12Q"], /invalid size '12Q'/],
      [["-f", "raw", "-b", "exists.vhd", `${dir}/a`], /raw images cannot have a backing file/],
      [["-f", "qcow", "-F", "raw", `${dir}/a`, "1M"], /-F needs -b/],
      [["-f", "vhd", "-b", "missing.raw", `${dir}/a`], /backing file missing.raw not found/],
      [["-f", "ram", `${dir}/a`, "1M"], /cannot create ram images/],
    ];
    for (const [args, message] of cases) {
      const result = await blktap(["create", ...args]);
      assert.equal(result.code, 2, `${args.join(" ")}: ${result.stderr}`);
      assert.match(result.stderr.split("\n")[0], message, args.join(" "));
      assert.throws(() => Deno.statSync(`${dir}/a`), Deno.errors.NotFound, "nothing left behind");
    }
  });
});

Deno.test("create: --help explains both forms; one positional attaches through ctrl", async () => {
  const help = await blktap(["create", "--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /Make an image/);
  assert.match(help.stdout, /Attach an image to the ctrl daemon/);
  assert.match(help.stdout, /-o OPTIONS/);
  assert.match(help.stdout, /--max-iops/);
  await inDir(async (dir) => {
    // No ctrl runs in this run dir: the attach form says so (not a usage error).
    const attach = await run(Deno.execPath(), [
      "run",
      "-A",
      new URL("../../main.ts", import.meta.url).pathname,
      "create",
      "qcow:/nonexistent.qcow",
      "--run-dir",
      dir,
    ]);
    assert.equal(attach.code, 1, attach.stderr);
    assert.doesNotMatch(attach.stderr, /missing SIZE/);
  });
});
