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

/** Sizes of the shared buffer, and how the back end serves. */
export interface RingPairOptions {
  ringPages?: number;
  poolPages?: number;
  qos?: QosSettings;
  readOnly?: boolean;
  /** DiskServerOptions.passRequestsMax. */
  passRequestsMax?: number;
}

const noFence = () => {};

/**
 * A {@linkcode RingDisk} named `name` over `driver`; `serve()` starts a new
 * back end on the same ring (a restart after a crash calls it again, with
 * the new process's driver if it differs). The caller attaches the disk to
 * the server it got.
 */
export function ringPair(
  name: string,
  driver: BlockDriver,
  sizeBytes: number,
  options: RingPairOptions = {},
) {
  const ringPages = options.ringPages ?? 4;
  const readOnly = options.readOnly ?? false;
  const memory = new Uint8Array((ringPages + (options.poolPages ?? 4096)) * B.PAGE_BYTES);
  const ring = memory.subarray(0, ringPages * B.PAGE_BYTES);
  const pool = memory.subarray(ringPages * B.PAGE_BYTES);
  const disk = new RingDisk(name, { ring, pool }, { fence: noFence, readOnly, sizeBytes });
  const serve = (serving: BlockDriver = driver) =>
    new DiskServer({
      ring,
      pool,
      fence: noFence,
      driver: serving,
      readOnly,
      notify: () => disk.onKick(),
      qos: options.qos,
      passRequestsMax: options.passRequestsMax,
    });
  return { disk, ring, pool, serve };
}

/** Options of {@linkcode servedRing}. */
export interface ServedRingOptions extends RingPairOptions {
  /** false: the front end is told the disk has no block status, so every read crosses the ring. */
  extents?: boolean;
}

/**
 * A ring pair already served and attached. `restart()` is what ctrl does
 * when a disk process dies: the old back end stops for good, unanswered
 * requests are re-armed, and a new back end (over `serving`, default the
 * same driver) takes the ring.
 */
export function servedRing(driver: BlockDriver, options: ServedRingOptions = {}) {
  const sizeBytes = driver.sizeBytes;
  const { disk, ring, pool, serve } = ringPair("test", driver, sizeBytes, options);
  const start = (serving: BlockDriver) => {
    const server = serve(serving);
    const capabilities = options.extents === false
      ? { ...serving.capabilities, canExtents: false }
      : serving.capabilities;
    disk.attach(() => server.kick(), { sizeBytes, capabilities });
    return server;
  };
  let server = start(driver);
  const restart = (serving: BlockDriver = driver) => {
    server.stop();
    disk.detach();
    disk.rearm();
    server = start(serving);
  };
  return { disk, ring, pool, server: () => server, restart };
}
