// SPDX-License-Identifier: GPL-2.0
/*
 * blktap.c - block devices served from userspace over a Xen blkif ring.
 *
 * Every minor N has a ring device /dev/blktapN, which one disk process opens
 * and maps (ring pages, then a data pool), and once its size is known a
 * blk-mq block device /dev/tapdevN. A block request is copied into the pool
 * slot of its tag (writes), described by a blkif request on the ring and
 * answered by the disk process with a blkif response; reads are copied back
 * from the pool. The user ABI is in blktap_abi.h.
 *
 * The disk process is untrusted: the module writes the ring and never reads
 * back what it wrote; it reads only rsp_prod, req_event and response entries,
 * each once, and checks them against its own record of what it published.
 * A response that names no published request, answers one twice, carries
 * another operation or an unknown status, or a rsp_prod beyond what was
 * published, puts the ring in an error state: nothing more is read from it,
 * BLKTAP_IOC_RESPOND fails with EBADMSG and poll() reports POLLERR.
 *
 * A disk process that goes away fails nothing: the requests it had not
 * answered are held, and published again (re-copied, in their first issue
 * order) to the next process that opens the ring. Only BLKTAP_CTL_FAIL, or
 * removing the block device while no process serves it, fails them.
 *
 * Locking: tap_mutex serialises the control operations and the opening and
 * closing of ring devices; a minor's spinlock guards its ring indexes, its
 * slots and its counters. queue_rq takes only the spinlock and never
 * sleeps. Requests are completed outside the spinlock.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/cdev.h>
#include <linux/device.h>
#include <linux/fs.h>
#include <linux/log2.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>
#include <linux/wait.h>

#include "blktap_abi.h"

/* Largest data pool of one minor, in pages (256 MiB). */
#define POOL_PAGES_MAX 65536
/* A response id is (issue sequence << ID_TAG_BITS) | tag. */
#define ID_TAG_BITS 16
#define ID_TAG_MASK ((1u << ID_TAG_BITS) - 1)

enum slot_state {
	SLOT_FREE,	/* no request */
	SLOT_HELD,	/* taken from the block layer, not on the current ring */
	SLOT_PUBLISHED, /* written into the current ring */
};

/* One blk-mq tag: its request and what was (or will be) published for it. */
struct tap_slot {
	struct request *rq;
	u64 id;
	u64 seq;
	sector_t sector;
	u32 bytes;	/* data bytes (read, write) */
	u32 nr_sectors; /* discard */
	u16 pages;	/* data pages used, from the slot's first page */
	u8 state;
	u8 operation;	/* as on the ring: INDIRECT for requests over 11 pages */
	u8 data_op;	/* READ, WRITE, FLUSH_DISKCACHE or DISCARD */
	bool reissue;	/* published before: the next publication is a re-issue */
	s16 status;	/* response status, while being completed */
	int done_next;	/* completion list link */
};

struct tap_minor {
	unsigned int minor;
	struct blktap_geometry geo;
	void *mem;			/* vmalloc_user: ring pages, then the pool */
	struct blktap_sring *sring;	/* == mem */
	u8 *pool;
	struct tap_slot *slots;		/* geo.queue_depth */
	u16 *order;			/* scratch for re-publishing, under tap_mutex */
	struct device *ring_dev;

	spinlock_t lock;
	wait_queue_head_t wq;
	bool ring_open;			/* under tap_mutex and lock */
	bool ring_live;			/* requests are published to the ring */
	u32 ring_error;			/* BLKTAP_RING_ERROR_* of the current opener */
	u32 last_ring_error;
	u32 req_prod_pvt;		/* requests written */
	u32 req_prod_pub;		/* requests published (our copy of req_prod) */
	u32 rsp_cons;			/* responses consumed */
	u64 events;			/* notifications not yet read */
	u64 next_seq;
	bool failed;			/* BLKTAP_CTL_FAIL */
	bool removing;			/* the block device is going away */
	u64 outstanding, completed, failed_count, reissued, protocol_errors, ring_opens;

	/* The block device: set and cleared under tap_mutex. */
	struct blk_mq_tag_set tag_set;
	struct gendisk *disk;
	bool disk_busy;			/* being created or removed */
	unsigned int bd_openers;	/* under disk->open_mutex */
};

static DEFINE_MUTEX(tap_mutex);
static struct tap_minor *tap_minors[BLKTAP_MINORS_MAX];
static int tapdev_major;
static dev_t ring_devt;
static struct cdev ring_cdev;
static struct class *ring_class;

/* ---- the ring ---------------------------------------------------------- */

static unsigned int ring_entries_for(unsigned int ring_bytes)
{
	return rounddown_pow_of_two((ring_bytes - BLKTAP_SRING_HEADER_BYTES) /
				    BLKTAP_RING_ENTRY_BYTES);
}

static void *ring_entry(struct tap_minor *m, u32 index)
{
	return (u8 *)m->mem + BLKTAP_SRING_HEADER_BYTES +
	       (size_t)(index & (m->geo.ring_entries - 1)) * BLKTAP_RING_ENTRY_BYTES;
}

static u32 slot_first_page(struct tap_minor *m, unsigned int tag)
{
	return tag * m->geo.slot_pages;
}

