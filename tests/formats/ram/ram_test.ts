/**
 * The shared RAM disk: independent processes see each other's writes, the
 * segment goes away after the last detach unless `persist`, a crashed
 * attacher neither loses the data nor keeps the disk alive forever, and
 * `load=` fills a new disk from an image.
 */
import assert from "node:assert/strict";
import { BlockError } from "../../../src/formats/driver.ts";
import { openImage } from "../../../src/formats/open_image.ts";
import { parseRamSpec } from "../../../src/formats/ram/ram.ts";
import { createVmdk } from "../../../src/formats/vmdk/create.ts";
import { imageInfo } from "../../../src/tools/info.ts";
import { sha256File } from "../../_helpers/tools.ts";

const PEER = new URL("./_ram_peer.ts", import.meta.url).pathname;

/** A peer process attached to `spec`, in RAM disk folder `dir`. */
class Peer {
  readonly child: Deno.ChildProcess;
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  #lines: string[] = [];
  #buffer = "";
  readonly #reading: Promise<void>;

  constructor(dir: string, spec: string) {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "--quiet", "--no-check", "-A", PEER, spec],
      env: { BLKTAP_RAM_DIR: dir },
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    this.child = child;
    this.#writer = child.stdin.getWriter();
    this.#reading = (async () => {
      for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
        this.#buffer += chunk;
        const parts = this.#buffer.split("\n");
        this.#buffer = parts.pop()!;
        this.#lines.push(...parts);
      }
    })();
  }

  async line(): Promise<string> {
    const deadline = Date.now() + 20_000;
    while (this.#lines.length === 0) {
      if (Date.now() > deadline) throw new Error("peer did not answer");
      await new Promise((r) => setTimeout(r, 2));
    }
    return this.#lines.shift()!;
  }

  async send(command: string): Promise<string> {
    await this.#writer.write(new TextEncoder().encode(`${command}\n`));
    return await this.line();
  }

  async kill(): Promise<void> {
    try {
      this.child.kill("SIGKILL");
    } catch {
      // already gone
    }
    await this.child.status;
    await this.#writer.close().catch(() => {});
    await this.#reading.catch(() => {});
  }
}

function ramFiles(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
}

