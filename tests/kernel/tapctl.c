// tapctl: drives the blktap module from C for the VM tests (tests/kernel/vm/).
//
//   tapctl version
//   tapctl alloc [RING_ORDER SEGMENTS_MAX QUEUE_DEPTH]     prints the minor
//   tapctl create MINOR SECTORS [ro] [flush] [discard] [lbs=N] [pbs=N]
//   tapctl remove|free|fail MINOR
//   tapctl status MINOR                                    key=value lines
//   tapctl serve MINOR FILE [MODE [AFTER]]                 a disk process
//   tapctl mmap MINOR DELTA_PAGES                          mmap a wrong length
//   tapctl open2 MINOR                                     open the ring twice
//
// `serve` answers requests from FILE (pread/pwrite/fdatasync; O_DIRECT with
// TAPCTL_DIRECT=1), one at a time, until SIGTERM (exit 0). After AFTER good responses (default 0) it misbehaves as MODE:
//   good          never
//   bad-id        answers with an id that names no request
//   duplicate     answers one request twice
//   bad-op        answers with another operation
//   bad-status    answers with status 7
//   bad-rsp-prod  publishes rsp_prod far beyond the requests
//   exit          takes the requests and exits without answering
// A misbehaving server then expects BLKTAP_IOC_RESPOND to fail with EBADMSG
// and poll() to report POLLERR, prints "refused: <errno name>" and exits 3;
// any other outcome exits 1. Errors exit 1 with a message naming the call.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../../kernel/blktap_abi.h"

#define CONTROL "/dev/" BLKTAP_CONTROL_NAME

static void die(const char *what) {
  fprintf(stderr, "tapctl: %s: %s\n", what, strerror(errno));
  exit(1);
}

static unsigned long num(const char *s) {
  char *end;
  errno = 0;
  unsigned long v = strtoul(s, &end, 0);
  if (errno || *end) {
    fprintf(stderr, "tapctl: not a number: %s\n", s);
    exit(2);
  }
  return v;
}

static int control(void) {
  int fd = open(CONTROL, O_RDWR | O_CLOEXEC);
  if (fd < 0) die("open " CONTROL);
  return fd;
}

static int ring_open(unsigned long minor) {
  char path[64];
  snprintf(path, sizeof path, "/dev/" BLKTAP_RING_NAME "%lu", minor);
  return open(path, O_RDWR | O_CLOEXEC);
}

static void status(unsigned long minor) {
  struct blktap_status st = {.minor = (uint32_t)minor};
  if (ioctl(control(), BLKTAP_CTL_STATUS, &st) < 0) die("BLKTAP_CTL_STATUS");
  printf("state=%u\ndevice=%u\nring_open=%u\nring_error_state=%u\nfailed=%u\n", st.state,
         !!(st.state & BLKTAP_STATE_DEVICE), !!(st.state & BLKTAP_STATE_RING_OPEN),
         !!(st.state & BLKTAP_STATE_RING_ERROR), !!(st.state & BLKTAP_STATE_FAILED));
  printf("ring_error=%u\nopeners=%u\ncapacity=%llu\noutstanding=%llu\ncompleted=%llu\n",
         st.ring_error, st.device_openers, (unsigned long long)st.capacity_sectors,
         (unsigned long long)st.requests_outstanding, (unsigned long long)st.requests_completed);
  printf("failed_requests=%llu\nreissued=%llu\nprotocol_errors=%llu\nring_opens=%llu\n",
         (unsigned long long)st.requests_failed, (unsigned long long)st.requests_reissued,
         (unsigned long long)st.protocol_errors, (unsigned long long)st.ring_opens);
  printf("mmap_bytes=%llu\nqueue_depth=%u\n", (unsigned long long)st.geometry.mmap_bytes,
         st.geometry.queue_depth);
}