static u8 *slot_data(struct tap_minor *m, unsigned int tag)
{
	return m->pool + (size_t)slot_first_page(m, tag) * PAGE_SIZE;
}

/* SHARED_RING_INIT and FRONT_RING_INIT over the whole ring area. */
static void ring_reset(struct tap_minor *m)
{
	memset(m->mem, 0, (size_t)m->geo.ring_pages * PAGE_SIZE);
	m->sring->req_event = 1;
	m->sring->rsp_event = 1;
	m->req_prod_pvt = 0;
	m->req_prod_pub = 0;
	m->rsp_cons = 0;
}

static void segment_of_page(struct tap_slot *s, u32 first_page, unsigned int i,
			    struct blktap_blkif_segment *seg)
{
	u32 in_page = min_t(u32, PAGE_SIZE, s->bytes - i * PAGE_SIZE);

	seg->gref = first_page + i;
	seg->first_sect = 0;
	seg->last_sect = in_page / BLKTAP_SECTOR_BYTES - 1;
	seg->pad = 0;
}

/* Writes slot `tag`'s request at req_prod_pvt (not yet published). */
static void ring_write_request(struct tap_minor *m, unsigned int tag)
{
	struct tap_slot *s = &m->slots[tag];
	u32 first = slot_first_page(m, tag);
	union {
		struct blktap_blkif_request rw;
		struct blktap_blkif_request_discard discard;
		struct blktap_blkif_request_indirect indirect;
		u8 bytes[BLKTAP_RING_ENTRY_BYTES];
	} r;
	unsigned int i;

	memset(&r, 0, sizeof(r));
	if (s->operation == BLKTAP_OP_DISCARD) {
		r.discard.operation = BLKTAP_OP_DISCARD;
		r.discard.id = s->id;
		r.discard.sector_number = s->sector;
		r.discard.nr_sectors = s->nr_sectors;
	} else if (s->operation == BLKTAP_OP_INDIRECT) {
		struct blktap_blkif_segment *segs =
			(void *)(m->pool + (size_t)(first + m->geo.segments_max) * PAGE_SIZE);

		r.indirect.operation = BLKTAP_OP_INDIRECT;
		r.indirect.indirect_op = s->data_op;
		r.indirect.nr_segments = s->pages;
		r.indirect.id = s->id;
		r.indirect.sector_number = s->sector;
		r.indirect.indirect_grefs[0] = first + m->geo.segments_max;
		for (i = 0; i < s->pages; i++)
			segment_of_page(s, first, i, &segs[i]);
	} else {
		r.rw.operation = s->operation;
		r.rw.nr_segments = s->pages;
		r.rw.id = s->id;
		r.rw.sector_number = s->sector;
		for (i = 0; i < s->pages; i++)
			segment_of_page(s, first, i, &r.rw.seg[i]);
	}
	memcpy(ring_entry(m, m->req_prod_pvt), &r, sizeof(r));
	m->req_prod_pvt++;
	s->state = SLOT_PUBLISHED;
	if (s->reissue)
		m->reissued++;
	s->reissue = true;
}

/* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, with our own copy of req_prod. */
static bool ring_push(struct tap_minor *m)
{
	u32 old = m->req_prod_pub, new = m->req_prod_pvt;

	if (old == new)
		return false;
	smp_wmb(); /* requests before req_prod */
	WRITE_ONCE(m->sring->req_prod, new);
	m->req_prod_pub = new;
	smp_mb(); /* req_prod before reading req_event */
	return (u32)(new - READ_ONCE(m->sring->req_event)) < (u32)(new - old);
}

static void ring_notify_locked(struct tap_minor *m)
{
	m->events++;
}

static void ring_wake(struct tap_minor *m)
{
	wake_up_interruptible(&m->wq);
}

static const char *const ring_error_names[] = {
	[BLKTAP_RING_ERROR_NONE] = "none",
	[BLKTAP_RING_ERROR_RSP_PROD] = "rsp_prod beyond the published requests",
	[BLKTAP_RING_ERROR_ID] = "a response id that names no request",
	[BLKTAP_RING_ERROR_DUPLICATE] = "a second response to one request",
	[BLKTAP_RING_ERROR_OPERATION] = "a response with another operation",
	[BLKTAP_RING_ERROR_STATUS] = "an unknown response status",
};

static void ring_fail_locked(struct tap_minor *m, u32 reason, u64 id)
{
	m->ring_error = reason;
	m->last_ring_error = reason;
	m->protocol_errors++;
	pr_notice_ratelimited("blktap%u: disk process broke the ring protocol (%s, id %llu); its requests are held for the next one\n",
			      m->minor, ring_error_names[reason], id);
}

/* ---- requests ---------------------------------------------------------- */

static void copy_request_data(struct request *rq, u8 *buf, bool to_pool)
{
	struct req_iterator iter;
	struct bio_vec bv;
	size_t at = 0;

	rq_for_each_segment(bv, rq, iter) {
		if (to_pool)
			memcpy_from_bvec(buf + at, &bv);
		else
			memcpy_to_bvec(&bv, buf + at);
		at += bv.bv_len;
	}
}

