/**
 * The NBD server judged by real clients: qemu-io, qemu-img (convert,
 * compare), nbdinfo (--list, --map), nbdcopy, serving images opened
 * in-process with `openImage` (raw through aio; qcow when registered).
 */
import assert from "node:assert/strict";
import { formatNames, openImage } from "../../../src/formats/open_image.ts";
import * as P from "../../../src/frontends/nbd/protocol.ts";
import { startNbdServer } from "../../../src/frontends/nbd/server.ts";
import { MemoryDriver } from "../../_helpers/memory_driver.ts";
import { RawNbdClient } from "../../_helpers/nbd_client.ts";
import { withNbdServer } from "../../_helpers/nbd_harness.ts";
import { missingTools, run, runOk } from "../../_helpers/tools.ts";

const MiB = 1 << 20;

/** Runs a peer that must exit 0; its whole result, to look at its output. */
async function runChecked(cmd: string, args: string[]) {
  const result = await run(cmd, args);
  assert.equal(result.code, 0, `${cmd} ${args.join(" ")}: ${result.stdout}${result.stderr}`);
  return result;
}

async function tempDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "blktap-nbd-interop-" });
}

/** A 64 MiB sparse raw file with data at 1-2 MiB, 8-11 MiB and 40 MiB. */
async function sparseImage(dir: string): Promise<string> {
  const path = `${dir}/sparse.raw`;
  await runOk("qemu-img", ["create", "-q", "-f", "raw", path, "64M"]);
  await runOk("qemu-io", [
    "-f",
    "raw",
    "-c",
    "write -P 0x11 1M 1M",
    "-c",
    "write -P 0x22 8M 3M",
    "-c",
    "write -P 0x33 40M 64k",
    path,
  ]);
  return path;
}