static void create(int argc, char **argv) {
  struct blktap_device_params p = {.minor = (uint32_t)num(argv[0]),
                                   .capacity_sectors = num(argv[1]),
                                   .logical_block_bytes = 512,
                                   .physical_block_bytes = 4096};
  for (int i = 2; i < argc; i++) {
    if (!strcmp(argv[i], "ro")) p.flags |= BLKTAP_DEVICE_READONLY;
    else if (!strcmp(argv[i], "flush")) p.flags |= BLKTAP_DEVICE_FLUSH;
    else if (!strcmp(argv[i], "discard")) p.flags |= BLKTAP_DEVICE_DISCARD;
    else if (!strncmp(argv[i], "lbs=", 4)) p.logical_block_bytes = (uint32_t)num(argv[i] + 4);
    else if (!strncmp(argv[i], "pbs=", 4)) p.physical_block_bytes = (uint32_t)num(argv[i] + 4);
    else {
      fprintf(stderr, "tapctl: unknown create flag %s\n", argv[i]);
      exit(2);
    }
  }
  if (ioctl(control(), BLKTAP_CTL_CREATE_DEVICE, &p) < 0) die("BLKTAP_CTL_CREATE_DEVICE");
}

// ---- the back end ----------------------------------------------------------

enum mode { GOOD, BAD_ID, DUPLICATE, BAD_OP, BAD_STATUS, BAD_RSP_PROD, EXIT };
static const char *const mode_names[] = {"good",       "bad-id",       "duplicate", "bad-op",
                                         "bad-status", "bad-rsp-prod", "exit"};

struct server {
  int fd, file;
  struct blktap_geometry geo;
  uint8_t *mem, *pool;
  volatile struct blktap_sring *sring;
  uint32_t req_cons, rsp_prod_pvt;
  enum mode mode;
  unsigned long after, answered;
  int misbehaved;
};

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static void *entry(struct server *s, uint32_t i) {
  return s->mem + BLKTAP_SRING_HEADER_BYTES +
         (size_t)(i & (s->geo.ring_entries - 1)) * BLKTAP_RING_ENTRY_BYTES;
}

// Segments adjacent in the pool and on disk go out as one pread/pwrite.
struct span {
  uint8_t *buf;
  size_t len;
  uint64_t offset;
};

static int span_flush(struct server *s, int write, struct span *sp) {
  if (!sp->len) return 0;
  ssize_t n = write ? pwrite(s->file, sp->buf, sp->len, (off_t)sp->offset)
                    : pread(s->file, sp->buf, sp->len, (off_t)sp->offset);
  if (n != (ssize_t)sp->len) return -1;
  sp->offset += sp->len;
  sp->len = 0;
  return 0;
}

static int segment_io(struct server *s, int write, const struct blktap_blkif_segment *seg,
                      struct span *sp) {
  if (seg->gref >= s->geo.pool_pages || seg->first_sect > seg->last_sect || seg->last_sect > 7)
    return -1;
  uint8_t *buf = s->pool + (size_t)seg->gref * 4096 + seg->first_sect * 512;
  size_t len = (size_t)(seg->last_sect - seg->first_sect + 1) * 512;
  if (sp->len && sp->buf + sp->len == buf) {
    sp->len += len;
    return 0;
  }
  if (span_flush(s, write, sp)) return -1;
  sp->buf = buf;
  sp->len = len;
  return 0;
}

static int16_t perform(struct server *s, const uint8_t *raw) {
  const struct blktap_blkif_request *r = (const void *)raw;
  const struct blktap_blkif_request_indirect *ind = (const void *)raw;
  struct span sp = {.offset = r->sector_number * 512};
  int write = r->operation == BLKTAP_OP_WRITE;
  switch (r->operation) {
  case BLKTAP_OP_READ:
  case BLKTAP_OP_WRITE:
    for (unsigned i = 0; i < r->nr_segments && i < BLKTAP_DIRECT_SEGMENTS_MAX; i++)
      if (segment_io(s, write, &r->seg[i], &sp)) return -1;
    return span_flush(s, write, &sp) ? -1 : 0;
  case BLKTAP_OP_INDIRECT: {
    if (ind->indirect_grefs[0] >= s->geo.pool_pages || ind->nr_segments > 512) return -1;
    const struct blktap_blkif_segment *segs =
        (const void *)(s->pool + (size_t)ind->indirect_grefs[0] * 4096);
    sp.offset = ind->sector_number * 512;
    write = ind->indirect_op == BLKTAP_OP_WRITE;
    for (unsigned i = 0; i < ind->nr_segments; i++)
      if (segment_io(s, write, &segs[i], &sp)) return -1;
    return span_flush(s, write, &sp) ? -1 : 0;
  }
  case BLKTAP_OP_FLUSH_DISKCACHE:
    return fdatasync(s->file) ? -1 : 0;
  case BLKTAP_OP_DISCARD:
    return 0; // advisory
  default:
    return -2;
  }
}

