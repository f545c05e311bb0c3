/**
 * A QEMU process (qemu-io, qemu-nbd) holding an image open for writing, for
 * lock tests: started, then waited for until its QEMU write lock shows.
 * @module
 */
import { File } from "../../ffi/file.ts";
import { ofdCanLock } from "../../ffi/ofd_lock.ts";
import { lock_perm_base_bytes } from "../../src/formats/raw/image_lock.ts";

const WRITE_BIT = 1;
const lock_wait_ms_max = 5000;

/** Runs `command` (which opens `path` read-write) until `stop()`. */
export async function qemuHolding(command: string[], path: string) {
  const child = new Deno.Command(command[0], {
    args: command.slice(1),
    stdin: "piped",
    stdout: "null",
    stderr: "null",
  }).spawn();
  const stop = async () => {
    await child.stdin.close().catch(() => {});
    try {
      child.kill("SIGTERM");
    } catch {
      // exited
    }
    await child.status;
  };
  const probe = File.open(path);
  try {
    for (let waited = 0; ofdCanLock(probe, "write", lock_perm_base_bytes + WRITE_BIT, 1);) {
      if (waited > lock_wait_ms_max) throw new Error(`${command[0]} did not lock ${path}`);
      await new Promise((r) => setTimeout(r, 25));
      waited += 25;
    }
  } catch (error) {
    await stop();
    throw error;
  } finally {
    probe.close();
  }
  return { stop };
}