async function withRamDir(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "blktap-ram-test-", dir: "/dev/shm" });
  const before = Deno.env.get("BLKTAP_RAM_DIR");
  Deno.env.set("BLKTAP_RAM_DIR", dir);
  try {
    await fn(dir);
  } finally {
    if (before === undefined) Deno.env.delete("BLKTAP_RAM_DIR");
    else Deno.env.set("BLKTAP_RAM_DIR", before);
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("ram: two processes see each other's writes; last close removes the disk", async () => {
  await withRamDir(async (dir) => {
    const a = new Peer(dir, "ram:shared,size=1M");
    const b = new Peer(dir, "ram:shared,size=1M");
    try {
      assert.equal(await a.line(), "ready");
      assert.equal(await b.line(), "ready");
      assert.equal(await a.send("write 4000 170 300"), "ok");
      assert.equal(await b.send("read 4096 4"), "aaaaaaaa");
      assert.equal(await b.send("write 65535 187 2"), "ok");
      assert.equal(await a.send("read 65534 4"), "00bbbb00");
      assert.equal(await a.send("close"), "ok");
      await a.child.status;
      assert.ok(ramFiles(dir).includes("blktap-ram-shared"), "b still attached");
      assert.equal(await b.send("read 4000 1"), "aa");
      assert.equal(await b.send("close"), "ok");
      await b.child.status;
      assert.deepEqual(ramFiles(dir), []);
    } finally {
      await a.kill();
      await b.kill();
    }
  });
});

Deno.test("ram: a crashed attacher keeps the data for the next one, then the disk goes", async () => {
  await withRamDir(async (dir) => {
    const a = new Peer(dir, "ram:crash,size=64K");
    try {
      assert.equal(await a.line(), "ready");
      assert.equal(await a.send("write 0 90 16"), "ok");
    } finally {
      await a.kill(); // SIGKILL: its flock dies with it
    }
    const again = await openImage("ram:crash");
    const bytes = new Uint8Array(16);
    await again.read(0, bytes);
    assert.deepEqual([...bytes], new Array(16).fill(90));
    await again.close();
    assert.deepEqual(ramFiles(dir), []);
  });
});

Deno.test("ram: persist keeps the disk after the last close", async () => {
  await withRamDir(async (dir) => {
    const first = await openImage("ram:keep,size=128K,persist");
    await first.write(1000, new Uint8Array([1, 2, 3]));
    await first.close();
    assert.ok(ramFiles(dir).includes("blktap-ram-keep"));
    const info = await imageInfo("ram:keep");
    assert.equal(info.virtualSizeBytes, 128 << 10);
    assert.deepEqual(info.details, {
      segment: `${dir}/blktap-ram-keep`,
      attached: false,
      persist: true,
    });
    const second = await openImage("ram:keep");
    assert.equal(second.sizeBytes, 128 << 10);
    const bytes = new Uint8Array(3);
    await second.read(1000, bytes);
    assert.deepEqual([...bytes], [1, 2, 3]);
    await second.close();
    assert.ok(ramFiles(dir).includes("blktap-ram-keep"));
  });
});

Deno.test("ram: load= fills a new disk from an image of any format", async () => {
  await withRamDir(async (dir) => {
    const vmdk = `${dir}/src.vmdk`;
    createVmdk(vmdk, 1 << 20);
    const image = await openImage(vmdk);
    await image.write(70_000, new Uint8Array(5000).fill(7));
    await image.close();
    const ram = await openImage(`ram:loaded,load=${vmdk}`);
    assert.equal(ram.sizeBytes, 1 << 20);
    const bytes = new Uint8Array(5002);
    await ram.read(69_999, bytes);
    assert.equal(bytes[0], 0);
    assert.equal(bytes[1], 7);
    assert.equal(bytes[5000], 7);
    assert.equal(bytes[5001], 0);
    await ram.close();
  });
});

Deno.test("ram: bad specs are refused with clear errors", async () => {
  await withRamDir(async () => {
    assert.throws(() => parseRamSpec("../etc,size=1M"), /invalid RAM disk name/);
    assert.throws(() => parseRamSpec("a,size=zero"), /invalid size/);
    assert.throws(() => parseRamSpec("a,colour=red"), /unknown option/);
    await assert.rejects(() => openImage("ram:nosize"), /give size=/);
    const d = await openImage("ram:sized,size=64K");
    await assert.rejects(() => openImage("ram:sized,size=128K"), (e: unknown) => {
      assert.ok(e instanceof BlockError);
      assert.match(e.message, /exists with size 65536/);
      return true;
    });
    await assert.rejects(() => d.read(60_000, new Uint8Array(10_000)), /outside the disk/);
    await d.close();
  });
});

Deno.test("ram: a symbolic link planted where any of a disk's files goes is refused; its target is untouched", async () => {
  await withRamDir(async (dir) => {
    const target = `${dir}/victim`;
    await Deno.writeFile(target, new Uint8Array(64 << 10).fill(0x5a), { mode: 0o600 });
    const before = await sha256File(target);
    for (const suffix of ["", ".lock", ".users", ".persist"]) {
      const name = `planted${suffix.replace(".", "-")}`;
      const path = `${dir}/blktap-ram-${name}${suffix}`;
      await Deno.symlink(target, path);
      await assert.rejects(
        () => openImage(`ram:${name},size=64K,persist`),
        new RegExp(`RAM disk file ${path} is a symbolic link: refusing`),
        `link at ${suffix || "the segment"}`,
      );
      assert.equal(await sha256File(target), before, `target written through ${suffix}`);
      assert.ok((await Deno.lstat(path)).isSymlink, "the link is left alone");
      await Deno.remove(path);
    }
    assert.equal((await Deno.stat(target)).size, 64 << 10);
  });
});

Deno.test("ram: a disk file with another owner or mode is refused, saying which", async () => {
  await withRamDir(async (dir) => {
    const disk = await openImage("ram:owned,size=64K,persist");
    await disk.close();
    const segment = `${dir}/blktap-ram-owned`;
    assert.equal((await Deno.stat(segment)).mode! & 0o777, 0o600, "created 0600");
    await Deno.chmod(segment, 0o640);
    await assert.rejects(
      () => openImage("ram:owned"),
      /RAM disk file .*blktap-ram-owned has mode 0640: group or others have access \(expected 0600\)/,
    );
    await Deno.chmod(segment, 0o600);
    await Deno.chown(`${dir}/blktap-ram-owned.lock`, 65534, 65534);
    await assert.rejects(
      () => openImage("ram:owned"),
      /RAM disk file .*blktap-ram-owned\.lock is owned by uid 65534, not by us/,
    );
  });
});
