/**
 * The event channel of a userspace ring device, over a Unix stream socket:
 * a kick is one byte (0x01, "ring has news"); control messages are JSON
 * objects, one per line. Kicks coalesce: a kick queued and not yet written
 * is not queued twice, as Xen event channels coalesce.
 * @module
 */
import { joinBytes } from "../formats/join_bytes.ts";

const KICK = 0x01;
const NEWLINE = 0x0a;
/** A control line longer than this is a protocol error. */
export const message_bytes_max = 1 << 20;

/** What the channel delivers. */
export interface KickHandlers {
  onKick(): void;
  onMessage(message: Record<string, unknown>): void;
  /** The peer closed or the connection failed. */
  onClose(error?: Error): void;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** One end of a kick/control connection. */
export class KickChannel {
  readonly #conn: Deno.Conn;
  readonly #handlers: KickHandlers;
  #outbox: Uint8Array[] = [];
  #kickQueued = false;
  #writing = false;
  /** Waiting for the outbox to be sent ({@linkcode KickChannel.closeAfterSending}). */
  #sent: (() => void)[] = [];
  #closed = false;
  #line: Uint8Array[] = [];
  #lineBytes = 0;

  constructor(conn: Deno.Conn, handlers: KickHandlers) {
    this.#conn = conn;
    this.#handlers = handlers;
    this.#readLoop();
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Notifies the peer that the ring has news. */
  kick(): void {
    if (this.#closed || this.#kickQueued) return;
    this.#kickQueued = true;
    this.#outbox.push(new Uint8Array([KICK]));
    this.#flush();
  }

  /** Sends one control message. */
  send(message: Record<string, unknown>): void {
    if (this.#closed) return;
    this.#outbox.push(encoder.encode(JSON.stringify(message) + "\n"));
    this.#flush();
  }

  /** Sends what is queued (a last message), then closes. */
  async closeAfterSending(): Promise<void> {
    if (this.#writing || this.#outbox.length > 0) {
      await new Promise<void>((resolve) => this.#sent.push(resolve));
    }
    this.close();
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#conn.close();
    } catch {
      // already closed
    }
  }

  async #flush(): Promise<void> {
    if (this.#writing) return;
    this.#writing = true;
    try {
      while (this.#outbox.length > 0 && !this.#closed) {
        const chunk = joinBytes(this.#outbox);
        this.#outbox = [];
        this.#kickQueued = false;
        await writeAll(this.#conn, chunk);
      }
    } catch (error) {
      this.#fail(error as Error);
    } finally {
      this.#writing = false;
      if (this.#outbox.length === 0 || this.#closed) {
        const waiters = this.#sent;
        this.#sent = [];
        for (const resolve of waiters) resolve();
      }
    }
  }

  async #readLoop(): Promise<void> {
    const buffer = new Uint8Array(65536);
    try {
      while (!this.#closed) {
        const n = await this.#conn.read(buffer);
        if (n === null) break;
        this.#parse(buffer.subarray(0, n));
      }
      this.#fail();
    } catch (error) {
      this.#fail(error as Error);
    }
  }

  #parse(bytes: Uint8Array): void {
    let start = 0;
    let kicked = false;
    for (let i = 0; i < bytes.length; i += 1) {
      const b = bytes[i];
      if (this.#lineBytes === 0 && start === i && b === KICK) {
        kicked = true;
        start = i + 1;
      } else if (b === NEWLINE) {
        this.#line.push(bytes.subarray(start, i));
        this.#deliverLine();
        start = i + 1;
      }
    }
    if (start < bytes.length) this.#appendPartial(bytes.subarray(start));
    if (kicked && !this.#closed) this.#handlers.onKick();
  }

  #appendPartial(bytes: Uint8Array): void {
    this.#line.push(bytes.slice());
    this.#lineBytes += bytes.length;
    if (this.#lineBytes > message_bytes_max) throw new Error("control message too long");
  }

  #deliverLine(): void {
    const text = decoder.decode(joinBytes(this.#line));
    this.#line = [];
    this.#lineBytes = 0;
    const message = JSON.parse(text);
    if (typeof message !== "object" || message === null) {
      throw new Error("control message is not an object");
    }
    this.#handlers.onMessage(message);
  }

  #fail(error?: Error): void {
    if (this.#closed) return;
    this.close();
    this.#handlers.onClose(error);
  }
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  let done = 0;
  while (done < bytes.length) done += await conn.write(bytes.subarray(done));
}
