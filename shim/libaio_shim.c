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
#include <linux/io_uring.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define SHIM_ABI_VERSION 8

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

// A read answered only from the page cache: -EAGAIN where it would wait
// for the device (RWF_NOWAIT), possibly short where part is cached.
int64_t shim_pread_cached(int32_t fd, void *buf, uint32_t len, int64_t off) {
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  ssize_t n = preadv2(fd, &iov, 1, off, RWF_NOWAIT);
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

// Waits up to timeout_ms (-1 = forever) for `events` on fd; returns the
// revents (0 on timeout). Called as a non-blocking FFI symbol: the wait runs
// off the JavaScript thread (a kernel ring device's "requests published").
int64_t shim_poll(int32_t fd, int32_t events, int32_t timeout_ms) {
  struct pollfd p = {.fd = fd, .events = (short)events};
  int r;
  do {
    r = poll(&p, 1, timeout_ms);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return neg_errno();
  return r == 0 ? 0 : (int64_t)(uint16_t)p.revents;
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

// Whether every page of [off, off+len) of `fd` is in the page cache: 1 or
// 0, by cachestat(2) (Linux 6.5; -ENOSYS before).
int64_t shim_all_cached(int32_t fd, int64_t off, int64_t len) {
  struct {
    uint64_t off, len;
  } range = {(uint64_t)off, (uint64_t)len};
  struct {
    uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
  } stat;
  if (syscall(451 /* cachestat */, fd, &range, &stat, 0) < 0) return neg_errno();
  uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
  uint64_t pages = (range.off + range.len + page - 1) / page - range.off / page;
  return stat.nr_cache >= pages;
}

// ---- sockets -------------------------------------------------------------

// A descriptor of our own for socket `fd`, only if it is the socket whose
// inode is `ino` (the caller found that number in /proc): -ESTALE if not.
int64_t shim_dup_socket(int32_t fd, uint64_t ino) {
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return neg_errno();
  struct stat st;
  if (fstat(copy, &st) < 0 || !S_ISSOCK(st.st_mode) || st.st_ino != ino) {
    close(copy);
    return -ESTALE;
  }
  return copy;
}

// Asks for a send buffer of `bytes`; returns the size the kernel granted.
int64_t shim_socket_sndbuf(int32_t fd, int32_t bytes) {
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) < 0) return neg_errno();
  int granted = 0;
  socklen_t size = sizeof granted;
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &granted, &size) < 0) return neg_errno();
  return granted;
}

int64_t shim_shutdown(int32_t fd) { return shutdown(fd, SHUT_RDWR) < 0 ? neg_errno() : 0; }

// Waits until nonblocking socket `fd` takes bytes: 0, or -ETIMEDOUT after `wait_ms`.
static int64_t wait_writable(int fd, int32_t wait_ms) {
  struct pollfd p = {.fd = fd, .events = POLLOUT};
  int n = poll(&p, 1, wait_ms);
  if (n < 0) return errno == EINTR ? 0 : neg_errno();
  return n == 0 ? -ETIMEDOUT : 0;
}

// Writes `head` then `len` bytes of `file` from `off` to socket `sock`
// (nonblocking: waits for room, at most `wait_ms` each time), the file's
// bytes by sendfile(2), never through user memory. Returns the bytes
// written (all of them) or -errno; an error may come after some were
// written. -EIO where the file ends early.
int64_t shim_send_file(int32_t sock, const uint8_t *head, uint32_t head_len, int32_t file,
                       int64_t off, uint32_t len, int32_t wait_ms) {
  uint64_t done = 0;
  while (done < head_len) {
    ssize_t n = send(sock, head + done, head_len - done, MSG_NOSIGNAL | MSG_MORE);
    if (n >= 0) {
      done += (uint64_t)n;
      continue;
    }
    if (errno != EAGAIN && errno != EINTR) return neg_errno();
    int64_t r = wait_writable(sock, wait_ms);
    if (r < 0) return r;
  }
  off_t position = off;
  uint32_t sent = 0;
  while (sent < len) {
    ssize_t n = sendfile(sock, file, &position, len - sent);
    if (n > 0) {
      sent += (uint32_t)n;
      continue;
    }
    if (n == 0) return -EIO;
    if (errno != EAGAIN && errno != EINTR) return neg_errno();
    int64_t r = wait_writable(sock, wait_ms);
    if (r < 0) return r;
  }
  return (int64_t)done + sent;
}

// ---- memory --------------------------------------------------------------

#define HUGE_PAGE_BYTES (2u << 20)

