// Worker for ring_test.ts: publishes req_prod 0, 1, 2, ... through a
// SharedRing over the shared buffer it is sent, until told to stop. It says
// "started" first: under load a worker may take seconds to begin.
import { SharedRing } from "../../src/ring/ring.ts";

self.onmessage = (event: MessageEvent<{ buffer: SharedArrayBuffer }>) => {
  const bytes = new Uint8Array(event.data.buffer);
  const ring = new SharedRing(bytes.subarray(0, 4096), () => {});
  const stop = new Int32Array(event.data.buffer, 4096, 1);
  let index = 0;
  self.postMessage("started");
  while (Atomics.load(stop, 0) === 0) {
    index = (index + 1) >>> 0;
    ring.reqProd = index;
  }
  self.postMessage(index);
};