/* Fills slot `tag` from `rq` and copies a write's data into the pool. */
static blk_status_t slot_prepare(struct tap_minor *m, unsigned int tag, struct request *rq)
{
	struct tap_slot *s = &m->slots[tag];
	u32 bytes = 0;

	switch (req_op(rq)) {
	case REQ_OP_READ:
		s->data_op = BLKTAP_OP_READ;
		bytes = blk_rq_bytes(rq);
		break;
	case REQ_OP_WRITE:
		s->data_op = BLKTAP_OP_WRITE;
		bytes = blk_rq_bytes(rq);
		break;
	case REQ_OP_FLUSH:
		s->data_op = BLKTAP_OP_FLUSH_DISKCACHE;
		break;
	case REQ_OP_DISCARD:
		s->data_op = BLKTAP_OP_DISCARD;
		s->nr_sectors = blk_rq_sectors(rq);
		break;
	default:
		return BLK_STS_NOTSUPP;
	}
	if (bytes % BLKTAP_SECTOR_BYTES ||
	    bytes > m->geo.segments_max * PAGE_SIZE ||
	    ((s->data_op == BLKTAP_OP_READ || s->data_op == BLKTAP_OP_WRITE) && !bytes))
		return BLK_STS_IOERR; /* the queue limits forbid it */
	s->sector = blk_rq_pos(rq);
	s->bytes = bytes;
	s->pages = DIV_ROUND_UP(bytes, PAGE_SIZE);
	s->operation = s->pages > BLKTAP_DIRECT_SEGMENTS_MAX ? BLKTAP_OP_INDIRECT : s->data_op;
	if (s->data_op == BLKTAP_OP_WRITE)
		copy_request_data(rq, slot_data(m, tag), true);
	return BLK_STS_OK;
}

static blk_status_t status_of(s16 status)
{
	if (status == BLKTAP_RSP_OKAY)
		return BLK_STS_OK;
	if (status == BLKTAP_RSP_EOPNOTSUPP)
		return BLK_STS_NOTSUPP;
	return BLK_STS_IOERR;
}

/* Ends the requests of the slots on the list from `head` (already FREE). */
static void complete_list(struct tap_minor *m, int head)
{
	while (head >= 0) {
		struct tap_slot *s = &m->slots[head];
		struct request *rq = s->rq;
		int next = s->done_next;

		if (s->status == BLKTAP_RSP_OKAY && s->data_op == BLKTAP_OP_READ)
			copy_request_data(rq, slot_data(m, head), false);
		blk_mq_end_request(rq, status_of(s->status));
		head = next;
	}
}

/* Takes slot `tag` off the books with `status`; appends it to the list. */
static void slot_finish_locked(struct tap_minor *m, unsigned int tag, s16 status, int **tail)
{
	struct tap_slot *s = &m->slots[tag];

	s->state = SLOT_FREE;
	s->status = status;
	s->done_next = -1;
	**tail = tag;
	*tail = &s->done_next;
	m->outstanding--;
	m->completed++;
	if (status != BLKTAP_RSP_OKAY)
		m->failed_count++;
}

/* Fails every request the module holds (FAIL, or removal without a server). */
static void fail_held(struct tap_minor *m)
{
	int head = -1, *tail = &head;
	unsigned int tag;

	spin_lock(&m->lock);
	for (tag = 0; tag < m->geo.queue_depth; tag++)
		if (m->slots[tag].state != SLOT_FREE)
			slot_finish_locked(m, tag, BLKTAP_RSP_ERROR, &tail);
	spin_unlock(&m->lock);
	complete_list(m, head);
}

static blk_status_t tap_queue_rq(struct blk_mq_hw_ctx *hctx, const struct blk_mq_queue_data *bd)
{
	struct tap_minor *m = hctx->queue->queuedata;
	struct request *rq = bd->rq;
	unsigned int tag = rq->tag;
	struct tap_slot *s;
	blk_status_t status;
	bool notify = false;

	if (tag >= m->geo.queue_depth)
		return BLK_STS_IOERR;
	s = &m->slots[tag];
	if (READ_ONCE(s->state) != SLOT_FREE) {
		pr_err_ratelimited("blktap%u: tag %u issued while in use\n", m->minor, tag);
		return BLK_STS_IOERR;
	}
	status = slot_prepare(m, tag, rq);
	if (status != BLK_STS_OK)
		return status;
	blk_mq_start_request(rq);

	spin_lock(&m->lock);
	/* Removal with no disk process: nothing would ever answer. */
	if (m->failed || (m->removing && !m->ring_live)) {
		spin_unlock(&m->lock);
		return BLK_STS_IOERR;
	}
	s->rq = rq;
	s->seq = ++m->next_seq;
	s->id = (s->seq << ID_TAG_BITS) | tag;
	s->state = SLOT_HELD;
	s->reissue = false;
	m->outstanding++;
	if (m->ring_live && !m->ring_error) {
		ring_write_request(m, tag);
		if (bd->last && ring_push(m)) {
			ring_notify_locked(m);
			notify = true;
		}
	}
	spin_unlock(&m->lock);
	if (notify)
		ring_wake(m);
	return BLK_STS_OK;
}