static void put_response(struct server *s, uint64_t id, uint8_t op, int16_t status) {
  struct blktap_blkif_response *rsp = entry(s, s->rsp_prod_pvt++);
  rsp->id = id;
  rsp->operation = op;
  rsp->status = status;
}

// Publishes responses; returns what BLKTAP_IOC_RESPOND said (0 if not called).
static int push_responses(struct server *s, uint32_t prod) {
  uint32_t old = s->sring->rsp_prod;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  s->sring->rsp_prod = prod;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if ((uint32_t)(prod - s->sring->rsp_event) >= (uint32_t)(prod - old) && s->mode == GOOD)
    return 0;
  return ioctl(s->fd, BLKTAP_IOC_RESPOND) < 0 ? -errno : 1;
}

// Answers one request, misbehaving once `after` good answers were given.
static void answer(struct server *s, const uint8_t *raw) {
  const struct blktap_blkif_request *r = (const void *)raw;
  int bad = s->mode != GOOD && s->answered >= s->after;
  if (bad && s->mode == EXIT) {
    fprintf(stderr, "tapctl: exiting with requests unanswered\n");
    _exit(3);
  }
  int16_t status = perform(s, raw);
  uint64_t id = r->id;
  uint8_t op = r->operation;
  if (bad) {
    s->misbehaved = 1;
    switch (s->mode) {
    case BAD_ID: id ^= 0x5a5a0000ull; break;
    case BAD_OP: op = op == BLKTAP_OP_READ ? BLKTAP_OP_WRITE : BLKTAP_OP_READ; break;
    case BAD_STATUS: status = 7; break;
    case DUPLICATE: put_response(s, id, op, status); break;
    default: break;
    }
  }
  put_response(s, id, op, status);
  s->answered++;
}

static void refused(struct server *s, int result) {
  struct pollfd p = {.fd = s->fd, .events = POLLIN};
  if (result != -EBADMSG) {
    fprintf(stderr, "tapctl: misbehaviour %s was not refused (%d)\n", mode_names[s->mode], result);
    exit(1);
  }
  if (poll(&p, 1, 0) != 1 || !(p.revents & POLLERR)) {
    fprintf(stderr, "tapctl: poll does not report POLLERR after %s\n", mode_names[s->mode]);
    exit(1);
  }
  if (ioctl(s->fd, BLKTAP_IOC_RESPOND) >= 0 || errno != EBADMSG) {
    fprintf(stderr, "tapctl: the ring is not in the error state\n");
    exit(1);
  }
  printf("refused: EBADMSG (%s)\n", mode_names[s->mode]);
  exit(3);
}

// One pass over the ring: requests in, responses out, event re-armed.
static void pump(struct server *s) {
  for (;;) {
    uint32_t prod = s->sring->req_prod;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    while (s->req_cons != prod) {
      uint8_t copy[BLKTAP_RING_ENTRY_BYTES];
      memcpy(copy, entry(s, s->req_cons++), sizeof copy);
      answer(s, copy);
    }
    uint32_t rsp = s->rsp_prod_pvt;
    if (s->misbehaved && s->mode == BAD_RSP_PROD) rsp += 1000;
    int result = push_responses(s, rsp);
    if (s->misbehaved) refused(s, result);
    if (result < 0) {
      errno = -result;
      die("BLKTAP_IOC_RESPOND");
    }
    s->sring->req_event = s->req_cons + 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (s->sring->req_prod == s->req_cons) return;
  }
}

