/**
 * KernelMinor's decisions, against a recording stand-in for the control
 * device (the module itself is exercised in the VM: tests/kernel/vm_test.sh).
 */
import assert from "node:assert/strict";
import type {
  ControlDevice,
  KernelDeviceParams,
  KernelMinorStatus,
} from "../../../src/frontends/kernel/control_device.ts";
import { KernelMinor } from "../../../src/frontends/kernel/kernel_minor.ts";

class FakeControl {
  minors = new Map<number, { device?: KernelDeviceParams; outstanding: number }>();
  calls: string[] = [];

  alloc(): number {
    const minor = this.minors.size;
    this.minors.set(minor, { outstanding: 0 });
    this.calls.push(`alloc ${minor}`);
    return minor;
  }
  createDevice(minor: number, params: KernelDeviceParams): void {
    this.minors.get(minor)!.device = params;
    this.calls.push(`create ${minor}`);
  }
  removeDevice(minor: number): void {
    delete this.minors.get(minor)!.device;
    this.calls.push(`remove ${minor}`);
  }
  free(minor: number): void {
    this.minors.delete(minor);
    this.calls.push(`free ${minor}`);
  }
  fail(minor: number): void {
    this.calls.push(`fail ${minor}`);
  }
  status(minor: number): KernelMinorStatus | undefined {
    const m = this.minors.get(minor);
    if (!m) return undefined;
    return {
      minor,
      device: m.device !== undefined,
      capacitySectors: m.device?.capacitySectors ?? 0,
      outstanding: m.outstanding,
    } as KernelMinorStatus;
  }
}

function setup(readOnly = false) {
  const fake = new FakeControl();
  const minor = KernelMinor.allocate(fake as unknown as ControlDevice, readOnly);
  return { fake, minor };
}

Deno.test("kernel minor: the block device is created once, with the image's size in sectors", () => {
  const { fake, minor } = setup();
  minor.attach({ sizeBytes: 10 * 512 + 100, canWrite: true, canDiscard: true });
  minor.attach({ sizeBytes: 10 * 512 + 100, canWrite: true, canDiscard: true });
  assert.deepEqual(fake.calls, ["alloc 0", "create 0"]);
  assert.deepEqual(fake.minors.get(0)!.device, {
    capacitySectors: 10,
    logicalBlockBytes: 512,
    physicalBlockBytes: 4096,
    readOnly: false,
    flush: true,
    discard: true,
  });
  assert.equal(minor.devicePath, "/dev/tapdev0");
});

Deno.test("kernel minor: read-only when asked or when the image cannot be written; no discard then", () => {
  for (const [readOnly, canWrite] of [[true, true], [false, false]]) {
    const { fake, minor } = setup(readOnly);
    minor.attach({ sizeBytes: 4096, canWrite, canDiscard: true });
    assert.equal(fake.minors.get(0)!.device!.readOnly, true);
    assert.equal(fake.minors.get(0)!.device!.discard, false);
  }
});

Deno.test("kernel minor: a resume on an image of another size is refused", () => {
  const { minor } = setup();
  minor.attach({ sizeBytes: 8192, canWrite: true, canDiscard: false });
  assert.throws(
    () => minor.attach({ sizeBytes: 16384, canWrite: true, canDiscard: false }),
    /has 16 sectors; the image has 32/,
  );
});

Deno.test("kernel minor: found again by number, gone when the module lost it", () => {
  const { fake } = setup();
  const control = fake as unknown as ControlDevice;
  assert.equal(KernelMinor.find(control, 0, false)?.minor, 0);
  assert.equal(KernelMinor.find(control, 7, false), undefined);
});

Deno.test("kernel minor: destroy removes the device then frees; fail and outstanding go to the module", () => {
  const { fake, minor } = setup();
  minor.attach({ sizeBytes: 4096, canWrite: true, canDiscard: false });
  fake.minors.get(0)!.outstanding = 3;
  assert.equal(minor.outstanding, 3);
  minor.fail();
  minor.removeDevice();
  minor.free();
  minor.free(); // gone already: nothing to do
  assert.deepEqual(fake.calls, ["alloc 0", "create 0", "fail 0", "remove 0", "free 0"]);
});