/* The block layer ends a batch without `last`: publish what was written. */
static void tap_commit_rqs(struct blk_mq_hw_ctx *hctx)
{
	struct tap_minor *m = hctx->queue->queuedata;
	bool notify = false;

	spin_lock(&m->lock);
	if (m->ring_live && !m->ring_error && ring_push(m)) {
		ring_notify_locked(m);
		notify = true;
	}
	spin_unlock(&m->lock);
	if (notify)
		ring_wake(m);
}

/* A disk process restarting may take a while: time never fails a request. */
static enum blk_eh_timer_return tap_timeout(struct request *rq)
{
	return BLK_EH_RESET_TIMER;
}

static const struct blk_mq_ops tap_mq_ops = {
	.queue_rq = tap_queue_rq,
	.commit_rqs = tap_commit_rqs,
	.timeout = tap_timeout,
};

/* ---- responses --------------------------------------------------------- */

/* 0 if `rsp` answers a published request of slot `*tag`, else the error. */
static u32 check_response(struct tap_minor *m, u64 id, u8 operation, s16 status,
			  unsigned int *tag)
{
	struct tap_slot *s;

	*tag = id & ID_TAG_MASK;
	if (*tag >= m->geo.queue_depth)
		return BLKTAP_RING_ERROR_ID;
	s = &m->slots[*tag];
	if (s->id != id)
		return BLKTAP_RING_ERROR_ID;
	if (s->state != SLOT_PUBLISHED)
		return BLKTAP_RING_ERROR_DUPLICATE;
	if (operation != s->operation)
		return BLKTAP_RING_ERROR_OPERATION;
	if (status != BLKTAP_RSP_OKAY && status != BLKTAP_RSP_ERROR &&
	    status != BLKTAP_RSP_EOPNOTSUPP)
		return BLKTAP_RING_ERROR_STATUS;
	return 0;
}

/* Reads the response at rsp_cons once; 0 or the protocol error it is. */
static u32 take_response(struct tap_minor *m, unsigned int *tag, s16 *status, u64 *id)
{
	struct blktap_blkif_response *r = ring_entry(m, m->rsp_cons);
	u8 operation = READ_ONCE(r->operation);

	*id = READ_ONCE(r->id);
	*status = READ_ONCE(r->status);
	return check_response(m, *id, operation, *status, tag);
}

/*
 * Consumes the published responses (RING_FINAL_CHECK_FOR_RESPONSES loop).
 * A rsp_prod more than a ring ahead is refused before any entry is read;
 * within the ring every entry is checked, so an extra response is reported
 * as what it is (a duplicate, usually): no published slot matches it.
 */
static long ring_consume_locked(struct tap_minor *m, int **tail)
{
	long count = 0;
	u32 prod;

	do {
		prod = READ_ONCE(m->sring->rsp_prod);
		smp_rmb(); /* rsp_prod before the responses */
		if ((u32)(prod - m->rsp_cons) > m->geo.ring_entries) {
			ring_fail_locked(m, BLKTAP_RING_ERROR_RSP_PROD, prod);
			return -EBADMSG;
		}
		while (m->rsp_cons != prod) {
			unsigned int tag;
			s16 status;
			u64 id;
			u32 error = take_response(m, &tag, &status, &id);

			if (error) {
				ring_fail_locked(m, error, id);
				return -EBADMSG;
			}
			slot_finish_locked(m, tag, status, tail);
			m->rsp_cons++;
			count++;
		}
		WRITE_ONCE(m->sring->rsp_event, m->rsp_cons + 1);
		smp_mb(); /* rsp_event before reading rsp_prod again */
	} while (READ_ONCE(m->sring->rsp_prod) != m->rsp_cons);
	return count;
}

static long ring_respond(struct tap_minor *m)
{
	int head = -1, *tail = &head;
	long ret;

	spin_lock(&m->lock);
	if (m->ring_error)
		ret = -EBADMSG;
	else if (m->failed)
		ret = -EIO;
	else
		ret = ring_consume_locked(m, &tail);
	spin_unlock(&m->lock);
	complete_list(m, head);
	if (ret == -EBADMSG)
		ring_wake(m);
	return ret;
}

/* ---- /dev/blktapN ------------------------------------------------------ */

static int cmp_seq(const void *a, const void *b, const void *priv)
{
	const struct tap_slot *slots = priv;
	u64 x = slots[*(const u16 *)a].seq, y = slots[*(const u16 *)b].seq;

	return x < y ? -1 : x > y;
}

/*
 * A disk process opened the ring: re-initialise it and publish every held
 * request again, in first-issue order, with write data copied afresh from
 * the request (the previous process could write the pool). Under tap_mutex,
 * so no held request can be completed meanwhile.
 */