// Page-aligned, zero-filled anonymous memory; O_DIRECT needs the alignment.
// Whole 2 MiB multiples (copy buffers) ask for transparent huge pages: one
// fault per 2 MiB instead of 512 (faults are dear in a guest; the kernel
// aligns such mappings to 2 MiB). Advice only: failure changes nothing.
int64_t shim_alloc_aligned(uint64_t len) {
  void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return neg_errno();
  if (len % HUGE_PAGE_BYTES == 0) (void)madvise(p, len, MADV_HUGEPAGE);
  return (int64_t)(uintptr_t)p;
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

// ---- asynchronous I/O queues ---------------------------------------------
//
// One queue = one kernel submission context, driven by one JavaScript
// thread: it submits and reaps; a second thread (a Deno non-blocking FFI
// call) may only *wait* in shim_io_wait, which never consumes completions.
// Completions are reaped from memory the kernel shares with us (no system
// call), as fio does, so the JavaScript thread can look for them whenever
// it runs and sleeps only when there is nothing to do.
//
// Two engines behind one interface:
//  - libaio (kind 0): io_submit; completions signal an eventfd
//    (IOCB_FLAG_RESFD) that shim_io_wait polls; events are read from the
//    mapped aio ring. Asynchronous only with O_DIRECT: on the page cache
//    io_submit does the copy itself, synchronously.
//  - io_uring (kind 1): also asynchronous on the page cache (a cached read
//    completes inside io_uring_enter and is reaped at once; other requests
//    go to the kernel's workers). Needs IORING_FEAT_SUBMIT_STABLE (iovecs
//    are read during submission) and IORING_FEAT_EXT_ARG (timed waits).

// One completion as seen by TypeScript: 16 bytes {u64 tag, i64 result}.
struct shim_event {
  uint64_t tag;
  int64_t result;
};

// A request record is 40 bytes, little-endian:
//   u32 opcode (0 preadv, 1 pwritev, 2 fdatasync, 3 fdatasync of a range), i32 fd,
//   u64 offset_bytes, u64 iovec_addr, u32 iovec_count, u32 flags, u64 tag.
// Opcode 3 makes `iovec_count` bytes from `offset_bytes` durable, with the
// metadata needed to read them (file size, allocation), and writes back no
// other dirty page of the file (io_uring: vfs_fsync_range); libaio has no
// range and syncs the whole file, which is stronger.
// flags bit 0 (SHIM_REQ_OFFLOAD): io_uring runs the request in a kernel
// worker (IOSQE_ASYNC) instead of trying it inside the submission, so a
// large page-cache copy happens beside the submitting thread; libaio ignores
// it. flags 0 is the behaviour of every earlier record.
// iovec_addr points at iovec_count {u64 base, u64 len} pairs; both engines
// copy iocbs/SQEs and iovecs during submission, so they may be reused after.
struct shim_request {
  uint32_t opcode;
  int32_t fd;
  uint64_t offset;
  uint64_t iov;
  uint32_t iovcnt;
  uint32_t flags;
  uint64_t tag;
};

#define SHIM_SUBMIT_MAX 256
#define SHIM_REQ_OFFLOAD 1u
#define SHIM_IO_LIBAIO 0
#define SHIM_IO_URING 1

// The aio ring the kernel maps at the context's address (fs/aio.c).
struct aio_ring {
  unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length;
  struct io_event io_events[];
};
#define AIO_RING_MAGIC 0xa10a10a1

struct shim_uring {
  int fd;
  uint32_t sq_entries, *sq_head, *sq_tail, *sq_mask, *sq_array;
  struct io_uring_sqe *sqes;
  uint32_t *cq_head, *cq_tail, *cq_mask;
  struct io_uring_cqe *cqes;
  void *ring;
  size_t ring_bytes, sqes_bytes;
};

struct shim_io {
  int kind;
  uint32_t max_events;
  struct shim_event *events;
  // libaio
  io_context_t ctx;
  int efd;
  struct io_event *raw;
  // io_uring
  struct shim_uring u;
};

static int uring_enter(int fd, unsigned submit, unsigned min, unsigned flags, void *arg, size_t sz) {
  long r = syscall(__NR_io_uring_enter, fd, submit, min, flags, arg, sz);
  return r < 0 ? -errno : (int)r;
}

static int uring_open(struct shim_uring *u, uint32_t entries) {
  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
  if (fd < 0) return -errno;
  uint32_t need = IORING_FEAT_SINGLE_MMAP | IORING_FEAT_SUBMIT_STABLE | IORING_FEAT_EXT_ARG;
  if ((p.features & need) != need) {
    close(fd);
    return -ENOSYS;
  }
  size_t sq_bytes = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
  size_t cq_bytes = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  u->ring_bytes = sq_bytes > cq_bytes ? sq_bytes : cq_bytes;
  u->ring = mmap(NULL, u->ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                 IORING_OFF_SQ_RING);
  if (u->ring == MAP_FAILED) {
    int e = -errno;
    close(fd);
    return e;
  }
  u->sqes_bytes = p.sq_entries * sizeof(struct io_uring_sqe);
  u->sqes = mmap(NULL, u->sqes_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                 IORING_OFF_SQES);
  if (u->sqes == MAP_FAILED) {
    int e = -errno;
    munmap(u->ring, u->ring_bytes);
    close(fd);
    return e;
  }
  char *r = u->ring;
  u->fd = fd;
  u->sq_entries = p.sq_entries;
  u->sq_head = (uint32_t *)(r + p.sq_off.head);
  u->sq_tail = (uint32_t *)(r + p.sq_off.tail);
  u->sq_mask = (uint32_t *)(r + p.sq_off.ring_mask);
  u->sq_array = (uint32_t *)(r + p.sq_off.array);
  u->cq_head = (uint32_t *)(r + p.cq_off.head);
  u->cq_tail = (uint32_t *)(r + p.cq_off.tail);
  u->cq_mask = (uint32_t *)(r + p.cq_off.ring_mask);
  u->cqes = (struct io_uring_cqe *)(r + p.cq_off.cqes);
  return 0;
}

static void uring_close(struct shim_uring *u) {
  munmap(u->sqes, u->sqes_bytes);
  munmap(u->ring, u->ring_bytes);
  close(u->fd);
}

static void shim_io_free(struct shim_io *q) {
  free(q->raw), free(q->events), free(q);
}

// Returns an opaque handle (address) to a queue of the given kind that can
// hold max_inflight requests at once, or -errno (io_uring: -ENOSYS when the
// kernel lacks a needed feature; the caller falls back to libaio).
int64_t shim_io_create(int32_t kind, uint32_t max_inflight) {
  struct shim_io *q = calloc(1, sizeof *q);
  if (!q) return -ENOMEM;
  q->kind = kind;
  q->max_events = max_inflight;
  q->events = calloc(max_inflight, sizeof *q->events);
  if (!q->events) return shim_io_free(q), -ENOMEM;
  int r;
  if (kind == SHIM_IO_URING) {
    r = uring_open(&q->u, max_inflight);
    if (r < 0) return shim_io_free(q), r;
    return (int64_t)(uintptr_t)q;
  }
  if (kind != SHIM_IO_LIBAIO) return shim_io_free(q), -EINVAL;
  q->raw = calloc(max_inflight, sizeof *q->raw);
  if (!q->raw) return shim_io_free(q), -ENOMEM;
  q->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (q->efd < 0) return r = -errno, shim_io_free(q), r;
  r = io_setup(max_inflight, &q->ctx);
  if (r < 0) return close(q->efd), shim_io_free(q), r;
  return (int64_t)(uintptr_t)q;
}

int64_t shim_io_destroy(uint64_t handle) {
  struct shim_io *q = (struct shim_io *)handle;
  int r = 0;
  if (q->kind == SHIM_IO_URING) {
    uring_close(&q->u);
  } else {
    r = io_destroy(q->ctx);
    close(q->efd);
  }
  shim_io_free(q);
  return r;
}

// Address of the array of completions that shim_io_reap fills.
int64_t shim_io_events(uint64_t handle) {
  return (int64_t)(uintptr_t)((struct shim_io *)handle)->events;
}

static int64_t aio_submit_records(struct shim_io *q, const struct shim_request *reqs, uint32_t n) {
  struct iocb cbs[SHIM_SUBMIT_MAX];
  struct iocb *ptrs[SHIM_SUBMIT_MAX];
  for (uint32_t i = 0; i < n; i++) {
    const struct shim_request *r = &reqs[i];
    struct iocb *cb = &cbs[i];
    switch (r->opcode) {
    case 0: io_prep_preadv(cb, r->fd, (const struct iovec *)r->iov, (int)r->iovcnt, (long long)r->offset); break;
    case 1: io_prep_pwritev(cb, r->fd, (const struct iovec *)r->iov, (int)r->iovcnt, (long long)r->offset); break;
    case 2:
    case 3: io_prep_fdsync(cb, r->fd); break;
    default: return -EINVAL;
    }
    io_set_eventfd(cb, q->efd);
    cb->data = (void *)(uintptr_t)r->tag;
    ptrs[i] = cb;
  }
  uint32_t done = 0;
  while (done < n) {
    int k = io_submit(q->ctx, (long)(n - done), ptrs + done);
    if (k == -EAGAIN && done > 0) break;
    if (k < 0) return done > 0 ? (int64_t)done : k;
    done += (uint32_t)k;
  }
  return done;
}

static int64_t uring_submit_records(struct shim_uring *u, const struct shim_request *reqs, uint32_t n) {
  uint32_t tail = *u->sq_tail;
  uint32_t head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
  uint32_t room = u->sq_entries - (tail - head);
  if (n > room) n = room;
  for (uint32_t i = 0; i < n; i++) {
    const struct shim_request *r = &reqs[i];
    uint32_t index = tail & *u->sq_mask;
    struct io_uring_sqe *sqe = &u->sqes[index];
    memset(sqe, 0, sizeof *sqe);
    sqe->fd = r->fd;
    sqe->user_data = r->tag;
    switch (r->opcode) {
    case 0: sqe->opcode = IORING_OP_READV; break;
    case 1: sqe->opcode = IORING_OP_WRITEV; break;
    case 2: sqe->opcode = IORING_OP_FSYNC; sqe->fsync_flags = IORING_FSYNC_DATASYNC; break;
    case 3:
      sqe->opcode = IORING_OP_FSYNC;
      sqe->fsync_flags = IORING_FSYNC_DATASYNC;
      sqe->off = r->offset;
      sqe->len = r->iovcnt; // 0 would mean "to the end of the file"
      break;
    default: return -EINVAL; // nothing published yet: the tail is stored below
    }
    if (r->opcode < 2) {
      sqe->addr = r->iov;
      sqe->len = r->iovcnt;
      sqe->off = r->offset;
    }
    if (r->flags & SHIM_REQ_OFFLOAD) sqe->flags |= IOSQE_ASYNC;
    u->sq_array[index] = index;
    tail++;
  }
  __atomic_store_n(u->sq_tail, tail, __ATOMIC_RELEASE);
  // Published SQEs are the kernel's: retry transient failures until it took them all.
  uint32_t done = 0;
  for (int tries = 0; done < n;) {
    int k = uring_enter(u->fd, n - done, 0, 0, NULL, 0);
    if (k > 0) {
      done += (uint32_t)k;
      continue;
    }
    if ((k == -EINTR || k == -EAGAIN || k == -EBUSY || k == 0) && ++tries < 100000) {
      sched_yield();
      continue;
    }
    return k < 0 ? k : -EIO;
  }
  return done;
}

// Submits up to n requests; returns how many the kernel took (fewer when
// the queue is full), or -errno. io_uring: a negative result means the
// queue is unusable (published requests may or may not run).
int64_t shim_io_submit(uint64_t handle, const struct shim_request *reqs, uint32_t n) {
  struct shim_io *q = (struct shim_io *)handle;
  if (n > SHIM_SUBMIT_MAX) n = SHIM_SUBMIT_MAX;
  if (q->kind == SHIM_IO_URING) return uring_submit_records(&q->u, reqs, n);
  return aio_submit_records(q, reqs, n);
}

static uint32_t aio_reap(struct shim_io *q) {
  struct aio_ring *ring = (struct aio_ring *)q->ctx;
  uint32_t n = 0;
  if (ring->magic != AIO_RING_MAGIC) {
    struct timespec zero = {0, 0};
    int r = io_getevents(q->ctx, 0, q->max_events, q->raw, &zero);
    for (int i = 0; i < r; i++) {
      q->events[i].tag = (uint64_t)(uintptr_t)q->raw[i].data;
      q->events[i].result = (int64_t)(long)q->raw[i].res;
    }
    return r > 0 ? (uint32_t)r : 0;
  }
  unsigned head = ring->head;
  unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
  while (head != tail && n < q->max_events) {
    struct io_event *e = &ring->io_events[head];
    q->events[n].tag = (uint64_t)(uintptr_t)e->data;
    q->events[n].result = (int64_t)(long)e->res;
    n++;
    head = (head + 1) % ring->nr;
  }
  __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
  return n;
}

static uint32_t uring_reap(struct shim_io *q) {
  struct shim_uring *u = &q->u;
  uint32_t head = *u->cq_head;
  uint32_t tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
  uint32_t n = 0;
  while (head != tail && n < q->max_events) {
    struct io_uring_cqe *c = &u->cqes[head & *u->cq_mask];
    q->events[n].tag = c->user_data;
    q->events[n].result = c->res;
    n++;
    head++;
  }
  __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
  return n;
}

// Copies the completions already there into the events array and returns
// how many (no system call on either engine's normal path). JavaScript
// thread only.
int64_t shim_io_reap(uint64_t handle) {
  struct shim_io *q = (struct shim_io *)handle;
  return q->kind == SHIM_IO_URING ? uring_reap(q) : aio_reap(q);
}

// Sleeps until a completion may be there to reap, or timeout_us passed;
// returns 0 (spurious returns are allowed: the caller reaps and may find
// nothing). Consumes no completion, so it may run on another thread
// (a non-blocking FFI symbol) while the JavaScript thread reaps.
// Sleeps until completions may be there or timeout_us passed: 1 when woken
// by completions, 0 at the timeout (or a signal), or -errno.
static int64_t io_sleep(struct shim_io *q, int64_t timeout_us) {
  struct timespec ts = {timeout_us / 1000000, (long)(timeout_us % 1000000) * 1000L};
  if (q->kind == SHIM_IO_URING) {
    struct io_uring_getevents_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.ts = (uint64_t)(uintptr_t)&ts;
    int r = uring_enter(q->u.fd, 0, 1, IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &arg,
                        sizeof arg);
    return r == -ETIME || r == -EINTR ? 0 : (r < 0 ? r : 1);
  }
  struct pollfd p = {q->efd, POLLIN, 0};
  int r = ppoll(&p, 1, &ts, NULL);
  if (r < 0) return errno == EINTR ? 0 : -errno;
  uint64_t count;
  if (r > 0 && read(q->efd, &count, sizeof count) < 0 && errno != EAGAIN) return -errno;
  return r > 0;
}

int64_t shim_io_wait(uint64_t handle, int64_t timeout_us) {
  int64_t r = io_sleep((struct shim_io *)handle, timeout_us);
  return r < 0 ? r : 0;
}

// ---- waiting for completions or a shared ring's requests -----------------
//
// The disk process waits for its I/O on its own thread; meanwhile the front
// end may publish requests on the shared ring without a kick (it is not
// asked for one while the disk is busy). shim_io_wait_ring watches both.

// Longest sleep of shim_io_wait_ring between two looks at the watched index.
#ifndef RING_SLEEP_SLICE_US
#define RING_SLEEP_SLICE_US 50
#endif

// Whether completions are there to reap (no system call; false when the
// kernel's libaio ring cannot be read directly: the sleep catches them).
static int io_has_completions(struct shim_io *q) {
  if (q->kind == SHIM_IO_URING) {
    return __atomic_load_n(q->u.cq_tail, __ATOMIC_ACQUIRE) != *q->u.cq_head;
  }
  struct aio_ring *ring = (struct aio_ring *)q->ctx;
  if (ring->magic != AIO_RING_MAGIC) return 0;
  return __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE) != ring->head;
}

