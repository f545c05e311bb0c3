/**
 * Every bound the NBD server keeps, named with its unit (STYLE.md: put a
 * limit on everything that grows).
 * @module
 */
import { payloadFootprintBytes } from "./payload_pool.ts";

/**
 * Server limits; every field has a default in {@linkcode DEFAULT_LIMITS}.
 *
 * Memory a server may hold for its clients, whatever they send: payload
 * buffers within `payload_bytes_max` (server-wide); per connection a
 * receive buffer (256 KiB) and copied replies up to
 * `pending_reply_bytes_max` plus what its requests in flight add; a
 * connection whose replies stop moving for `reply_stall_timeout_ms` is
 * closed, giving its memory back.
 */
export interface NbdLimits {
  /** Largest READ/WRITE payload; advertised as the BLOCK_SIZE maximum. */
  request_bytes_max: number;
  /** Connections served at once; further ones are closed at accept. */
  connections_max: number;
  /** Requests being processed per connection; reading pauses beyond it. */
  inflight_requests_max: number;
  /**
   * Payload memory of the whole server: buffers held for requests and
   * replies, and free ones kept for reuse. Requests wait (their connection
   * stops reading) while it is used up. At least one `request_bytes_max`
   * payload (plus alignment).
   */
  payload_bytes_max: number;
  /** One connection's share of `payload_bytes_max`; a first buffer is always allowed. */
  connection_payload_bytes_max: number;
  /** A connection whose queued replies have not moved for this long is closed. */
  reply_stall_timeout_ms: number;
  /**
   * Copied reply bytes (headers, acks, small reads, block status) queued
   * for a slow reader before request reading pauses; large payloads sent
   * uncopied count in the payload budget instead.
   */
  pending_reply_bytes_max: number;
  /** Largest option payload during the handshake; a larger one ends the connection. */
  option_bytes_max: number;
  /** Options per handshake before the client is judged abusive and disconnected. */
  options_per_handshake_max: number;
  /** Time allowed from connect to transmission phase. */
  handshake_timeout_ms: number;
  /** Block status descriptors per reply (proto.md lets a server return fewer). */
  extents_per_reply_max: number;
  /** On close, how long in-flight requests get before connections are cut. */
  close_grace_ms: number;
}

export const DEFAULT_LIMITS: NbdLimits = {
  request_bytes_max: 32 << 20,
  connections_max: 256,
  inflight_requests_max: 128,
  payload_bytes_max: 256 << 20,
  connection_payload_bytes_max: 64 << 20,
  reply_stall_timeout_ms: 60_000,
  pending_reply_bytes_max: 4 << 20,
  option_bytes_max: 64 << 10,
  options_per_handshake_max: 1024,
  handshake_timeout_ms: 30_000,
  extents_per_reply_max: 16384,
  close_grace_ms: 5_000,
};

/** The smallest payload budget: one payload of `request_bytes_max` (with its alignment slack). */
export function payloadBytesMin(limits: Pick<NbdLimits, "request_bytes_max"> = DEFAULT_LIMITS) {
  return payloadFootprintBytes(limits.request_bytes_max);
}

/** NBD strings (names, queries) MUST be no longer than this (proto.md). */
export const string_bytes_max = 4096;
/** Preferred block size advertised in NBD_INFO_BLOCK_SIZE. */
export const preferred_block_bytes = 4096;
