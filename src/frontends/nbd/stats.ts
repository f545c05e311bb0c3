/**
 * Counters of an NBD server, for `blktap ctrl stats` and for tests that
 * must know what the server actually processed (the fuzz test counts the
 * requests that reached the server, not those the client sent).
 * @module
 */

/** Totals since the server started. */
export interface NbdServerStats {
  /** Connections accepted (not counting refused ones). */
  connections_total: number;
  /** Connections closed at accept because `connections_max` were open. */
  connections_refused_total: number;
  /** Handshakes that reached the transmission phase. */
  sessions_total: number;
  /** Connections cut for breaking the protocol (bad magic, bad flags, oversized option). */
  protocol_disconnects_total: number;
  /** Request headers parsed in the transmission phase. */
  requests_total: number;
  /** Requests answered with an error. */
  request_errors_total: number;
  /** Connections closed because their replies stopped moving (`reply_stall_timeout_ms`). */
  stalled_disconnects_total: number;
}

/** All counters at zero. */
export function newStats(): NbdServerStats {
  return {
    connections_total: 0,
    connections_refused_total: 0,
    sessions_total: 0,
    protocol_disconnects_total: 0,
    requests_total: 0,
    request_errors_total: 0,
    stalled_disconnects_total: 0,
  };
}
