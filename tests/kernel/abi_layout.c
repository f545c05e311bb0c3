// Prints, as JSON, the layout the C compiler gives Xen's blkif ring
// (/usr/include/xen/io/blkif.h, ring.h from libxen-dev) and blktap's user ABI
// (kernel/blktap_abi.h): sizes, field offsets, constants, ioctl numbers.
// tests/kernel/abi_test.ts builds it with zig cc and checks that both agree
// with each other and with the TypeScript constants.
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/io/blkif.h>

#include "../../kernel/blktap_abi.h"

static int first = 1;
static void key(const char *k) {
  printf("%s\"%s\": ", first ? "" : ", ", k);
  first = 0;
}
static void open_obj(const char *k) {
  if (k) key(k);
  printf("{");
  first = 1;
}
static void close_obj(void) {
  printf("}");
  first = 0;
}
static void num(const char *k, long long v) {
  key(k);
  printf("%lld", v);
}

#define SIZE(name, type) num(name, (long long)sizeof(type))
#define OFF(type, field) num(#field, (long long)offsetof(type, field))

// The blkif structures, under Xen's names, from either header set.
#define BLKIF_LAYOUT(SRING, REQ, SEG, DISCARD, INDIRECT, RSP)                                  \
  do {                                                                                         \
    open_obj("sizeof");                                                                        \
    SIZE("blkif_request", REQ);                                                                \
    SIZE("blkif_request_segment", SEG);                                                        \
    SIZE("blkif_request_discard", DISCARD);                                                    \
    SIZE("blkif_request_indirect", INDIRECT);                                                  \
    SIZE("blkif_response", RSP);                                                               \
    close_obj();                                                                               \
    open_obj("offsetof");                                                                      \
    open_obj("blkif_sring");                                                                   \
    OFF(SRING, req_prod), OFF(SRING, req_event), OFF(SRING, rsp_prod), OFF(SRING, rsp_event);  \
    close_obj();                                                                               \
    open_obj("blkif_request");                                                                 \
    OFF(REQ, operation), OFF(REQ, nr_segments), OFF(REQ, handle), OFF(REQ, id);                \
    OFF(REQ, sector_number), OFF(REQ, seg);                                                    \
    close_obj();                                                                               \
    open_obj("blkif_request_segment");                                                         \
    OFF(SEG, gref), OFF(SEG, first_sect), OFF(SEG, last_sect);                                 \
    close_obj();                                                                               \
    open_obj("blkif_request_discard");                                                         \
    OFF(DISCARD, operation), OFF(DISCARD, flag), OFF(DISCARD, handle), OFF(DISCARD, id);       \
    OFF(DISCARD, sector_number), OFF(DISCARD, nr_sectors);                                     \
    close_obj();                                                                               \
    open_obj("blkif_request_indirect");                                                        \
    OFF(INDIRECT, operation), OFF(INDIRECT, indirect_op), OFF(INDIRECT, nr_segments);          \
    OFF(INDIRECT, id), OFF(INDIRECT, sector_number), OFF(INDIRECT, handle);                    \
    OFF(INDIRECT, indirect_grefs);                                                             \
    close_obj();                                                                               \
    open_obj("blkif_response");                                                                \
    OFF(RSP, id), OFF(RSP, operation), OFF(RSP, status);                                       \
    close_obj();                                                                               \
    close_obj();                                                                               \
  } while (0)

