/**
 * Native memory that both JavaScript and the kernel can address: page-aligned
 * buffers for O_DIRECT I/O and shared mappings for rings.
 * @module
 */
import { check } from "./errno.ts";
import { shim } from "./shim.ts";

/** Bytes in a page on x86_64; O_DIRECT buffers are aligned to it. */
export const PAGE_BYTES = 4096;

/** Rounds `n` up to a multiple of `unit` (a power of two). */
export function alignUp(n: number, unit: number): number {
  return Math.ceil(n / unit) * unit;
}

/** Native address of the first byte of a typed array's view. */
export function addressOf(bytes: Uint8Array): number {
  if (bytes.byteLength === 0) return 0;
  return Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes)));
}

/** A native mapping seen from JavaScript as bytes. */
export class NativeMemory {
  /** The memory as bytes (valid until {@linkcode NativeMemory.release}). */
  readonly bytes: Uint8Array;
  /** Native address of `bytes[0]`. */
  readonly address: number;
  #released = false;

  private constructor(address: number, lengthBytes: number) {
    this.address = address;
    const pointer = Deno.UnsafePointer.create(BigInt(address));
    this.bytes = new Uint8Array(
      new Deno.UnsafePointerView(pointer!).getArrayBuffer(lengthBytes),
    );
  }

  /** Zero-filled page-aligned memory of at least `lengthBytes`. */
  static allocate(lengthBytes: number): NativeMemory {
    const length = alignUp(Math.max(lengthBytes, 1), PAGE_BYTES);
    const address = check(shim.shim_alloc_aligned(BigInt(length)), "mmap", "anonymous");
    return new NativeMemory(address, length);
  }

  /** Maps `lengthBytes` of `fd` from `offsetBytes` with MAP_SHARED. */
  static mapShared(fd: number, lengthBytes: number, offsetBytes = 0, path = ""): NativeMemory {
    const address = check(
      shim.shim_mmap_shared(fd, BigInt(lengthBytes), BigInt(offsetBytes)),
      "mmap",
      path,
    );
    return new NativeMemory(address, lengthBytes);
  }

  /** Unmaps the memory; `bytes` must not be used afterwards. */
  release(): void {
    if (this.#released) return;
    this.#released = true;
    check(shim.shim_munmap(BigInt(this.address), BigInt(this.bytes.byteLength)), "munmap");
  }
}

/** A full memory barrier, for rings shared with another process. */
export function memoryFence(): void {
  shim.shim_fence();
}