static int serve(unsigned long minor, const char *file, enum mode mode, unsigned long after) {
  struct server s = {.mode = mode, .after = after};
  s.fd = ring_open(minor);
  if (s.fd < 0) die("open ring");
  if (ioctl(s.fd, BLKTAP_IOC_GEOMETRY, &s.geo) < 0) die("BLKTAP_IOC_GEOMETRY");
  s.mem = mmap(NULL, s.geo.mmap_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, s.fd, 0);
  if (s.mem == MAP_FAILED) die("mmap");
  s.pool = s.mem + (size_t)s.geo.ring_pages * 4096;
  s.sring = (volatile void *)s.mem;
  // TAPCTL_DIRECT=1: O_DIRECT on the file (the pool is page-aligned).
  const char *direct = getenv("TAPCTL_DIRECT");
  s.file = open(file, O_RDWR | O_CLOEXEC | (direct && *direct == '1' ? O_DIRECT : 0));
  if (s.file < 0) die(file);
  s.rsp_prod_pvt = s.req_cons = s.sring->rsp_prod;
  signal(SIGTERM, on_term);
  printf("serving minor %lu (%s)\n", minor, mode_names[mode]);
  fflush(stdout);
  while (!stop) {
    struct pollfd p = {.fd = s.fd, .events = POLLIN};
    int n = poll(&p, 1, 200);
    if (n < 0 && errno != EINTR) die("poll");
    if (n <= 0) continue;
    if (p.revents & POLLERR) {
      fprintf(stderr, "tapctl: ring error\n");
      return 1;
    }
    uint64_t events;
    if (read(s.fd, &events, sizeof events) != sizeof events) die("read events");
    pump(&s);
  }
  return 0;
}

// ---- main ------------------------------------------------------------------

static int try_mmap(unsigned long minor, long delta_pages) {
  int fd = ring_open(minor);
  struct blktap_geometry g;
  if (fd < 0) die("open ring");
  if (ioctl(fd, BLKTAP_IOC_GEOMETRY, &g) < 0) die("BLKTAP_IOC_GEOMETRY");
  void *p = mmap(NULL, g.mmap_bytes + delta_pages * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  printf("mmap %+ld pages: %s\n", delta_pages, p == MAP_FAILED ? strerrorname_np(errno) : "mapped");
  return p == MAP_FAILED ? 3 : 0;
}

static int open_twice(unsigned long minor) {
  int a = ring_open(minor);
  if (a < 0) die("first open");
  int b = ring_open(minor);
  printf("second open: %s\n", b < 0 ? strerrorname_np(errno) : "opened");
  return b < 0 ? 3 : 0;
}

static enum mode mode_named(const char *name) {
  for (unsigned i = 0; i < sizeof mode_names / sizeof mode_names[0]; i++)
    if (!strcmp(name, mode_names[i])) return (enum mode)i;
  fprintf(stderr, "tapctl: unknown mode %s\n", name);
  exit(2);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: see the comment at the top of tests/kernel/tapctl.c\n");
    return 2;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "version")) {
    int v = ioctl(control(), BLKTAP_CTL_VERSION);
    if (v < 0) die("BLKTAP_CTL_VERSION");
    printf("%d\n", v);
  } else if (!strcmp(cmd, "alloc")) {
    struct blktap_alloc a = {.ring_order = 0, .segments_max = 256};
    if (argc >= 5) {
      a.ring_order = (uint32_t)num(argv[2]);
      a.segments_max = (uint32_t)num(argv[3]);
      a.queue_depth = (uint32_t)num(argv[4]);
    }
    if (ioctl(control(), BLKTAP_CTL_ALLOC, &a) < 0) die("BLKTAP_CTL_ALLOC");
    printf("%u\n", a.minor);
  } else if (!strcmp(cmd, "create") && argc >= 4) {
    create(argc - 2, argv + 2);
  } else if ((!strcmp(cmd, "remove") || !strcmp(cmd, "free") || !strcmp(cmd, "fail")) && argc == 3) {
    unsigned long req = !strcmp(cmd, "remove") ? BLKTAP_CTL_REMOVE_DEVICE
                        : !strcmp(cmd, "free") ? BLKTAP_CTL_FREE
                                               : BLKTAP_CTL_FAIL;
    if (ioctl(control(), req, num(argv[2])) < 0) {
      printf("%s: %s\n", cmd, strerrorname_np(errno));
      return 3;
    }
  } else if (!strcmp(cmd, "status") && argc == 3) {
    status(num(argv[2]));
  } else if (!strcmp(cmd, "serve") && argc >= 4) {
    return serve(num(argv[2]), argv[3], argc >= 5 ? mode_named(argv[4]) : GOOD,
                 argc >= 6 ? num(argv[5]) : 0);
  } else if (!strcmp(cmd, "mmap") && argc == 4) {
    return try_mmap(num(argv[2]), strtol(argv[3], NULL, 0));
  } else if (!strcmp(cmd, "open2") && argc == 3) {
    return open_twice(num(argv[2]));
  } else {
    fprintf(stderr, "tapctl: bad command line (see tests/kernel/tapctl.c)\n");
    return 2;
  }
  return 0;
}
