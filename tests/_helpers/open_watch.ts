/**
 * Proof that nobody opened a file: an inotify watch (through libc, Deno's
 * `watchFs` does not report every open) queues an event in the kernel for
 * each open, read, write and close of the file by any process, from the
 * moment the watch starts. {@linkcode OpenWatch.events} drains the queue.
 * @module
 */

const IN_NONBLOCK = 0o4000;
const IN_CLOEXEC = 0o2000000;
const EVENTS: Record<number, string> = {
  0x1: "access",
  0x2: "modify",
  0x4: "attrib",
  0x8: "close-write",
  0x10: "close-nowrite",
  0x20: "open",
  0x4000: "queue-overflow",
};
const event_header_bytes = 16;

const libc = Deno.dlopen("libc.so.6", {
  inotify_init1: { parameters: ["i32"], result: "i32" },
  inotify_add_watch: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  close: { parameters: ["i32"], result: "i32" },
});

/** An inotify watch on one file. */
export class OpenWatch {
  readonly path: string;
  readonly #fd: number;

  private constructor(path: string, fd: number) {
    this.path = path;
    this.#fd = fd;
  }

  /** Starts watching `path` for opens, reads, writes and attribute changes. */
  static start(path: string): OpenWatch {
    const fd = libc.symbols.inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (fd < 0) throw new Error("inotify_init1 failed");
    const mask = Object.keys(EVENTS).map(Number).reduce((a, b) => a | b, 0);
    const name = new TextEncoder().encode(`${path}\0`);
    if (libc.symbols.inotify_add_watch(fd, name, mask) < 0) {
      libc.symbols.close(fd);
      throw new Error(`inotify_add_watch(${path}) failed`);
    }
    return new OpenWatch(path, fd);
  }

  /** The events queued since the start (or the last call), by name. */
  events(): string[] {
    const names: string[] = [];
    const buffer = new Uint8Array(64 * 1024);
    for (;;) {
      const n = Number(libc.symbols.read(this.#fd, buffer, BigInt(buffer.byteLength)));
      if (n <= 0) return names; // EAGAIN: the queue is empty
      const view = new DataView(buffer.buffer, 0, n);
      for (let at = 0; at < n;) {
        const mask = view.getUint32(at + 4, true);
        for (const [bit, name] of Object.entries(EVENTS)) {
          if (mask & Number(bit)) names.push(name);
        }
        at += event_header_bytes + view.getUint32(at + 12, true);
      }
    }
  }

  close(): void {
    libc.symbols.close(this.#fd);
  }
}
