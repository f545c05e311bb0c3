// libaio_shim: the thin C layer that Deno FFI calls for kernel I/O.
//
// Every function returns >= 0 on success or -errno on failure, so the
// TypeScript side never reads a thread-local errno after a hop between
// threads. Structures passed from TypeScript are packed little-endian
// records whose layout is documented next to each function and mirrored in
// ffi/shim.ts.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libaio.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define SHIM_ABI_VERSION 3

int32_t shim_abi_version(void) { return SHIM_ABI_VERSION; }

static int64_t neg_errno(void) { return -(int64_t)errno; }

// ---- files ---------------------------------------------------------------

int64_t shim_open(const char *path, int32_t flags, int32_t mode) {
  int fd = open(path, flags | O_CLOEXEC, mode);
  return fd < 0 ? neg_errno() : fd;
}

int64_t shim_close(int32_t fd) { return close(fd) < 0 ? neg_errno() : 0; }

int64_t shim_pread(int32_t fd, uint64_t addr, uint64_t len, int64_t off) {
  ssize_t n = pread(fd, (void *)addr, len, off);
  return n < 0 ? neg_errno() : n;
}

int64_t shim_pwrite(int32_t fd, uint64_t addr, uint64_t len, int64_t off) {
  ssize_t n = pwrite(fd, (const void *)addr, len, off);
  return n < 0 ? neg_errno() : n;
}

int64_t shim_fdatasync(int32_t fd) { return fdatasync(fd) < 0 ? neg_errno() : 0; }

int64_t shim_fsync(int32_t fd) { return fsync(fd) < 0 ? neg_errno() : 0; }

int64_t shim_ftruncate(int32_t fd, int64_t len) {
  return ftruncate(fd, len) < 0 ? neg_errno() : 0;
}

int64_t shim_fallocate(int32_t fd, int32_t mode, int64_t off, int64_t len) {
  return fallocate(fd, mode, off, len) < 0 ? neg_errno() : 0;
}

int64_t shim_lseek(int32_t fd, int64_t off, int32_t whence) {
  off_t r = lseek(fd, off, whence);
  return r < 0 ? neg_errno() : r;
}

// Size in bytes of a regular file or a block device; kind_out receives
// 1 = regular file, 2 = block device, 3 = directory, 0 = other.
int64_t shim_fsize(int32_t fd, int32_t *kind_out) {
  struct stat st;
  if (fstat(fd, &st) < 0) return neg_errno();
  if (S_ISBLK(st.st_mode)) {
    uint64_t bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) < 0) return neg_errno();
    *kind_out = 2;
    return (int64_t)bytes;
  }
  *kind_out = S_ISREG(st.st_mode) ? 1 : S_ISDIR(st.st_mode) ? 3 : 0;
  return st.st_size;
}

// Allocated bytes on disk (st_blocks * 512): what `du` reports.
int64_t shim_fallocated(int32_t fd) {
  struct stat st;
  if (fstat(fd, &st) < 0) return neg_errno();
  return (int64_t)st.st_blocks * 512;
}

int64_t shim_ioctl(int32_t fd, uint64_t request, uint64_t arg) {
  int r = ioctl(fd, (unsigned long)request, (void *)arg);
  return r < 0 ? neg_errno() : r;
}

// Open file description locks (QEMU's image locking, see ffi/ofd_lock.ts).
// op 0 = F_OFD_SETLK (type F_RDLCK 0, F_WRLCK 1, F_UNLCK 2): returns 0;
// op 1 = F_OFD_GETLK: returns the type of a conflicting lock, F_UNLCK (2)
// when the range could be locked.
int64_t shim_ofd_lock(int32_t fd, int32_t op, int32_t type, int64_t start, int64_t len) {
  struct flock fl = {.l_type = (short)type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
  if (fcntl(fd, op == 1 ? F_OFD_GETLK : F_OFD_SETLK, &fl) < 0) return neg_errno();
  return op == 1 ? fl.l_type : 0;
}

// ---- memory --------------------------------------------------------------

// Page-aligned, zero-filled anonymous memory; O_DIRECT needs the alignment.
int64_t shim_alloc_aligned(uint64_t len) {
  void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? neg_errno() : (int64_t)(uintptr_t)p;
}

int64_t shim_mmap_shared(int32_t fd, uint64_t len, int64_t off) {
  void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off);
  return p == MAP_FAILED ? neg_errno() : (int64_t)(uintptr_t)p;
}

int64_t shim_munmap(uint64_t addr, uint64_t len) {
  return munmap((void *)addr, len) < 0 ? neg_errno() : 0;
}

int64_t shim_memcpy(uint64_t dst, uint64_t src, uint64_t len) {
  memcpy((void *)dst, (const void *)src, len);
  return 0;
}

