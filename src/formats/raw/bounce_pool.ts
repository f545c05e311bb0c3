/**
 * Page-aligned scratch buffers for O_DIRECT requests whose caller memory,
 * offset or length is not aligned. Freed buffers are kept per power-of-two
 * size class, so the hot path does not mmap per request.
 * @module
 */
import { NativeMemory, PAGE_BYTES } from "../../../ffi/memory.ts";

const pooled_buffer_bytes_max = 8 << 20;
const pooled_buffers_per_class_max = 8;
/**
 * Small classes keep up to this many bytes instead: a tool has hundreds of
 * 64 KiB vmdk grains in flight, and every buffer past the pool was an
 * mmap and a munmap (with io_uring's workers in the process, each munmap
 * shoots down TLBs on every core: raw->vmdk spent 6.7 s in munmap).
 */
const pooled_class_bytes_max = 16 << 20;

const freeLists = new Map<number, NativeMemory[]>();

function sizeClass(lengthBytes: number): number {
  let size = PAGE_BYTES;
  while (size < lengthBytes) size *= 2;
  return size;
}

/** Borrows aligned memory of at least `lengthBytes`. */
export function takeBounce(lengthBytes: number): NativeMemory {
  if (lengthBytes > pooled_buffer_bytes_max) return NativeMemory.allocate(lengthBytes);
  const size = sizeClass(lengthBytes);
  return freeLists.get(size)?.pop() ?? NativeMemory.allocate(size);
}

/** Returns memory from {@linkcode takeBounce}. */
export function giveBounce(memory: NativeMemory): void {
  const size = memory.bytes.byteLength;
  const list = freeLists.get(size) ?? [];
  const keep = Math.max(pooled_buffers_per_class_max, pooled_class_bytes_max / size);
  if (size > pooled_buffer_bytes_max || list.length >= keep) {
    memory.release();
    return;
  }
  list.push(memory);
  freeLists.set(size, list);
}
