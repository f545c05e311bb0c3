/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * blktap_abi.h - the user ABI of the blktap kernel module, the single source
 * of its numbers: device names, ioctl numbers, the structures they carry and
 * the ring between the module and a disk process.
 *
 * Devices:
 *   /dev/blktap-control  misc device: allocate and free minors, create and
 *                        remove their block devices, query their status.
 *   /dev/blktapN         the ring device of minor N, opened by the disk
 *                        process (one opener at a time). mmap() of exactly
 *                        `mmap_bytes` at offset 0 maps the ring pages, then
 *                        the data pool. poll() is readable when requests
 *                        were published (read() returns and clears the
 *                        8-byte count of such events), POLLERR once the
 *                        disk process broke the ring protocol.
 *                        BLKTAP_IOC_RESPOND says "responses published".
 *   /dev/tapdevN         the block device whose requests travel the ring.
 *
 * The ring is Xen's blkif ring (xen/include/public/io/blkif.h and
 * io/ring.h, x86_64 layout, little-endian) byte for byte: the module is the
 * front end, the disk process the back end. A segment's `gref` is a page
 * number inside the data pool. The pool is cut into one slot per blk-mq tag:
 * slot s is pages [s * slot_pages, (s + 1) * slot_pages), its first
 * `segments_max` pages hold the request's data (contiguous from page 0,
 * offset 0), its last page the segment descriptors of an indirect request.
 *
 * Every structure has fixed-width fields, explicit padding and a stated
 * size (checked below and by tests/kernel/abi_test.ts).
 */
#ifndef BLKTAP_ABI_H
#define BLKTAP_ABI_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* Bumped on any incompatible change; BLKTAP_CTL_VERSION returns it. */
#define BLKTAP_ABI_VERSION 1

#define BLKTAP_CONTROL_NAME "blktap-control"
#define BLKTAP_RING_NAME "blktap"   /* /dev/blktapN */
#define BLKTAP_DISK_NAME "tapdev"   /* /dev/tapdevN */

/* Minors 0 .. BLKTAP_MINORS_MAX - 1. */
#define BLKTAP_MINORS_MAX 256
#define BLKTAP_PAGE_BYTES 4096
#define BLKTAP_SECTOR_BYTES 512
/* Ring pages are 1 << ring_order, as Xen's ring-page-order. */
#define BLKTAP_RING_ORDER_MAX 4
/* Largest request in data pages (the disk process's indirect limit: 1 MiB). */
#define BLKTAP_SEGMENTS_MAX 256

/* ---- the Xen blkif ring (Xen's names with a BLKTAP_ prefix) ----------- */

#define BLKTAP_OP_READ 0
#define BLKTAP_OP_WRITE 1
#define BLKTAP_OP_WRITE_BARRIER 2
#define BLKTAP_OP_FLUSH_DISKCACHE 3
#define BLKTAP_OP_RESERVED_1 4
#define BLKTAP_OP_DISCARD 5
#define BLKTAP_OP_INDIRECT 6
/* blktap's own: block status (src/ring/block_status.ts); the module never issues it. */
#define BLKTAP_OP_BLOCK_STATUS 0x80

#define BLKTAP_RSP_EOPNOTSUPP (-2)
#define BLKTAP_RSP_ERROR (-1)
#define BLKTAP_RSP_OKAY 0

#define BLKTAP_DIRECT_SEGMENTS_MAX 11
/* blkif_request_discard.flag: secure erase (the module never asks for it). */
#define BLKTAP_DISCARD_SECURE 1
#define BLKTAP_INDIRECT_PAGES_MAX 8
/* Segment descriptors per indirect page: PAGE_SIZE / sizeof(segment). */
#define BLKTAP_SEGMENTS_PER_INDIRECT_PAGE 512

/* struct blkif_sring: header, then entries from offset 64. */
struct blktap_sring {
	__u32 req_prod;
	__u32 req_event;
	__u32 rsp_prod;
	__u32 rsp_event;
	__u8 pvt[4];
	__u8 pad[44];
};
#define BLKTAP_SRING_HEADER_BYTES 64
/* sizeof(union blkif_sring_entry): entry count = (bytes - 64) / 112, to 2^n. */
#define BLKTAP_RING_ENTRY_BYTES 112

struct blktap_blkif_segment {
	__u32 gref;      /* page number in the data pool */
	__u8 first_sect; /* 0..7 */
	__u8 last_sect;  /* first_sect..7 */
	__u16 pad;
};

/* READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE. */
struct blktap_blkif_request {
	__u8 operation;
	__u8 nr_segments;
	__u16 handle;
	__u32 pad;
	__u64 id;
	__u64 sector_number;
	struct blktap_blkif_segment seg[BLKTAP_DIRECT_SEGMENTS_MAX];
};

struct blktap_blkif_request_discard {
	__u8 operation; /* BLKTAP_OP_DISCARD */
	__u8 flag;
	__u16 handle;
	__u32 pad;
	__u64 id;
	__u64 sector_number;
	__u64 nr_sectors;
};

struct blktap_blkif_request_indirect {
	__u8 operation; /* BLKTAP_OP_INDIRECT */
	__u8 indirect_op;
	__u16 nr_segments;
	__u32 pad1;
	__u64 id;
	__u64 sector_number;
	__u16 handle;
	__u16 pad2;
	__u32 indirect_grefs[BLKTAP_INDIRECT_PAGES_MAX];
	__u32 pad3;
};

struct blktap_blkif_response {
	__u64 id;
	__u8 operation;
	__u8 pad;
	__s16 status;
	__u32 pad2;
};

/* ---- /dev/blktap-control --------------------------------------------- */

/* BLKTAP_CTL_ALLOC: in the ring geometry, out the new minor. */
struct blktap_alloc {
	__u32 minor;        /* out */
	__u32 ring_order;   /* in: 0..BLKTAP_RING_ORDER_MAX */
	__u32 segments_max; /* in: 1..BLKTAP_SEGMENTS_MAX, largest request in pages */
	__u32 queue_depth;  /* in: 1..ring entries, 0 = ring entries */
};

/* What /dev/blktapN maps (BLKTAP_IOC_GEOMETRY; also in the status). */
struct blktap_geometry {
	__u32 ring_pages;
	__u32 ring_entries;
	__u32 queue_depth;  /* pool slots = blk-mq tags */
	__u32 segments_max;
	__u32 slot_pages;   /* segments_max data pages + 1 indirect page */
	__u32 pool_pages;   /* queue_depth * slot_pages */
	__u64 mmap_bytes;   /* (ring_pages + pool_pages) * 4096 */
};

#define BLKTAP_DEVICE_READONLY (1u << 0)
#define BLKTAP_DEVICE_FLUSH (1u << 1)   /* volatile cache: REQ_OP_FLUSH -> FLUSH_DISKCACHE */
#define BLKTAP_DEVICE_DISCARD (1u << 2) /* REQ_OP_DISCARD -> DISCARD */
#define BLKTAP_DEVICE_FLAGS_ALL (BLKTAP_DEVICE_READONLY | BLKTAP_DEVICE_FLUSH | BLKTAP_DEVICE_DISCARD)

/* BLKTAP_CTL_CREATE_DEVICE: make /dev/tapdevN. */
struct blktap_device_params {
	__u32 minor;
	__u32 flags;                /* BLKTAP_DEVICE_* */
	__u64 capacity_sectors;     /* 512-byte sectors */
	__u32 logical_block_bytes;  /* 512..4096, a power of two */
	__u32 physical_block_bytes; /* logical..65536, a power of two */
	__u32 discard_granularity_bytes; /* 0: the physical block size */
	__u32 pad;
};

/* blktap_status.state bits. */
#define BLKTAP_STATE_DEVICE (1u << 0)     /* /dev/tapdevN exists */
#define BLKTAP_STATE_RING_OPEN (1u << 1)  /* a disk process holds /dev/blktapN */
#define BLKTAP_STATE_RING_ERROR (1u << 2) /* that process broke the protocol */
#define BLKTAP_STATE_FAILED (1u << 3)     /* BLKTAP_CTL_FAIL: every request fails */
#define BLKTAP_STATE_REMOVING (1u << 4)   /* the block device is being removed */

/* blktap_status.ring_error: why the ring went to the error state (last time). */
#define BLKTAP_RING_ERROR_NONE 0
#define BLKTAP_RING_ERROR_RSP_PROD 1  /* rsp_prod beyond the requests published */
#define BLKTAP_RING_ERROR_ID 2        /* a response id that names no request */
#define BLKTAP_RING_ERROR_DUPLICATE 3 /* a second response to an answered request */
#define BLKTAP_RING_ERROR_OPERATION 4 /* operation differs from the request's */
#define BLKTAP_RING_ERROR_STATUS 5    /* status not OKAY, ERROR or EOPNOTSUPP */

