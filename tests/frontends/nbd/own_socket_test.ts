/**
 * The server's own descriptor of an accepted Unix connection
 * (src/frontends/nbd/own_socket.ts, ffi/socket.ts): it must be that
 * connection's socket and no other, found only when unambiguous; bytes
 * sent through it arrive in order with Deno's writes; a send waiting for
 * room ends when the descriptor is closed or the wait runs out.
 */
import assert from "node:assert/strict";
import { File } from "../../../ffi/file.ts";
import { SocketFd } from "../../../ffi/socket.ts";
import {
  adoptNewSocket,
  adoptTcpSocket,
  connectedSocketsOn,
} from "../../../src/frontends/nbd/own_socket.ts";

const encoder = new TextEncoder();

async function readExactly(conn: Deno.Conn, length: number): Promise<Uint8Array> {
  const bytes = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = await conn.read(bytes.subarray(done));
    if (n === null) throw new Error(`end of stream after ${done} of ${length} bytes`);
    done += n;
  }
  return bytes;
}

async function withListener(
  fn: (path: string, listener: Deno.UnixListener, file: File, data: Uint8Array) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "blktap-own-socket-" });
  const path = `${dir}/sock with space`;
  const listener = Deno.listen({ transport: "unix", path });
  const data = new Uint8Array(3 << 20);
  for (let i = 0; i < data.length; i += 65536) crypto.getRandomValues(data.subarray(i, i + 65536));
  await Deno.writeFile(`${dir}/data`, data);
  const file = File.open(`${dir}/data`);
  try {
    await fn(path, listener, file, data);
  } finally {
    file.close();
    listener.close();
    await Deno.remove(dir, { recursive: true });
  }
}

/** Accepts one connection the way the server does; returns it and its own descriptor. */
async function accept(path: string, listener: Deno.UnixListener) {
  const before = connectedSocketsOn(path);
  const client = await Deno.connect({ transport: "unix", path });
  const conn = await listener.accept();
  return { client, conn, socket: adoptNewSocket(before, connectedSocketsOn(path)) };
}

Deno.test("own socket: each accepted connection's descriptor is its own socket, in order with Deno's writes", async () => {
  await withListener(async (path, listener, file, data) => {
    const a = await accept(path, listener);
    const b = await accept(path, listener);
    try {
      assert.ok(a.socket && b.socket, "found while unambiguous");
      assert.notEqual(a.socket.fd, b.socket.fd);
      await a.conn.write(encoder.encode("before"));
      const sending = a.socket.sendFile(encoder.encode("head"), file, 4096, 2 << 20, 5_000);
      const received = await readExactly(a.client, 6 + 4 + (2 << 20));
      await sending;
      await a.conn.write(encoder.encode("after"));
      assert.deepEqual(received.subarray(0, 10), encoder.encode("beforehead"));
      assert.deepEqual(received.subarray(10), data.subarray(4096, 4096 + (2 << 20)));
      assert.deepEqual(await readExactly(a.client, 5), encoder.encode("after"));

      await b.socket.sendFile(encoder.encode("B"), file, 0, 10, 5_000);
      assert.deepEqual(await readExactly(b.client, 11), Uint8Array.of(66, ...data.subarray(0, 10)));
      assert.ok(a.socket.setSendBufferBytes(1 << 20) >= 1 << 20);
    } finally {
      for (const c of [a, b]) {
        c.socket?.close();
        c.conn.close();
        c.client.close();
      }
    }
  });
});

Deno.test("own socket: two new connections at once are ambiguous: none is taken", async () => {
  await withListener(async (path, listener) => {
    const before = connectedSocketsOn(path);
    const clients = [
      await Deno.connect({ transport: "unix", path }),
      await Deno.connect({ transport: "unix", path }),
    ];
    const conns = [await listener.accept(), await listener.accept()];
    try {
      const after = connectedSocketsOn(path);
      assert.equal(after.size, 2);
      assert.equal(adoptNewSocket(before, after), undefined);
      const [[inode, fd]] = after;
      assert.throws(
        () => SocketFd.adopt(fd, inode + 1n),
        /ESTALE/,
        "another socket's number is refused",
      );
      SocketFd.adopt(fd, inode).close();
    } finally {
      for (const c of [...conns, ...clients]) c.close();
    }
  });
});

Deno.test("own socket: a send waiting for room ends on close, or when the wait runs out", async () => {
  await withListener(async (path, listener, file) => {
    const a = await accept(path, listener);
    try {
      assert.ok(a.socket);
      a.socket.setSendBufferBytes(64 << 10);
      // The client reads nothing: 3 MiB do not fit in the buffers.
      await assert.rejects(a.socket.sendFile(new Uint8Array(0), file, 0, 3 << 20, 50), /ETIMEDOUT/);
      const waiting = a.socket.sendFile(new Uint8Array(0), file, 0, 3 << 20, 60_000);
      setTimeout(() => a.socket!.close(), 50);
      const started = performance.now();
      await assert.rejects(waiting, /EPIPE/);
      assert.ok(performance.now() - started < 10_000);
      assert.throws(() => a.socket!.setSendBufferBytes(1 << 20), /closed/);
    } finally {
      a.socket?.close();
      a.conn.close();
      a.client.close();
    }
  });
});

Deno.test("own socket: a TCP connection's descriptor is found by its addresses, each side its own", async () => {
  await withListener(async (_path, _listener, file, data) => {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const client = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
    const conn = await listener.accept();
    const server = adoptTcpSocket(conn);
    const back = adoptTcpSocket(client);
    try {
      assert.ok(server && back, "found");
      await conn.write(encoder.encode("s"));
      await server.sendFile(encoder.encode("S"), file, 100, 70_000, 5_000);
      const received = await readExactly(client, 2 + 70_000);
      assert.deepEqual(received.subarray(0, 2), encoder.encode("sS"));
      assert.deepEqual(received.subarray(2), data.subarray(100, 70_100));
      await back.sendFile(encoder.encode("C"), file, 0, 3, 5_000);
      assert.deepEqual(await readExactly(conn, 4), Uint8Array.of(67, ...data.subarray(0, 3)));
    } finally {
      server?.close();
      back?.close();
      conn.close();
      client.close();
      listener.close();
    }
  });
});