static int64_t monotonic_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

// Like shim_io_wait, but returns 1 as soon as the u32 at watch_addr (a blkif
// ring's req_prod, written by another process) differs from `seen`. It spins
// first, for at most spin_us (bounded by the caller; no system call), looking
// at the index and at the completion ring, then sleeps for completions for
// the rest of timeout_us, looking at the index again every
// RING_SLEEP_SLICE_US. Returns 0 when completions may be there
// or the time passed, 1 when the watched index moved, or -errno.
int64_t shim_io_wait_ring(uint64_t handle, int64_t timeout_us, uint64_t watch_addr, uint32_t seen,
                          int64_t spin_us) {
  struct shim_io *q = (struct shim_io *)handle;
  const uint32_t *watch = (const uint32_t *)(uintptr_t)watch_addr;
  if (spin_us > timeout_us) spin_us = timeout_us;
  int64_t start = monotonic_us();
  int moved = 0;
  for (int64_t now = start; now - start < spin_us; now = monotonic_us()) {
    // Requests that arrived are taken together with the next completions
    // (or at the end of the spin), so both travel in one batch.
    moved = moved || __atomic_load_n(watch, __ATOMIC_ACQUIRE) != seen;
    if (io_has_completions(q)) return moved;
    for (int i = 0; i < 32; i++) __builtin_ia32_pause();
  }
  if (moved || __atomic_load_n(watch, __ATOMIC_ACQUIRE) != seen) return 1;
  // The sleep is cut in slices with a look at the index between them: the
  // front end is not asked to kick a busy disk, so requests it publishes
  // meanwhile are otherwise seen only at the next completion.
  for (;;) {
    int64_t left = timeout_us - (monotonic_us() - start);
    if (left <= 0) return 0;
    int64_t r = io_sleep(q, left < RING_SLEEP_SLICE_US ? left : RING_SLEEP_SLICE_US);
    if (r != 0) return r < 0 ? r : 0;
    if (__atomic_load_n(watch, __ATOMIC_ACQUIRE) != seen) return 1;
  }
}
