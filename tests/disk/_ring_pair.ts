/**
 * A front end ({@linkcode RingDisk}) and a back end ({@linkcode DiskServer})
 * over one buffer in one process, kicks as function calls: the ring and
 * pool that ctrl and a disk process share, without the processes.
 * @module
 */
import * as B from "../../src/ring/blkif.ts";
import { RingDisk } from "../../src/ring/ring_disk.ts";
import type { BlockDriver } from "../../src/formats/driver.ts";
import { DiskServer, type QosSettings } from "../../src/disk/disk_server.ts";

/** Sizes of the shared buffer, and the back end's QoS. */
export interface RingPairOptions {
  ringPages?: number;
  poolPages?: number;
  qos?: QosSettings;
}

const noFence = () => {};

/**
 * A {@linkcode RingDisk} named `name` over `driver`; `serve()` starts a new
 * back end on the same ring (a restart after a crash calls it again). The
 * caller attaches the disk to the server it got.
 */
export function ringPair(
  name: string,
  driver: BlockDriver,
  sizeBytes: number,
  options: RingPairOptions = {},
) {
  const ringPages = options.ringPages ?? 4;
  const memory = new Uint8Array((ringPages + (options.poolPages ?? 4096)) * B.PAGE_BYTES);
  const ring = memory.subarray(0, ringPages * B.PAGE_BYTES);
  const pool = memory.subarray(ringPages * B.PAGE_BYTES);
  const disk = new RingDisk(name, { ring, pool }, { fence: noFence, readOnly: false, sizeBytes });
  const serve = () =>
    new DiskServer({
      ring,
      pool,
      fence: noFence,
      driver,
      readOnly: false,
      notify: () => disk.onKick(),
      qos: options.qos,
    });
  return { disk, ring, pool, serve };
}
