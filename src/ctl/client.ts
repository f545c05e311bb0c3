/**
 * The client side of ctrl's API: one request, one response, over
 * `ctrl.sock` in the run dir.
 * @module
 */
import { CTRL_SOCKET_NAME } from "../cli/run_dir.ts";

/** Sends `request` to the ctrl of `runDir`; resolves to its result or throws its error. */
export async function ctlRequest(
  runDir: string,
  request: Record<string, unknown>,
): Promise<Record<string, unknown>> {
  const path = `${runDir}/${CTRL_SOCKET_NAME}`;
  let conn: Deno.UnixConn;
  try {
    conn = await Deno.connect({ transport: "unix", path });
  } catch (error) {
    throw new Error(`cannot reach blktap ctrl at ${path}: ${(error as Error).message}`);
  }
  try {
    const bytes = new TextEncoder().encode(JSON.stringify(request) + "\n");
    for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
    const line = await readLine(conn);
    const response = JSON.parse(line) as Record<string, unknown>;
    if (!response.ok) throw new Error(String(response.error));
    delete response.ok;
    return response;
  } finally {
    conn.close();
  }
}

async function readLine(conn: Deno.Conn): Promise<string> {
  const decoder = new TextDecoder();
  const buffer = new Uint8Array(65536);
  let text = "";
  for (;;) {
    const n = await conn.read(buffer);
    if (n === null) throw new Error("ctrl closed the connection without answering");
    text += decoder.decode(buffer.subarray(0, n), { stream: true });
    const newline = text.indexOf("\n");
    if (newline >= 0) return text.slice(0, newline);
  }
}
