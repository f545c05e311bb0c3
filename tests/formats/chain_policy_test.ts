/**
 * The chain policy of served images: backing files and vmdk extents must
 * be regular files in the top image's folder (real paths, after symlinks)
 * unless a folder was allowed; the refusal names the image, the path and
 * `--allow-path`. The tools (no policy) follow any chain, as qemu-img does.
 */
import assert from "node:assert/strict";
import { BlockError } from "../../src/formats/driver.ts";
import { openImage } from "../../src/formats/open_image.ts";
import { qcowHead, vmdkHead } from "../_helpers/hostile_heads.ts";

const KiB = 1024;
const disk_bytes = 1 << 20;

interface Layout {
  root: string;
  images: string;
  host: string;
  /** Content of every base file. */
  base: Uint8Array;
}

async function layout(): Promise<Layout> {
  const root = await Deno.makeTempDir({ prefix: "blktap-policy-" });
  const images = `${root}/images`;
  const host = `${root}/host`;
  await Deno.mkdir(images);
  await Deno.mkdir(host);
  const base = new Uint8Array(disk_bytes).map((_, i) => (i >> 9) & 0xff);
  await Deno.writeFile(`${images}/base.raw`, base);
  await Deno.writeFile(`${host}/base.raw`, base);
  await Deno.symlink(`${host}/base.raw`, `${images}/link.raw`);
  // A device node in the image's own folder (root), else a link to one.
  const mknod = await new Deno.Command("mknod", { args: [`${images}/dev`, "c", "1", "5"] })
    .output().catch(() => undefined);
  if (!mknod?.success) await Deno.symlink("/dev/zero", `${images}/dev`);
  return { root, images, host, base };
}

async function overlay(l: Layout, name: string, backing: string): Promise<string> {
  const path = `${l.images}/${name}`;
  await Deno.writeFile(path, qcowHead(backing, disk_bytes));
  return path;
}

function refusal(...parts: RegExp[]) {
  return (error: unknown) => {
    assert.ok(error instanceof BlockError && error.code === "EPERM", String(error));
    for (const part of parts) assert.match(error.message, part);
    assert.match(error.message, /--allow-path DIR/);
    return true;
  };
}

async function readsBase(spec: string, l: Layout, policy?: { allowPaths: string[] }) {
  const driver = await openImage(spec, { readOnly: false }, policy);
  try {
    const head = new Uint8Array(64 * KiB);
    await driver.read(0, head);
    assert.deepEqual(head, l.base.subarray(0, 64 * KiB), `${spec} reads its backing file`);
  } finally {
    await driver.close();
  }
}

Deno.test("chain policy: served backing files stay in the image's folder unless allowed", async () => {
  const l = await layout();
  const served = { allowPaths: [] };
  try {
    await readsBase(`qcow:${await overlay(l, "inside.qcow", "base.raw")}`, l, served);
    const absolute = await overlay(l, "absolute.qcow", `${l.host}/base.raw`);
    await assert.rejects(
      openImage(`qcow:${absolute}`, {}, served),
      refusal(/absolute\.qcow: refusing backing file .*host\/base\.raw/, /lies outside .*images/),
    );
    const dotdot = await overlay(l, "dotdot.qcow", "../host/base.raw");
    await assert.rejects(openImage(`qcow:${dotdot}`, {}, served), refusal(/lies outside/));
    const link = await overlay(l, "link.qcow", "link.raw");
    await assert.rejects(
      openImage(`qcow:${link}`, {}, served),
      refusal(/link\.raw \(.*host\/base\.raw\)/, /lies outside/),
    );
    const device = await overlay(l, "device.qcow", "dev");
    await assert.rejects(openImage(`qcow:${device}`, {}, served), refusal(/device node/));
    // Allowed explicitly: the folder, then the devices' folder.
    await readsBase(`qcow:${absolute}`, l, { allowPaths: [l.host] });
    await readsBase(`qcow:${link}`, l, { allowPaths: [l.host] });
    // The tools follow every chain, as qemu-img does.
    await readsBase(`qcow:${absolute}`, l);
    await readsBase(`qcow:${dotdot}`, l);
  } finally {
    await Deno.remove(l.root, { recursive: true });
  }
});

Deno.test("chain policy: vmdk extents of served images stay in the image's folder unless allowed", async () => {
  const l = await layout();
  const served = { allowPaths: [] };
  const sectors = disk_bytes / 512;
  try {
    const inside = `${l.images}/inside.vmdk`;
    await Deno.writeFile(inside, vmdkHead("base.raw", sectors));
    await readsBase(`vmdk:${inside}`, l, served);
    const outside = `${l.images}/outside.vmdk`;
    await Deno.writeFile(outside, vmdkHead(`${l.host}/base.raw`, sectors));
    await assert.rejects(
      openImage(`vmdk:${outside}`, {}, served),
      refusal(/outside\.vmdk.*refusing file .*host\/base\.raw/, /lies outside/),
    );
    const device = `${l.images}/device.vmdk`;
    await Deno.writeFile(device, vmdkHead("dev", sectors));
    await assert.rejects(openImage(`vmdk:${device}`, {}, served), refusal(/device node/));
    await readsBase(`vmdk:${outside}`, l, { allowPaths: [l.host] });
    await readsBase(`vmdk:${outside}`, l);
  } finally {
    await Deno.remove(l.root, { recursive: true });
  }
});

// Access modes (O_RDONLY 0, O_WRONLY 1, O_RDWR 2) of this process's descriptors on `path`.
function accessModes(path: string): number[] {
  const modes: number[] = [];
  for (const entry of Deno.readDirSync("/proc/self/fd")) {
    let target: string;
    try {
      target = Deno.readLinkSync(`/proc/self/fd/${entry.name}`);
    } catch {
      continue; // closed meanwhile
    }
    if (target !== path) continue;
    const info = Deno.readTextFileSync(`/proc/self/fdinfo/${entry.name}`);
    modes.push(parseInt(/^flags:\s+([0-7]+)/m.exec(info)![1], 8) & 3);
  }
  return modes;
}

Deno.test("chain policy: the chain below a read-write top is opened read-only", async () => {
  const l = await layout();
  try {
    const middle = await overlay(l, "middle.qcow", "base.raw");
    const top = await overlay(l, "top.qcow", "middle.qcow");
    const driver = await openImage(`qcow:${top}`, {}, { allowPaths: [] });
    try {
      assert.deepEqual(accessModes(top), [2], "the top read-write");
      assert.deepEqual(accessModes(middle), [0], "its backing file read-only");
      assert.deepEqual(accessModes(`${l.images}/base.raw`), [0], "and the one below");
    } finally {
      await driver.close();
    }
  } finally {
    await Deno.remove(l.root, { recursive: true });
  }
});