/* BLKTAP_CTL_STATUS: in `minor`, out the rest. Counters count since alloc. */
struct blktap_status {
	__u32 minor;
	__u32 state;          /* BLKTAP_STATE_* */
	__u32 ring_error;     /* BLKTAP_RING_ERROR_* of the last protocol error */
	__u32 device_openers; /* opens of /dev/tapdevN */
	__u64 capacity_sectors;
	__u64 requests_outstanding; /* taken from the block layer, not yet answered */
	__u64 requests_completed;   /* answered (any status) */
	__u64 requests_failed;      /* answered with an error, or failed by the module */
	__u64 requests_reissued;    /* published again to a new disk process */
	__u64 protocol_errors;
	__u64 ring_opens;
	struct blktap_geometry geometry;
	__u64 reserved[3];
};

#define BLKTAP_IOCTL_MAGIC 0xB7

/* Returns BLKTAP_ABI_VERSION. */
#define BLKTAP_CTL_VERSION _IO(BLKTAP_IOCTL_MAGIC, 0x00)
/* Allocates a minor and its ring memory; /dev/blktapN appears. */
#define BLKTAP_CTL_ALLOC _IOWR(BLKTAP_IOCTL_MAGIC, 0x01, struct blktap_alloc)
/* Frees minor `arg`: EBUSY while its block device exists or its ring is open. */
#define BLKTAP_CTL_FREE _IO(BLKTAP_IOCTL_MAGIC, 0x02)
/* Creates /dev/tapdevN: EEXIST if it exists. */
#define BLKTAP_CTL_CREATE_DEVICE _IOW(BLKTAP_IOCTL_MAGIC, 0x03, struct blktap_device_params)
/* Removes /dev/tapdevN of minor `arg`: EBUSY while it is open. */
#define BLKTAP_CTL_REMOVE_DEVICE _IO(BLKTAP_IOCTL_MAGIC, 0x04)
#define BLKTAP_CTL_STATUS _IOWR(BLKTAP_IOCTL_MAGIC, 0x05, struct blktap_status)
/* Minor `arg` has no disk process any more (its supervisor gave up): every
 * held and every later request completes with an I/O error. */
#define BLKTAP_CTL_FAIL _IO(BLKTAP_IOCTL_MAGIC, 0x06)

/* ---- /dev/blktapN ---------------------------------------------------- */

#define BLKTAP_IOC_GEOMETRY _IOR(BLKTAP_IOCTL_MAGIC, 0x10, struct blktap_geometry)
/* Responses were published: the module consumes them. Returns how many,
 * or -EBADMSG once a response broke the protocol (the ring is then in the
 * error state until the file is closed; BLKTAP_CTL_STATUS says why). */
#define BLKTAP_IOC_RESPOND _IO(BLKTAP_IOCTL_MAGIC, 0x11)

/* ---- stated sizes ----------------------------------------------------- */

#ifdef __cplusplus
#define BLKTAP_STATIC_ASSERT static_assert
#else
#define BLKTAP_STATIC_ASSERT _Static_assert
#endif
BLKTAP_STATIC_ASSERT(sizeof(struct blktap_sring) == BLKTAP_SRING_HEADER_BYTES, "sring header");
BLKTAP_STATIC_ASSERT(sizeof(struct blktap_blkif_segment) == 8, "segment");
BLKTAP_STATIC_ASSERT(sizeof(struct blktap_blkif_request) == BLKTAP_RING_ENTRY_BYTES, "request");
BLKTAP_STATIC_ASSERT(sizeof(struct blktap_blkif_request_discard) == 32, "discard");
BLKTAP_STATIC_ASSERT(sizeof(struct blktap_blkif_request_indirect) == 64, "indirect");
BLKTAP_STATIC_ASSERT(sizeof(struct blktap_blkif_response) == 16, "response");
BLKTAP_STATIC_ASSERT(sizeof(struct blktap_alloc) == 16, "alloc");
BLKTAP_STATIC_ASSERT(sizeof(struct blktap_geometry) == 32, "geometry");
BLKTAP_STATIC_ASSERT(sizeof(struct blktap_device_params) == 32, "device params");
BLKTAP_STATIC_ASSERT(sizeof(struct blktap_status) == 128, "status");
BLKTAP_STATIC_ASSERT(BLKTAP_SEGMENTS_PER_INDIRECT_PAGE * sizeof(struct blktap_blkif_segment) ==
			     BLKTAP_PAGE_BYTES,
		     "indirect page");

#endif /* BLKTAP_ABI_H */