Deno.test({
  name: "nbd interop: qemu-io pattern writes and reads through nbd+unix, on the file afterwards",
  ignore: missingTools("qemu-io", "qemu-img").length > 0,
  async fn() {
    const dir = await tempDir();
    try {
      const path = `${dir}/disk.raw`;
      await runOk("qemu-img", ["create", "-q", "-f", "raw", path, "32M"]);
      const driver = await openImage(`aio:${path}`);
      await withNbdServer([{ name: "disk", driver }], async (h) => {
        const out = await runChecked("qemu-io", [
          "-f",
          "raw",
          ...[
            "-c",
            "write -P 0xa5 0 4k",
            "-c",
            "write -P 0x5a 1000 3000",
            "-c",
            "write -P 0x77 4M 9M",
          ],
          ...[
            "-c",
            "aio_write -P 0x99 20M 64k",
            "-c",
            "aio_write -P 0x98 21M 64k",
            "-c",
            "aio_flush",
          ],
          ...["-c", "write -z 30M 1M", "-c", "discard 31M 1M", "-c", "flush"],
          ...[
            "-c",
            "read -P 0xa5 0 1000",
            "-c",
            "read -P 0x5a 1000 3000",
            "-c",
            "read -P 0xa5 4000 96",
          ],
          ...[
            "-c",
            "read -P 0x77 4M 9M",
            "-c",
            "read -P 0x99 20M 64k",
            "-c",
            "read -P 0x98 21M 64k",
          ],
          ...["-c", "read -P 0 30M 1M", "-c", "read -P 0 13M 7M"],
          h.uri("disk"),
        ]);
        assert.doesNotMatch(out.stdout + out.stderr, /Pattern verification failed|error/i);
      });
      await driver.close();
      const check = await runChecked("qemu-io", [
        "-f",
        "raw",
        "-c",
        "read -P 0x77 4M 9M",
        "-c",
        "read -P 0x5a 1000 3000",
        path,
      ]);
      assert.doesNotMatch(check.stdout, /Pattern verification failed/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "nbd interop: qemu-img convert into and out of an export, compared with qemu-img compare",
  ignore: missingTools("qemu-io", "qemu-img").length > 0,
  async fn() {
    const dir = await tempDir();
    try {
      const source = `${dir}/source.qcow2`;
      await runOk("qemu-img", ["create", "-q", "-f", "qcow2", source, "64M"]);
      await runOk("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        "write -P 0x42 3M 5M",
        "-c",
        "write -P 0x43 50M 123k",
        source,
      ]);
      const target = `${dir}/target.raw`;
      await runOk("qemu-img", ["create", "-q", "-f", "raw", target, "64M"]);
      const driver = await openImage(`aio:${target}`);
      await withNbdServer([{ name: "t", driver }], async (h) => {
        await runOk("qemu-img", ["convert", "-n", "-f", "qcow2", source, "-O", "raw", h.uri("t")]);
        await runOk("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", source, h.uri("t")]);
        for (const format of ["qcow2", "raw"]) {
          const back = `${dir}/back.${format}`;
          await runOk("qemu-img", ["convert", "-f", "raw", h.uri("t"), "-O", format, back]);
          // Against the source file, not the export it came from.
          await runOk("qemu-img", ["compare", "-f", format, "-F", "qcow2", back, source]);
        }
      });
      await driver.close();
      await runOk("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", source, target]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "nbd interop: a qcow image behind the export, written by qemu-img convert, compared",
  ignore: missingTools("qemu-io", "qemu-img").length > 0 || !formatNames().includes("qcow"),
  async fn() {
    const dir = await tempDir();
    try {
      const image = `${dir}/disk.qcow`;
      await runOk("qemu-img", ["create", "-q", "-f", "qcow", image, "32M"]);
      await runOk("qemu-io", ["-f", "qcow", "-c", "write -P 0x61 1M 2M", image]);
      // The oracle for what the export serves before anything is written
      // through it: a raw file given the same writes by qemu-io.
      const reference = `${dir}/reference.raw`;
      await runOk("qemu-img", ["create", "-q", "-f", "raw", reference, "32M"]);
      await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x61 1M 2M", reference]);
      const source = `${dir}/source.raw`;
      await runOk("qemu-img", ["create", "-q", "-f", "raw", source, "32M"]);
      await runOk("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write -P 0x62 5M 3M",
        "-c",
        "write -P 0x63 20M 64k",
        source,
      ]);
      const driver = await openImage(`qcow:${image}`);
      await withNbdServer([{ name: "q", driver }], async (h) => {
        await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", reference, h.uri("q")]);
        await runOk("qemu-img", ["convert", "-n", "-f", "raw", source, "-O", "raw", h.uri("q")]);
        await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, h.uri("q")]);
        const copy = `${dir}/copy.qcow2`;
        await runOk("qemu-img", ["convert", "-f", "raw", h.uri("q"), "-O", "qcow2", copy]);
        await runOk("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", copy, source]);
      });
      await driver.close();
      await runOk("qemu-img", ["compare", "-f", "qcow", "-F", "raw", image, source]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "nbd interop: nbdinfo --list shows every export; --map shows the holes of a sparse image",
  ignore: missingTools("nbdinfo", "qemu-img", "qemu-io").length > 0,
  async fn() {
    const dir = await tempDir();
    try {
      const path = await sparseImage(dir);
      const driver = await openImage(`aio:${path}`, { readOnly: true });
      const second = await openImage(`aio:${path}`, { readOnly: true });
      const exports = [
        { name: "sparse", driver, description: "sparse test image" },
        { name: "again", driver: second, readOnly: true },
      ];
      await withNbdServer(exports, async (h) => {
        const list = await runOk("nbdinfo", ["--list", "--json", h.uri()]);
        const parsed = JSON.parse(list);
        const names = parsed.exports.map((e: { "export-name": string }) => e["export-name"]);
        assert.deepEqual(names.sort(), ["again", "sparse"]);
        const sparse = parsed.exports.find((e: { "export-name": string }) =>
          e["export-name"] === "sparse"
        );
        assert.equal(sparse.description, "sparse test image");
        assert.equal(sparse["export-size"], 64 * MiB);
        assert.equal(sparse.is_read_only, true);

        const map = await runOk("nbdinfo", ["--map", "--json", h.uri("sparse")]);
        const extents = JSON.parse(map).map((
          e: { offset: number; length: number; type: number },
        ) => [
          e.offset,
          e.length,
          e.type,
        ]);
        // The oracle: QEMU's own map of the file (it allocates the first block of a raw file).
        const qemuMap = JSON.parse(
          await runOk("qemu-img", ["map", "-f", "raw", "--output=json", path]),
        );
        const expected: number[][] = [];
        for (const e of qemuMap as { start: number; length: number; data: boolean }[]) {
          const type = e.data ? 0 : P.NBD_STATE_HOLE | P.NBD_STATE_ZERO;
          const last = expected.at(-1);
          if (last && last[2] === type) last[1] += e.length;
          else expected.push([e.start, e.length, type]);
        }
        assert.deepEqual(extents, expected);
        const holes = extents.filter((e: number[]) => e[2] === 3).reduce(
          (n: number, e: number[]) => n + e[1],
          0,
        );
        assert.ok(holes > 50 * MiB, `${holes} bytes of holes`);
        // The export's map agrees with QEMU's view of the file.
        await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", path, h.uri("sparse")]);
      });
      await driver.close();
      await second.close();
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "nbd interop: nbdcopy into the export (4 connections, multi-conn) and back out",
  ignore: missingTools("nbdcopy", "qemu-img", "qemu-io").length > 0,
  async fn() {
    const dir = await tempDir();
    try {
      const source = await sparseImage(dir);
      await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x44 20M 7M", source]);
      const target = `${dir}/target.raw`;
      await runOk("qemu-img", ["create", "-q", "-f", "raw", target, "64M"]);
      await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0xee 0 64M", target]); // must be overwritten
      const driver = await openImage(`aio:${target}`);
      await withNbdServer([{ name: "t", driver }], async (h) => {
        await runOk("nbdcopy", ["--connections=4", "--requests=16", source, h.uri("t")]);
        await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, h.uri("t")]);
        const out = `${dir}/out.raw`;
        await runOk("nbdcopy", ["--connections=2", h.uri("t"), out]);
        await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, out]);
      });
      await driver.close();
      await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("nbd interop: two connections to one export see each other's writes after FLUSH (multi-conn)", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/shared.raw`;
    await Deno.writeFile(path, new Uint8Array(4 * MiB));
    const driver = await openImage(`aio:${path}`);
    await withNbdServer([{ name: "s", driver }], async (h) => {
      const a = await RawNbdClient.connect(h.socket);
      const b = await RawNbdClient.connect(h.socket);
      try {
        await a.go("s", { structured: true });
        await b.go("s");
        assert.ok(a.flags & P.NBD_FLAG_CAN_MULTI_CONN);
        for (let round = 0; round < 20; round++) {
          const [writer, reader] = round % 2 === 0 ? [a, b] : [b, a];
          const data = new Uint8Array(8192).fill(round + 1);
          const offset = (round * 12345) % (4 * MiB - 8192);
          assert.equal(await writer.command(P.NBD_CMD_WRITE, 0, offset, data.length, data), 0);
          assert.equal(await writer.command(P.NBD_CMD_FLUSH, 0, 0, 0), 0);
          assert.deepEqual(await reader.read(offset, data.length), data);
        }
      } finally {
        a.close();
        b.close();
      }
    });
    await driver.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "nbd interop: blktap serve exports an image until SIGTERM",
  ignore: missingTools("nbdinfo", "qemu-io").length > 0,
  async fn() {
    const dir = await tempDir();
    const socket = `${dir}/serve.sock`;
    const path = `${dir}/img.raw`;
    await Deno.writeFile(path, new Uint8Array(3 * MiB));
    const main = new URL("../../../main.ts", import.meta.url).pathname;
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        main,
        "serve",
        path,
        "--socket",
        socket,
        "--name",
        "img",
        "--cache",
        "writeback",
      ],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    try {
      for (let i = 0; i < 200; i++) {
        if (await Deno.stat(socket).then(() => true, () => false)) break;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      const uri = `nbd+unix:///img?socket=${socket}`;
      assert.equal((await runOk("nbdinfo", ["--size", uri])).trim(), String(3 * MiB));
      await runOk("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write -P 0x3c 1M 1M",
        "-c",
        "read -P 0x3c 1M 1M",
        uri,
      ]);
      child.kill("SIGTERM");
      const status = await child.output();
      assert.equal(status.code, 0, new TextDecoder().decode(status.stderr));
      assert.match(new TextDecoder().decode(status.stdout), /blktap serve: aio:.*img\.raw/);
    } finally {
      try {
        child.kill("SIGKILL");
      } catch {
        // exited
      }
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "nbd interop: TCP listener on 127.0.0.1 with a port picked by the system",
  ignore: missingTools("nbdinfo", "qemu-io").length > 0,
  async fn() {
    const nbdExport = { name: "t", driver: new MemoryDriver(8 * MiB), readOnly: false };
    const server = await startNbdServer({
      tcp: { port: 0 },
      lookup: (name) => (name === "t" ? nbdExport : undefined),
      list: () => [nbdExport],
    });
    try {
      assert.equal(server.tcp?.hostname, "127.0.0.1");
      assert.ok(server.tcp!.port > 0);
      const uri = `nbd://127.0.0.1:${server.tcp!.port}/t`;
      assert.equal((await runOk("nbdinfo", ["--size", uri])).trim(), String(8 * MiB));
      const out = await runChecked("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write -P 0x21 0 1M",
        "-c",
        "read -P 0x21 0 1M",
        uri,
      ]);
      assert.doesNotMatch(out.stdout, /Pattern verification failed/);
    } finally {
      await server.close();
    }
  },
});