static void ring_attach(struct tap_minor *m)
{
	unsigned int tag, n = 0, i;

	spin_lock(&m->lock);
	for (tag = 0; tag < m->geo.queue_depth; tag++)
		if (m->slots[tag].state == SLOT_HELD)
			m->order[n++] = tag;
	spin_unlock(&m->lock);
	for (i = 0; i < n; i++) {
		struct tap_slot *s = &m->slots[m->order[i]];

		if (s->data_op == BLKTAP_OP_WRITE)
			copy_request_data(s->rq, slot_data(m, m->order[i]), true);
	}

	spin_lock(&m->lock);
	/* Requests queued since the scan have fresh data already. */
	n = 0;
	for (tag = 0; tag < m->geo.queue_depth; tag++)
		if (m->slots[tag].state == SLOT_HELD)
			m->order[n++] = tag;
	sort_r(m->order, n, sizeof(m->order[0]), cmp_seq, NULL, m->slots);
	ring_reset(m);
	for (i = 0; i < n; i++)
		ring_write_request(m, m->order[i]);
	ring_push(m);
	m->ring_live = true;
	m->ring_error = 0;
	m->ring_open = true;
	m->ring_opens++;
	m->events = 1; /* one look at the ring, whatever was published */
	spin_unlock(&m->lock);
}

static int ring_open(struct inode *inode, struct file *file)
{
	unsigned int minor = iminor(inode);
	struct tap_minor *m;
	int ret = 0;

	mutex_lock(&tap_mutex);
	m = minor < BLKTAP_MINORS_MAX ? tap_minors[minor] : NULL;
	if (!m)
		ret = -ENODEV;
	else if (m->ring_open)
		ret = -EBUSY;
	else
		ring_attach(m);
	mutex_unlock(&tap_mutex);
	if (ret)
		return ret;
	file->private_data = m;
	return 0;
}

/* The disk process is gone (file and mappings): hold what it did not answer. */
static int ring_release(struct inode *inode, struct file *file)
{
	struct tap_minor *m = file->private_data;
	unsigned int tag;
	bool drop;

	mutex_lock(&tap_mutex);
	spin_lock(&m->lock);
	m->ring_live = false;
	m->ring_open = false;
	m->ring_error = 0;
	m->events = 0;
	for (tag = 0; tag < m->geo.queue_depth; tag++)
		if (m->slots[tag].state == SLOT_PUBLISHED)
			m->slots[tag].state = SLOT_HELD;
	drop = m->failed || m->removing;
	spin_unlock(&m->lock);
	if (drop)
		fail_held(m);
	mutex_unlock(&tap_mutex);
	return 0;
}

static int ring_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct tap_minor *m = file->private_data;

	if (vma->vm_pgoff != 0 || vma->vm_end - vma->vm_start != m->geo.mmap_bytes)
		return -EINVAL;
	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	/* A child must not keep the pool of a process that died. */
	vma->vm_flags |= VM_DONTCOPY;
	return remap_vmalloc_range(vma, m->mem, 0);
}

static __poll_t ring_poll(struct file *file, poll_table *wait)
{
	struct tap_minor *m = file->private_data;
	__poll_t mask = 0;

	poll_wait(file, &m->wq, wait);
	spin_lock(&m->lock);
	if (m->events)
		mask |= EPOLLIN | EPOLLRDNORM;
	if (m->ring_error || m->failed)
		mask |= EPOLLERR;
	spin_unlock(&m->lock);
	return mask;
}

/* Returns and clears the count of "requests published" events (8 bytes). */
static ssize_t ring_read(struct file *file, char __user *buf, size_t len, loff_t *ppos)
{
	struct tap_minor *m = file->private_data;
	u64 events;
	int ret;

	if (len < sizeof(events))
		return -EINVAL;
	for (;;) {
		spin_lock(&m->lock);
		events = m->events;
		m->events = 0;
		ret = m->ring_error ? -EBADMSG : 0;
		spin_unlock(&m->lock);
		if (events || ret)
			break;
		if (file->f_flags & O_NONBLOCK)
			return -EAGAIN;
		ret = wait_event_interruptible(m->wq, READ_ONCE(m->events) ||
						      READ_ONCE(m->ring_error));
		if (ret)
			return ret;
	}
	if (!events)
		return ret;
	if (put_user(events, (u64 __user *)buf)) {
		spin_lock(&m->lock);
		m->events += events;
		spin_unlock(&m->lock);
		return -EFAULT;
	}
	return sizeof(events);
}

