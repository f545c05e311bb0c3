import assert from "node:assert/strict";
import {
  type ByteSource,
  ShortReadError,
  SocketReader,
} from "../../../src/frontends/nbd/socket_reader.ts";

/** A stream of known bytes that hands over as much as each read asks, at most `chunk`. */
class StreamSource implements ByteSource {
  readonly reads: number[] = [];
  #at = 0;
  constructor(readonly bytes: Uint8Array, readonly chunk: number) {}
  read(buffer: Uint8Array): Promise<number | null> {
    const n = Math.min(buffer.byteLength, this.chunk, this.bytes.byteLength - this.#at);
    if (n === 0) return Promise.resolve(null);
    buffer.set(this.bytes.subarray(this.#at, this.#at + n));
    this.#at += n;
    this.reads.push(n);
    return Promise.resolve(n);
  }
}

function pattern(length: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (i * 7 + 3) & 0xff);
}

Deno.test("socket reader: a fill reads as much as the buffer holds; an exact fill only what it needs", async () => {
  const stream = pattern(4096);
  const source = new StreamSource(stream, 1000);
  const reader = new SocketReader(source, 512);
  assert.equal(await reader.fill(28), true);
  assert.equal(reader.available, 512); // as much as fits: many small requests per read
  reader.start = reader.end; // consumed

  assert.equal(await reader.fill(28, true), true);
  assert.equal(reader.available, 28);
  assert.deepEqual(reader.buffer.subarray(reader.start, reader.end), stream.subarray(512, 540));
  reader.start = reader.end;

  // What follows the exact fill goes straight into its destination.
  const dest = new Uint8Array(1500);
  const readsBefore = source.reads.length;
  await reader.readInto(dest);
  assert.deepEqual(dest, stream.subarray(540, 2040));
  assert.deepEqual(source.reads.slice(readsBefore), [1000, 500]);
});

Deno.test("socket reader: an exact fill keeps bytes already buffered and tops them up", async () => {
  const stream = pattern(200);
  const source = new StreamSource(stream, 10);
  const reader = new SocketReader(source, 64);
  assert.equal(await reader.fill(10), true); // 10 bytes buffered
  reader.start = 4;
  assert.equal(await reader.fill(28, true), true);
  assert.equal(reader.available, 28);
  assert.deepEqual(reader.buffer.subarray(reader.start, reader.end), stream.subarray(4, 32));
});

Deno.test("socket reader: an exact fill reports a clean end and a cut message as before", async () => {
  const empty = new SocketReader(new StreamSource(new Uint8Array(0), 10), 64);
  assert.equal(await empty.fill(28, true), false);
  const cut = new SocketReader(new StreamSource(pattern(20), 10), 64);
  await assert.rejects(() => cut.fill(28, true), ShortReadError);
});