// Xen's blkif_request has no discard/indirect members on its own: the
// discard and indirect variants are separate structs in blkif.h.
static void xen(void) {
  open_obj("xen");
  BLKIF_LAYOUT(struct blkif_sring, struct blkif_request, struct blkif_request_segment,
               struct blkif_request_discard, struct blkif_request_indirect,
               struct blkif_response);
  num("sring_header_bytes", offsetof(struct blkif_sring, ring));
  num("sring_entry_bytes", sizeof(union blkif_sring_entry));
  open_obj("constants");
  num("OP_READ", BLKIF_OP_READ), num("OP_WRITE", BLKIF_OP_WRITE);
  num("OP_WRITE_BARRIER", BLKIF_OP_WRITE_BARRIER);
  num("OP_FLUSH_DISKCACHE", BLKIF_OP_FLUSH_DISKCACHE);
  num("OP_RESERVED_1", BLKIF_OP_RESERVED_1), num("OP_DISCARD", BLKIF_OP_DISCARD);
  num("OP_INDIRECT", BLKIF_OP_INDIRECT);
  num("RSP_OKAY", BLKIF_RSP_OKAY), num("RSP_ERROR", BLKIF_RSP_ERROR);
  num("RSP_EOPNOTSUPP", BLKIF_RSP_EOPNOTSUPP);
  num("DIRECT_SEGMENTS_MAX", BLKIF_MAX_SEGMENTS_PER_REQUEST);
  num("INDIRECT_PAGES_MAX", BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
  num("SEGMENTS_PER_INDIRECT_PAGE", 4096 / sizeof(struct blkif_request_segment));
  num("DISCARD_SECURE", BLKIF_DISCARD_SECURE);
  close_obj();
  open_obj("ring_entries_by_order");
  for (int order = 0; order <= 4; order++) {
    char k[2] = {(char)('0' + order), 0};
    num(k, __CONST_RING_SIZE(blkif, 4096 << order));
  }
  close_obj();
  close_obj();
}

static void blktap_structs(void) {
  open_obj("control_sizeof");
  SIZE("alloc", struct blktap_alloc), SIZE("geometry", struct blktap_geometry);
  SIZE("device_params", struct blktap_device_params), SIZE("status", struct blktap_status);
  close_obj();
  open_obj("control_offsetof");
  open_obj("alloc");
  OFF(struct blktap_alloc, minor), OFF(struct blktap_alloc, ring_order);
  OFF(struct blktap_alloc, segments_max), OFF(struct blktap_alloc, queue_depth);
  close_obj();
  open_obj("geometry");
  OFF(struct blktap_geometry, ring_pages), OFF(struct blktap_geometry, ring_entries);
  OFF(struct blktap_geometry, queue_depth), OFF(struct blktap_geometry, segments_max);
  OFF(struct blktap_geometry, slot_pages), OFF(struct blktap_geometry, pool_pages);
  OFF(struct blktap_geometry, mmap_bytes);
  close_obj();
  open_obj("device_params");
  OFF(struct blktap_device_params, minor), OFF(struct blktap_device_params, flags);
  OFF(struct blktap_device_params, capacity_sectors);
  OFF(struct blktap_device_params, logical_block_bytes);
  OFF(struct blktap_device_params, physical_block_bytes);
  OFF(struct blktap_device_params, discard_granularity_bytes);
  close_obj();
  open_obj("status");
  OFF(struct blktap_status, minor), OFF(struct blktap_status, state);
  OFF(struct blktap_status, ring_error), OFF(struct blktap_status, device_openers);
  OFF(struct blktap_status, capacity_sectors), OFF(struct blktap_status, requests_outstanding);
  OFF(struct blktap_status, requests_completed), OFF(struct blktap_status, requests_failed);
  OFF(struct blktap_status, requests_reissued), OFF(struct blktap_status, protocol_errors);
  OFF(struct blktap_status, ring_opens), OFF(struct blktap_status, geometry);
  close_obj();
  close_obj();
}

static void blktap_numbers(void) {
  open_obj("constants");
  num("ABI_VERSION", BLKTAP_ABI_VERSION), num("MINORS_MAX", BLKTAP_MINORS_MAX);
  num("RING_ORDER_MAX", BLKTAP_RING_ORDER_MAX), num("SEGMENTS_MAX", BLKTAP_SEGMENTS_MAX);
  num("OP_READ", BLKTAP_OP_READ), num("OP_WRITE", BLKTAP_OP_WRITE);
  num("OP_WRITE_BARRIER", BLKTAP_OP_WRITE_BARRIER);
  num("OP_FLUSH_DISKCACHE", BLKTAP_OP_FLUSH_DISKCACHE);
  num("OP_RESERVED_1", BLKTAP_OP_RESERVED_1), num("OP_DISCARD", BLKTAP_OP_DISCARD);
  num("OP_INDIRECT", BLKTAP_OP_INDIRECT), num("OP_BLOCK_STATUS", BLKTAP_OP_BLOCK_STATUS);
  num("RSP_OKAY", BLKTAP_RSP_OKAY), num("RSP_ERROR", BLKTAP_RSP_ERROR);
  num("RSP_EOPNOTSUPP", BLKTAP_RSP_EOPNOTSUPP);
  num("DIRECT_SEGMENTS_MAX", BLKTAP_DIRECT_SEGMENTS_MAX);
  num("INDIRECT_PAGES_MAX", BLKTAP_INDIRECT_PAGES_MAX);
  num("SEGMENTS_PER_INDIRECT_PAGE", BLKTAP_SEGMENTS_PER_INDIRECT_PAGE);
  num("DISCARD_SECURE", BLKTAP_DISCARD_SECURE);
  num("DEVICE_READONLY", BLKTAP_DEVICE_READONLY), num("DEVICE_FLUSH", BLKTAP_DEVICE_FLUSH);
  num("DEVICE_DISCARD", BLKTAP_DEVICE_DISCARD);
  num("STATE_DEVICE", BLKTAP_STATE_DEVICE), num("STATE_RING_OPEN", BLKTAP_STATE_RING_OPEN);
  num("STATE_RING_ERROR", BLKTAP_STATE_RING_ERROR), num("STATE_FAILED", BLKTAP_STATE_FAILED);
  num("STATE_REMOVING", BLKTAP_STATE_REMOVING);
  num("RING_ERROR_RSP_PROD", BLKTAP_RING_ERROR_RSP_PROD), num("RING_ERROR_ID", BLKTAP_RING_ERROR_ID);
  num("RING_ERROR_DUPLICATE", BLKTAP_RING_ERROR_DUPLICATE);
  num("RING_ERROR_OPERATION", BLKTAP_RING_ERROR_OPERATION);
  num("RING_ERROR_STATUS", BLKTAP_RING_ERROR_STATUS);
  close_obj();
  open_obj("ioctls");
  num("CTL_VERSION", BLKTAP_CTL_VERSION), num("CTL_ALLOC", BLKTAP_CTL_ALLOC);
  num("CTL_FREE", BLKTAP_CTL_FREE), num("CTL_CREATE_DEVICE", BLKTAP_CTL_CREATE_DEVICE);
  num("CTL_REMOVE_DEVICE", BLKTAP_CTL_REMOVE_DEVICE), num("CTL_STATUS", BLKTAP_CTL_STATUS);
  num("CTL_FAIL", BLKTAP_CTL_FAIL), num("IOC_GEOMETRY", BLKTAP_IOC_GEOMETRY);
  num("IOC_RESPOND", BLKTAP_IOC_RESPOND);
  close_obj();
  key("names");
  printf("{\"control\": \"%s\", \"ring\": \"%s\", \"disk\": \"%s\"}", BLKTAP_CONTROL_NAME,
         BLKTAP_RING_NAME, BLKTAP_DISK_NAME);
}

int main(void) {
  open_obj(NULL);
  xen();
  open_obj("blktap");
  BLKIF_LAYOUT(struct blktap_sring, struct blktap_blkif_request, struct blktap_blkif_segment,
               struct blktap_blkif_request_discard, struct blktap_blkif_request_indirect,
               struct blktap_blkif_response);
  num("sring_header_bytes", sizeof(struct blktap_sring));
  num("sring_entry_bytes", BLKTAP_RING_ENTRY_BYTES);
  blktap_structs();
  blktap_numbers();
  close_obj();
  close_obj();
  printf("\n");
  return 0;
}