static long ring_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct tap_minor *m = file->private_data;

	switch (cmd) {
	case BLKTAP_IOC_GEOMETRY:
		return copy_to_user((void __user *)arg, &m->geo, sizeof(m->geo)) ? -EFAULT : 0;
	case BLKTAP_IOC_RESPOND:
		return ring_respond(m);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations ring_fops = {
	.owner = THIS_MODULE,
	.open = ring_open,
	.release = ring_release,
	.mmap = ring_mmap,
	.poll = ring_poll,
	.read = ring_read,
	.unlocked_ioctl = ring_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = no_llseek,
};

/* ---- /dev/tapdevN ------------------------------------------------------ */

/* Called under disk->open_mutex, for every open and close of the disk. */
static int tapdev_open(struct block_device *bdev, fmode_t mode)
{
	struct tap_minor *m = bdev->bd_disk->private_data;

	if (READ_ONCE(m->removing))
		return -ENXIO;
	m->bd_openers++;
	return 0;
}

static void tapdev_release(struct gendisk *disk, fmode_t mode)
{
	struct tap_minor *m = disk->private_data;

	m->bd_openers--;
}

static const struct block_device_operations tapdev_fops = {
	.owner = THIS_MODULE,
	.open = tapdev_open,
	.release = tapdev_release,
};

/* ---- /dev/blktap-control ----------------------------------------------- */

static struct tap_minor *minor_get(unsigned long minor)
{
	lockdep_assert_held(&tap_mutex);
	return minor < BLKTAP_MINORS_MAX ? tap_minors[minor] : NULL;
}

static void minor_free(struct tap_minor *m)
{
	vfree(m->mem);
	kfree(m->order);
	kfree(m->slots);
	kfree(m);
}

static int geometry_from(const struct blktap_alloc *a, struct blktap_geometry *g)
{
	if (a->ring_order > BLKTAP_RING_ORDER_MAX || a->segments_max < 1 ||
	    a->segments_max > BLKTAP_SEGMENTS_MAX)
		return -EINVAL;
	g->ring_pages = 1u << a->ring_order;
	g->ring_entries = ring_entries_for(g->ring_pages * PAGE_SIZE);
	g->queue_depth = a->queue_depth ? a->queue_depth : g->ring_entries;
	if (g->queue_depth > g->ring_entries)
		return -EINVAL;
	g->segments_max = a->segments_max;
	g->slot_pages = a->segments_max + 1;
	if ((u64)g->queue_depth * g->slot_pages > POOL_PAGES_MAX)
		return -E2BIG;
	g->pool_pages = g->queue_depth * g->slot_pages;
	g->mmap_bytes = (u64)(g->ring_pages + g->pool_pages) * PAGE_SIZE;
	return 0;
}

static struct tap_minor *minor_alloc(const struct blktap_geometry *g)
{
	struct tap_minor *m = kzalloc(sizeof(*m), GFP_KERNEL);

	if (!m)
		return NULL;
	m->geo = *g;
	m->slots = kcalloc(g->queue_depth, sizeof(*m->slots), GFP_KERNEL);
	m->order = kcalloc(g->queue_depth, sizeof(*m->order), GFP_KERNEL);
	m->mem = vmalloc_user(g->mmap_bytes);
	if (!m->slots || !m->order || !m->mem) {
		minor_free(m);
		return NULL;
	}
	m->sring = m->mem;
	m->pool = (u8 *)m->mem + (size_t)g->ring_pages * PAGE_SIZE;
	spin_lock_init(&m->lock);
	init_waitqueue_head(&m->wq);
	ring_reset(m);
	return m;
}

static long ctl_alloc(struct blktap_alloc __user *uarg)
{
	struct blktap_alloc a;
	struct blktap_geometry g;
	struct tap_minor *m;
	unsigned int minor;
	int ret;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	ret = geometry_from(&a, &g);
	if (ret)
		return ret;
	m = minor_alloc(&g);
	if (!m)
		return -ENOMEM;
	mutex_lock(&tap_mutex);
	for (minor = 0; minor < BLKTAP_MINORS_MAX && tap_minors[minor]; minor++)
		;
	ret = minor < BLKTAP_MINORS_MAX ? 0 : -ENOSPC;
	if (!ret && !try_module_get(THIS_MODULE))
		ret = -ENODEV;
	if (!ret) {
		m->minor = minor;
		m->ring_dev = device_create(ring_class, NULL, MKDEV(MAJOR(ring_devt), minor), m,
					    BLKTAP_RING_NAME "%u", minor);
		if (IS_ERR(m->ring_dev)) {
			ret = PTR_ERR(m->ring_dev);
			module_put(THIS_MODULE);
		} else {
			tap_minors[minor] = m;
		}
	}
	mutex_unlock(&tap_mutex);
	if (ret) {
		minor_free(m);
		return ret;
	}
	a.minor = minor;
	return copy_to_user(uarg, &a, sizeof(a)) ? -EFAULT : 0;
}

static long ctl_free(unsigned long minor)
{
	struct tap_minor *m;
	long ret = 0;

	mutex_lock(&tap_mutex);
	m = minor_get(minor);
	if (!m)
		ret = -ENODEV;
	else if (m->disk || m->disk_busy || m->ring_open)
		ret = -EBUSY;
	else {
		device_destroy(ring_class, MKDEV(MAJOR(ring_devt), minor));
		tap_minors[minor] = NULL;
	}
	mutex_unlock(&tap_mutex);
	if (ret)
		return ret;
	minor_free(m);
	module_put(THIS_MODULE);
	return 0;
}

static int check_params(const struct blktap_device_params *p)
{
	u32 lbs = p->logical_block_bytes, pbs = p->physical_block_bytes;

	if (p->flags & ~BLKTAP_DEVICE_FLAGS_ALL || p->pad)
		return -EINVAL;
	if (!is_power_of_2(lbs) || lbs < 512 || lbs > PAGE_SIZE)
		return -EINVAL;
	if (!is_power_of_2(pbs) || pbs < lbs || pbs > 65536)
		return -EINVAL;
	if (p->discard_granularity_bytes &&
	    (!is_power_of_2(p->discard_granularity_bytes) || p->discard_granularity_bytes < lbs))
		return -EINVAL;
	if (p->capacity_sectors % (lbs / 512) || p->capacity_sectors > (U64_MAX >> 10))
		return -EINVAL;
	return 0;
}

static void set_limits(struct tap_minor *m, struct gendisk *disk, const struct blktap_device_params *p)
{
	struct request_queue *q = disk->queue;

	blk_queue_logical_block_size(q, p->logical_block_bytes);
	blk_queue_physical_block_size(q, p->physical_block_bytes);
	blk_queue_io_min(q, p->physical_block_bytes);
	blk_queue_max_hw_sectors(q, m->geo.segments_max * (PAGE_SIZE >> SECTOR_SHIFT));
	blk_queue_max_segments(q, m->geo.segments_max);
	blk_queue_flag_set(QUEUE_FLAG_NONROT, q);
	blk_queue_flag_clear(QUEUE_FLAG_ADD_RANDOM, q);
	blk_queue_write_cache(q, p->flags & BLKTAP_DEVICE_FLUSH, false);
	if (p->flags & BLKTAP_DEVICE_DISCARD) {
		blk_queue_max_discard_sectors(q, UINT_MAX >> SECTOR_SHIFT);
		q->limits.discard_granularity = p->discard_granularity_bytes ?
			p->discard_granularity_bytes : p->physical_block_bytes;
	}
	set_capacity(disk, p->capacity_sectors);
	set_disk_ro(disk, p->flags & BLKTAP_DEVICE_READONLY);
}

/* Builds and adds /dev/tapdevN; under tap_mutex with disk_busy set. */
static int device_create_disk(struct tap_minor *m, const struct blktap_device_params *p)
{
	struct blk_mq_tag_set *set = &m->tag_set;
	struct gendisk *disk;
	int ret;

	memset(set, 0, sizeof(*set));
	set->ops = &tap_mq_ops;
	set->nr_hw_queues = 1;
	set->queue_depth = m->geo.queue_depth;
	set->numa_node = NUMA_NO_NODE;
	/*
	 * Like loop: a device stacked on files whose own queues schedule;
	 * an elevator here only adds a lock and a sort per request.
	 * `echo mq-deadline >/sys/block/tapdevN/queue/scheduler` still works.
	 */
	set->flags = BLK_MQ_F_SHOULD_MERGE | BLK_MQ_F_NO_SCHED_BY_DEFAULT;
	set->driver_data = m;
	ret = blk_mq_alloc_tag_set(set);
	if (ret)
		return ret;
	disk = blk_mq_alloc_disk(set, m);
	if (IS_ERR(disk)) {
		blk_mq_free_tag_set(set);
		return PTR_ERR(disk);
	}
	disk->major = tapdev_major;
	disk->first_minor = m->minor;
	disk->minors = 1;
	disk->fops = &tapdev_fops;
	disk->private_data = m;
	/* No partition scan: add_disk must not wait for a disk process. */
	disk->flags |= GENHD_FL_NO_PART;
	snprintf(disk->disk_name, DISK_NAME_LEN, BLKTAP_DISK_NAME "%u", m->minor);
	set_limits(m, disk, p);
	WRITE_ONCE(m->removing, false);
	ret = add_disk(disk);
	if (ret) {
		put_disk(disk);
		blk_mq_free_tag_set(set);
		return ret;
	}
	m->disk = disk;
	return 0;
}

static long ctl_create_device(struct blktap_device_params __user *uarg)
{
	struct blktap_device_params p;
	struct tap_minor *m;
	long ret;

	if (copy_from_user(&p, uarg, sizeof(p)))
		return -EFAULT;
	ret = check_params(&p);
	if (ret)
		return ret;
	mutex_lock(&tap_mutex);
	m = minor_get(p.minor);
	if (!m)
		ret = -ENODEV;
	else if (m->disk || m->disk_busy)
		ret = -EEXIST;
	else
		ret = device_create_disk(m, &p);
	mutex_unlock(&tap_mutex);
	return ret;
}

/*
 * Removes /dev/tapdevN unless it is open. del_gendisk waits for requests in
 * flight, which a disk process may need to answer and whose release takes
 * tap_mutex: it runs without tap_mutex, disk_busy keeping others away.
 */
static long ctl_remove_device(unsigned long minor)
{
	struct tap_minor *m;
	struct gendisk *disk;
	long ret = 0;

	mutex_lock(&tap_mutex);
	m = minor_get(minor);
	if (!m || !m->disk)
		ret = -ENODEV;
	else if (m->disk_busy)
		ret = -EBUSY;
	if (ret) {
		mutex_unlock(&tap_mutex);
		return ret;
	}
	disk = m->disk;
	mutex_lock(&disk->open_mutex);
	if (m->bd_openers) {
		ret = -EBUSY;
	} else {
		spin_lock(&m->lock);
		m->removing = true;
		spin_unlock(&m->lock);
	}
	mutex_unlock(&disk->open_mutex);
	if (ret) {
		mutex_unlock(&tap_mutex);
		return ret;
	}
	m->disk_busy = true;
	if (!m->ring_live)
		fail_held(m); /* nobody would answer them */
	mutex_unlock(&tap_mutex);

	del_gendisk(disk);
	blk_mq_free_tag_set(&m->tag_set);
	put_disk(disk);

	mutex_lock(&tap_mutex);
	m->disk = NULL;
	m->disk_busy = false;
	mutex_unlock(&tap_mutex);
	return 0;
}

static long ctl_status(struct blktap_status __user *uarg)
{
	struct blktap_status st;
	struct tap_minor *m;

	if (copy_from_user(&st.minor, &uarg->minor, sizeof(st.minor)))
		return -EFAULT;
	mutex_lock(&tap_mutex);
	m = minor_get(st.minor);
	if (!m) {
		mutex_unlock(&tap_mutex);
		return -ENODEV;
	}
	memset(&st, 0, sizeof(st));
	st.minor = m->minor;
	st.geometry = m->geo;
	if (m->disk) {
		st.state |= BLKTAP_STATE_DEVICE;
		st.capacity_sectors = get_capacity(m->disk);
		st.device_openers = READ_ONCE(m->bd_openers);
	}
	spin_lock(&m->lock);
	st.state |= (m->ring_open ? BLKTAP_STATE_RING_OPEN : 0) |
		    (m->ring_error ? BLKTAP_STATE_RING_ERROR : 0) |
		    (m->failed ? BLKTAP_STATE_FAILED : 0) |
		    (m->removing && m->disk ? BLKTAP_STATE_REMOVING : 0);
	st.ring_error = m->last_ring_error;
	st.requests_outstanding = m->outstanding;
	st.requests_completed = m->completed;
	st.requests_failed = m->failed_count;
	st.requests_reissued = m->reissued;
	st.protocol_errors = m->protocol_errors;
	st.ring_opens = m->ring_opens;
	spin_unlock(&m->lock);
	mutex_unlock(&tap_mutex);
	return copy_to_user(uarg, &st, sizeof(st)) ? -EFAULT : 0;
}

static long ctl_fail(unsigned long minor)
{
	struct tap_minor *m;

	mutex_lock(&tap_mutex);
	m = minor_get(minor);
	if (!m) {
		mutex_unlock(&tap_mutex);
		return -ENODEV;
	}
	spin_lock(&m->lock);
	m->failed = true;
	spin_unlock(&m->lock);
	fail_held(m);
	mutex_unlock(&tap_mutex);
	ring_wake(m);
	return 0;
}

static long ctl_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	switch (cmd) {
	case BLKTAP_CTL_VERSION:
		return BLKTAP_ABI_VERSION;
	case BLKTAP_CTL_ALLOC:
		return ctl_alloc((void __user *)arg);
	case BLKTAP_CTL_FREE:
		return ctl_free(arg);
	case BLKTAP_CTL_CREATE_DEVICE:
		return ctl_create_device((void __user *)arg);
	case BLKTAP_CTL_REMOVE_DEVICE:
		return ctl_remove_device(arg);
	case BLKTAP_CTL_STATUS:
		return ctl_status((void __user *)arg);
	case BLKTAP_CTL_FAIL:
		return ctl_fail(arg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations ctl_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = ctl_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice ctl_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = BLKTAP_CONTROL_NAME,
	.fops = &ctl_fops,
	.mode = 0600,
};

/* ---- module ------------------------------------------------------------ */

static int __init blktap_init(void)
{
	int ret;

	tapdev_major = register_blkdev(0, BLKTAP_DISK_NAME);
	if (tapdev_major < 0)
		return tapdev_major;
	ret = alloc_chrdev_region(&ring_devt, 0, BLKTAP_MINORS_MAX, BLKTAP_RING_NAME);
	if (ret)
		goto out_blkdev;
	cdev_init(&ring_cdev, &ring_fops);
	ring_cdev.owner = THIS_MODULE;
	ret = cdev_add(&ring_cdev, ring_devt, BLKTAP_MINORS_MAX);
	if (ret)
		goto out_region;
	ring_class = class_create(THIS_MODULE, BLKTAP_RING_NAME);
	if (IS_ERR(ring_class)) {
		ret = PTR_ERR(ring_class);
		goto out_cdev;
	}
	ret = misc_register(&ctl_misc);
	if (ret)
		goto out_class;
	pr_info("ABI %d, /dev/%s, block major %d\n", BLKTAP_ABI_VERSION, BLKTAP_CONTROL_NAME,
		tapdev_major);
	return 0;

out_class:
	class_destroy(ring_class);
out_cdev:
	cdev_del(&ring_cdev);
out_region:
	unregister_chrdev_region(ring_devt, BLKTAP_MINORS_MAX);
out_blkdev:
	unregister_blkdev(tapdev_major, BLKTAP_DISK_NAME);
	return ret;
}

/* Runs only without minors: each holds a reference on the module. */
static void __exit blktap_exit(void)
{
	misc_deregister(&ctl_misc);
	class_destroy(ring_class);
	cdev_del(&ring_cdev);
	unregister_chrdev_region(ring_devt, BLKTAP_MINORS_MAX);
	unregister_blkdev(tapdev_major, BLKTAP_DISK_NAME);
}

module_init(blktap_init);
module_exit(blktap_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("blktap: block devices served by a userspace disk process over a blkif ring");
