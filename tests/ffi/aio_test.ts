import assert from "node:assert/strict";
import {
  AioQueue,
  type IoEngine,
  openQueue,
  waitOnThisThread,
  watchRingWhileWaiting,
} from "../../ffi/aio.ts";
import { SysError } from "../../ffi/errno.ts";
import { File } from "../../ffi/file.ts";
import { NativeMemory } from "../../ffi/memory.ts";

async function withFile(sizeBytes: number, fn: (path: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-aio-" });
  const path = `${dir}/data`;
  const bytes = new Uint8Array(sizeBytes);
  for (let i = 0; i < sizeBytes; i += 4096) bytes[i] = (i / 4096) & 0xff;
  await Deno.writeFile(path, bytes);
  try {
    await fn(path);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const ENGINES: IoEngine[] = ["libaio", "io_uring"];

// io_uring may be disabled (sysctl kernel.io_uring_disabled, seccomp): then its tests are ignored.
function engineAvailable(engine: IoEngine): boolean {
  try {
    new AioQueue(1, engine).close();
    return true;
  } catch {
    return false;
  }
}

// The engine is given, not set in the environment: `deno test --parallel`
// runs test files in one process, and a variable set here would reach the
// queues the other files open meanwhile.
Deno.test("openQueue: BLKTAP_IO_ENGINE picks the engine, anything else is refused", () => {
  const queue = openQueue(4, "io_uring", "libaio");
  assert.equal(queue.engine, "libaio");
  queue.close();
  assert.throws(() => openQueue(4, "libaio", "posix"), /BLKTAP_IO_ENGINE=posix/);
});

interface Fixture {
  path: string;
  file: File;
  queue: AioQueue;
  memory: NativeMemory;
}

// One test per engine (ignored where the kernel refuses it) over a fresh
// file whose page i starts with byte i, a queue of `slots` and `pages` of memory.
function engineTest(
  name: string,
  options: { slots: number; pages: number; direct: boolean },
  fn: (f: Fixture) => Promise<void>,
): void {
  for (const engine of ENGINES) {
    Deno.test({
      name: `${engine}: ${name}`,
      ignore: !engineAvailable(engine),
      fn: () =>
        withFile(1 << 20, async (path) => {
          const file = File.open(path, { direct: options.direct, write: !options.direct });
          const queue = new AioQueue(options.slots, engine);
          const memory = NativeMemory.allocate(options.pages * 4096);
          try {
            await fn({ path, file, queue, memory });
            assert.equal(queue.inflight, 0);
          } finally {
            queue.close();
            memory.release();
            file.close();
          }
        }),
    });
  }
}

engineTest(
  "many reads issued in one turn all complete with the right data",
  { slots: 32, pages: 256, direct: true },
  async ({ file, queue, memory }) => {
    // 256 requests through a 32-slot context: the queue must hold the rest back.
    const reads = Array.from(
      { length: 256 },
      (_, i) =>
        queue.readv(file.fd, i * 4096, [{ address: memory.address + i * 4096, lengthBytes: 4096 }]),
    );
    assert.deepEqual(await Promise.all(reads), new Array(256).fill(4096));
    for (let i = 0; i < 256; i += 1) assert.equal(memory.bytes[i * 4096], i & 0xff);
  },
);

engineTest(
  "a failed request rejects with the errno name and the path",
  { slots: 4, pages: 2, direct: true },
  async ({ path, file, queue, memory }) => {
    // O_DIRECT refuses a misaligned offset with EINVAL.
    const iov = [{ address: memory.address, lengthBytes: 4096 }];
    await assert.rejects(queue.readv(file.fd, 1, iov, path), (error: SysError) => {
      assert.equal(error.code, "EINVAL");
      assert.match(error.message, new RegExp(`preadv\\(${path}\\): EINVAL`));
      return true;
    });
    assert.equal(await queue.readv(file.fd, 4096, iov), 4096, "the queue works after an error");
  },
);

engineTest(
  "waiting on the JavaScript thread, continuations still run between rounds",
  { slots: 8, pages: 8, direct: true },
  async ({ file, queue, memory }) => {
    waitOnThisThread(200);
    try {
      // Each completion issues the next read from its continuation, as the disk server does.
      let done = 0;
      const chain = async (lane: number) => {
        for (let i = lane; i < 256; i += 8) {
          const iov = [{ address: memory.address + lane * 4096, lengthBytes: 4096 }];
          assert.equal(await queue.readv(file.fd, i * 4096, iov), 4096);
          assert.equal(memory.bytes[lane * 4096], i & 0xff);
          done += 1;
        }
      };
      await Promise.all(Array.from({ length: 8 }, (_, lane) => chain(lane)));
      assert.equal(done, 256);
    } finally {
      waitOnThisThread(0);
    }
  },
);

engineTest(
  "page-cache writes, fdsync and reads round-trip (more requests than slots, every other write offloaded)",
  { slots: 8, pages: 64, direct: false },
  async ({ file, queue, memory }) => {
    for (let i = 0; i < 64; i += 1) memory.bytes.fill(i + 1, i * 4096, (i + 1) * 4096);
    // Unaligned offsets and lengths are fine without O_DIRECT.
    const iov = (i: number) => [{ address: memory.address + i * 4096, lengthBytes: 4000 }];
    const wrote = await Promise.all(
      Array.from(
        { length: 64 },
        (_, i) => queue.writev(file.fd, i * 4000 + 7, iov(i), "", i % 2 === 1),
      ),
    );
    assert.deepEqual(wrote, new Array(64).fill(4000));
    assert.equal(await queue.fdsync(file.fd), 0);
    memory.bytes.fill(0);
    await Promise.all(
      Array.from(
        { length: 64 },
        (_, i) => queue.readv(file.fd, i * 4000 + 7, iov(i)),
      ),
    );
    for (let i = 0; i < 64; i += 1) {
      const piece = memory.bytes.subarray(i * 4096, i * 4096 + 4000);
      assert.ok(piece.every((b) => b === i + 1), `piece ${i}`);
    }
  },
);

Deno.test("file: holes, punch and zero range are visible through SEEK_DATA/SEEK_HOLE", async () => {
  const dir = await Deno.makeTempDir({ prefix: "blktap-file-" });
  try {
    const file = File.open(`${dir}/sparse`, { write: true, createNew: true });
    file.truncate(1 << 20);
    assert.equal(file.seekData(0), null, "an empty sparse file has no data");
    file.pwriteAll(new Uint8Array(8192).fill(9), 65536);
    assert.equal(file.seekData(0), 65536);
    assert.equal(file.seekHole(65536), 65536 + 8192);
    file.punchHole(65536, 4096);
    assert.equal(file.seekData(0), 65536 + 4096);
    const back = new Uint8Array(8192);
    file.preadFull(back, 65536);
    assert.ok(back.subarray(0, 4096).every((b) => b === 0));
    assert.ok(back.subarray(4096).every((b) => b === 9));
    assert.deepEqual(file.stat(), { sizeBytes: 1 << 20, kind: "file" });
    file.close();
    assert.throws(() => File.open(`${dir}/sparse`, { createNew: true, write: true }), /EEXIST/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

engineTest(
  "a thread wait watching an unchanged ring index ends on completions alone",
  { slots: 4, pages: 2, direct: true },
  async ({ file, queue, memory }) => {
    let moves = 0;
    const iov = [{ address: memory.address, lengthBytes: 4096 }];
    waitOnThisThread(1_000_000);
    assert.throws(
      () => watchRingWhileWaiting({ address: 0, seen: () => 0, moved() {}, spinUs: 1e6 }),
      /ring spin 1000000 µs outside 0\.\.100/,
    );
    try {
      // The watched word is the second page's first u32 (a ring's req_prod), 0 as seen.
      watchRingWhileWaiting({
        address: memory.address + 4096,
        seen: () => 0,
        moved: () => moves += 1,
        spinUs: 50,
      });
      for (let i = 0; i < 32; i += 1) assert.equal(await queue.readv(file.fd, i * 4096, iov), 4096);
      assert.equal(moves, 0);
    } finally {
      watchRingWhileWaiting(undefined);
      waitOnThisThread(0);
    }
  },
);

interface PendingRead {
  file: File;
  queue: AioQueue;
  memory: NativeMemory;
  /** The watched u32 (second page of `memory`). */
  word: Uint32Array;
}

// An io_uring queue whose reads of a FIFO wait in the kernel until data is
// written to it; everything is released after `fn`.
async function withPendingRead(fn: (p: PendingRead, fifo: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-aio-" });
  const fifo = `${dir}/fifo`;
  assert.equal((await new Deno.Command("mkfifo", { args: [fifo] }).output()).code, 0);
  // Read and write ends in one descriptor: a read waits for data, in the kernel.
  const file = File.open(fifo, { write: true });
  const queue = new AioQueue(4, "io_uring");
  const memory = NativeMemory.allocate(2 * 4096);
  const word = new Uint32Array(memory.bytes.buffer, memory.bytes.byteOffset + 4096, 1);
  try {
    await fn({ file, queue, memory, word }, fifo);
  } finally {
    watchRingWhileWaiting(undefined);
    waitOnThisThread(0);
    queue.close();
    memory.release();
    file.close();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test({
  name: "io_uring: a ring index moved while I/O is in flight is seen at once, without a kick, once",
  ignore: !engineAvailable("io_uring"),
  fn: () =>
    withPendingRead(async ({ file, queue, memory, word }, fifo) => {
      let seen = 0;
      const movedAt: number[] = [];
      waitOnThisThread(20_000);
      watchRingWhileWaiting({
        address: memory.address + 4096,
        seen: () => seen,
        moved: () => (movedAt.push(performance.now()), seen = word[0]),
        spinUs: 50,
      });
      const started = performance.now();
      const read = queue.readv(file.fd, 0, [{ address: memory.address, lengthBytes: 4096 }]);
      word[0] = 7; // published after the pump looked, before the queue waits
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.equal(movedAt.length, 1, "seen once, not again while unchanged");
      assert.ok(movedAt[0] - started < 20, `seen after ${movedAt[0] - started} ms`);
      await Deno.writeFile(fifo, new Uint8Array(4096).fill(1));
      assert.equal(await read, 4096);
      assert.equal(memory.bytes[0], 1);
      assert.equal(movedAt.length, 1);
    }),
});

// Writes 1 to the u32 at an address 30 ms after being told to, from its own
// thread (a front end publishing while this thread sleeps in the shim).
const delayed_writer = `self.onmessage = (e) => {
  setTimeout(() => {
    const bytes = Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(BigInt(e.data)), 4);
    Atomics.store(new Uint32Array(bytes), 0, 1);
  }, 30);
};
self.postMessage("ready");`;

Deno.test({
  name: "io_uring: a ring index moved while the waiting thread sleeps is seen within the sleep",
  ignore: !engineAvailable("io_uring"),
  fn: () =>
    withPendingRead(async ({ file, queue, memory, word }, fifo) => {
      const url = URL.createObjectURL(new Blob([delayed_writer], { type: "text/javascript" }));
      const writer = new Worker(url, { type: "module" });
      try {
        await new Promise((resolve) => writer.onmessage = resolve);
        let movedAt: number | undefined;
        // No spin, and a thread wait of a second: only a look during the sleep sees the move.
        waitOnThisThread(1_000_000);
        watchRingWhileWaiting({
          address: memory.address + 4096,
          seen: () => movedAt === undefined ? 0 : word[0],
          moved: () => movedAt ??= performance.now(),
          spinUs: 0,
        });
        const started = performance.now();
        writer.postMessage(memory.address + 4096);
        const read = queue.readv(file.fd, 0, [{ address: memory.address, lengthBytes: 4096 }]);
        await new Promise((resolve) => setTimeout(resolve, 50));
        assert.ok(movedAt !== undefined, "not seen");
        assert.ok(movedAt - started < 500, `seen after ${movedAt - started} ms`);
        await Deno.writeFile(fifo, new Uint8Array(4096).fill(1));
        assert.equal(await read, 4096);
      } finally {
        writer.terminate();
        URL.revokeObjectURL(url);
      }
    }),
});

engineTest(
  "fdsyncRange: a ranged fdatasync of written pages completes; a length of 0 is refused",
  { slots: 4, pages: 4, direct: false },
  async ({ path, file, queue, memory }) => {
    memory.bytes.fill(9, 0, 4 * 4096);
    const iov = [{ address: memory.address, lengthBytes: 4 * 4096 }];
    assert.equal(await queue.writev(file.fd, 1 << 19, iov), 4 * 4096);
    assert.equal(await queue.fdsyncRange(file.fd, 1 << 19, 4 * 4096, path), 0);
    await assert.rejects(queue.fdsyncRange(file.fd, 0, 0, path), (error: SysError) => {
      assert.equal(error.code, "EINVAL");
      assert.match(error.message, /fdsync/);
      return true;
    });
    memory.bytes.fill(0);
    assert.equal(await queue.readv(file.fd, 1 << 19, iov), 4 * 4096);
    assert.ok(memory.bytes.subarray(0, 4 * 4096).every((b) => b === 9));
  },
);