// A full barrier for rings shared with other processes, where JavaScript
// memory may not be a SharedArrayBuffer and Atomics cannot be used.
void shim_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- libaio --------------------------------------------------------------

// One completion as seen by TypeScript: 16 bytes {u64 tag, i64 result}.
struct shim_event {
  uint64_t tag;
  int64_t result;
};

struct shim_aio {
  io_context_t ctx;
  uint32_t max_events;
  struct io_event *raw;
  struct shim_event *events;
};

// Returns an opaque handle (address) to a context that can hold
// max_inflight requests at once.
int64_t shim_aio_create(uint32_t max_inflight) {
  struct shim_aio *a = calloc(1, sizeof *a);
  if (!a) return -ENOMEM;
  a->raw = calloc(max_inflight, sizeof *a->raw);
  a->events = calloc(max_inflight, sizeof *a->events);
  if (!a->raw || !a->events) {
    free(a->raw), free(a->events), free(a);
    return -ENOMEM;
  }
  int r = io_setup(max_inflight, &a->ctx);
  if (r < 0) {
    free(a->raw), free(a->events), free(a);
    return r;
  }
  a->max_events = max_inflight;
  return (int64_t)(uintptr_t)a;
}

int64_t shim_aio_destroy(uint64_t handle) {
  struct shim_aio *a = (struct shim_aio *)handle;
  int r = io_destroy(a->ctx);
  free(a->raw), free(a->events), free(a);
  return r;
}

// Address of the array of completions that shim_aio_wait fills.
int64_t shim_aio_events(uint64_t handle) {
  return (int64_t)(uintptr_t)((struct shim_aio *)handle)->events;
}

// A request record is 40 bytes, little-endian:
//   u32 opcode (0 preadv, 1 pwritev, 2 fdatasync), i32 fd,
//   u64 offset_bytes, u64 iovec_addr, u32 iovec_count, u32 pad, u64 tag.
// iovec_addr points at iovec_count {u64 base, u64 len} pairs; the kernel
// copies iocbs and iovecs during io_submit, so they may be reused after.
struct shim_request {
  uint32_t opcode;
  int32_t fd;
  uint64_t offset;
  uint64_t iov;
  uint32_t iovcnt;
  uint32_t pad;
  uint64_t tag;
};

#define SHIM_SUBMIT_MAX 256

// Submits n requests in one io_submit; returns how many the kernel took.
int64_t shim_aio_submit(uint64_t handle, const struct shim_request *reqs, uint32_t n) {
  struct shim_aio *a = (struct shim_aio *)handle;
  struct iocb cbs[SHIM_SUBMIT_MAX];
  struct iocb *ptrs[SHIM_SUBMIT_MAX];
  if (n > SHIM_SUBMIT_MAX) n = SHIM_SUBMIT_MAX;
  for (uint32_t i = 0; i < n; i++) {
    const struct shim_request *r = &reqs[i];
    struct iocb *cb = &cbs[i];
    switch (r->opcode) {
    case 0: io_prep_preadv(cb, r->fd, (const struct iovec *)r->iov, (int)r->iovcnt, (long long)r->offset); break;
    case 1: io_prep_pwritev(cb, r->fd, (const struct iovec *)r->iov, (int)r->iovcnt, (long long)r->offset); break;
    case 2: io_prep_fdsync(cb, r->fd); break;
    default: return -EINVAL;
    }
    cb->data = (void *)(uintptr_t)r->tag;
    ptrs[i] = cb;
  }
  uint32_t done = 0;
  while (done < n) {
    int k = io_submit(a->ctx, (long)(n - done), ptrs + done);
    if (k == -EAGAIN && done > 0) break;
    if (k < 0) return done > 0 ? (int64_t)done : k;
    done += (uint32_t)k;
  }
  return done;
}

// Waits for at least min_events completions (or timeout_us, -1 = forever)
// and copies them into the events array; returns how many. Called as a
// non-blocking FFI symbol, so it runs off the JavaScript thread.
int64_t shim_aio_wait(uint64_t handle, uint32_t min_events, int64_t timeout_us) {
  struct shim_aio *a = (struct shim_aio *)handle;
  struct timespec ts = {timeout_us / 1000000, (long)(timeout_us % 1000000) * 1000L};
  int r;
  do {
    r = io_getevents(a->ctx, min_events, a->max_events, a->raw, timeout_us < 0 ? NULL : &ts);
  } while (r == -EINTR);
  if (r < 0) return r;
  for (int i = 0; i < r; i++) {
    a->events[i].tag = (uint64_t)(uintptr_t)a->raw[i].data;
    a->events[i].result = (int64_t)(long)a->raw[i].res;
  }
  return r;
}
