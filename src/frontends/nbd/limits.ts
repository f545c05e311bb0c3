/**
 * Every bound the NBD server keeps, named with its unit (STYLE.md: put a
 * limit on everything that grows).
 * @module
 */

/** Server limits; every field has a default in {@linkcode DEFAULT_LIMITS}. */
export interface NbdLimits {
  /** Largest READ/WRITE/CACHE payload; advertised as the BLOCK_SIZE maximum. */
  request_bytes_max: number;
  /** Connections served at once; further ones are closed at accept. */
  connections_max: number;
  /** Requests being processed per connection; reading pauses beyond it. */
  inflight_requests_max: number;
  /** Reply bytes queued for a slow reader before request reading pauses. */
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
  pending_reply_bytes_max: 64 << 20,
  option_bytes_max: 64 << 10,
  options_per_handshake_max: 1024,
  handshake_timeout_ms: 30_000,
  extents_per_reply_max: 16384,
  close_grace_ms: 5_000,
};

/** NBD strings (names, queries) MUST be no longer than this (proto.md). */
export const string_bytes_max = 4096;
/** Preferred block size advertised in NBD_INFO_BLOCK_SIZE. */
export const preferred_block_bytes = 4096;
