/* Internal header of the native core.  The public API is cdefs/afcore.h. */
#ifndef AFCORE_INTERNAL_H
#define AFCORE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include "../cdefs/afcore.h"

#define AFC_CQ_BATCH 32
#define AFC_SQ_BUDGET 64 /* posts per worker pass before the CQ is read again */
#define AFC_OP_FENCE 16  /* the trailing immediate of a striped write */
#define AFC_DEFER 256    /* submissions set aside while their peer's queue is full */
#define AFC_NONE UINT32_MAX /* no peer / no send slot */
/* afc_engine.req bits: requests made without dom_lock, served under it */
#define AFC_REQ_WRITEOFF 1u /* a peer failed: write off its stuck sends */
#define AFC_REQ_WEDGE 2u    /* test hook: the worker holds dom_lock (afc_debug_wedge) */
/* afc_post_sqe's results besides 0 and -FI_EAGAIN (no shared room: stop this pass) */
#define AFC_PARTIAL 1    /* out of operation contexts or budget: stop this pass */
#define AFC_BLOCKED 2    /* the provider said -FI_EAGAIN for this one: others may go ahead */

/* A multi-part operation (owned by the worker once queued): a paged write,
 * whose pages are split into one contiguous range per path, or a single write
 * striped over the paths, one shard per path. */
#define AFC_BATCH_PAGES 1
#define AFC_BATCH_STRIPE 2
struct afc_batch {
    struct afc_batch *prev, *next_live; /* engine's list of live batches (dom_lock) */
    struct afc_batch *next_fence;       /* engine's list of fences waiting to be posted */
    uint64_t id;
    uint32_t kind, peer;
    uint64_t n, posted, remaining;
    int32_t err, prov_err;
    uint64_t src, raddr, page, len, sstride, dstride;
    uint64_t rkeys[AFC_MAX_RAILS];
    afc_mr *mr;
    int64_t imm;
    int64_t *sidx, *didx;
    uint64_t cur[AFC_MAX_RAILS], end[AFC_MAX_RAILS]; /* PAGES: each path's range */
    uint32_t rr;                                     /* PAGES: next path to post on */
    struct afc_op *fence; /* STRIPE with imm: the op reserved for the trailing immediate */
    int fence_posted;
    int live; /* on the engine's live list: linked when first posted (dom_lock) */
};

/* One submission: what Python asked for, copied by value. */
struct afc_sqe {
    uint32_t kind;
    uint32_t slot;
    uint64_t id;
    const void *src;
    size_t len;
    afc_mr *mr;
    uint32_t peer;
    int32_t path; /* -1: the peer's next path */
    uint64_t raddr;
    uint64_t rkeys[AFC_MAX_RAILS];
    int64_t imm;
    struct afc_batch *batch; /* AFC_OP_PAGES */
};

/* An operation at the provider; its address is the libfabric context. */
struct afc_op {
    struct fi_context2 ctx; /* first: providers in FI_CONTEXT mode write here */
    uint64_t id;
    uint32_t kind;
    uint32_t slot;  /* AFC_OP_SEND: its send slot, AFC_NONE once written off */
    uint32_t peer;  /* AFC_OP_SEND while at the provider: its peer; else AFC_NONE */
    struct afc_batch *batch; /* AFC_OP_PAGES: the batch this piece belongs to */
};

/* A send slot's buffer: a piece of the message block, or its own registered
 * allocation once the original was written off (see afc_peer_fail). */
struct afc_send_slot {
    char *buf;
    struct fid_mr *mr;
};

/* A written-off send buffer: a provider may still hold it; freed at close. */
struct afc_orphan {
    struct afc_orphan *next;
    char *buf;
    struct fid_mr *mr;
};

struct afc_mr {
    struct fid_mr *mr[AFC_MAX_RAILS];
    afc_engine *engine;
};

/* One NIC of the DomainGroup. */
struct afc_rail {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_av *av;
    struct fid_cq *cq;
    struct fid_ep *ep;
    int cq_fd; /* provider's wait fd, -1 when it has none */
    struct fid_cntr *rx_cntr; /* remote writes that landed here (FI_RMA_EVENT), or NULL */
    uint64_t rx_seen;         /* its value at the last poll */
    atomic_uint_fast64_t bytes_posted;
};

/* A peer engine.  Path p runs from our rail p % n_rails to the peer's rail
 * p % peer_rails; there are max(ours, theirs) paths, so every NIC on both
 * sides carries traffic. */
struct afc_peer {
    uint32_t live;
    uint32_t n_rails, n_paths;
    /* > 0: declared failed with this fi errno; nothing more is posted.  Atomic:
     * afc_peer_fail sets it without the domain lock. */
    _Atomic int32_t failed;
    fi_addr_t addr[AFC_MAX_RAILS]; /* per path, in our rail's AV */
};

struct afc_engine {
    struct afc_rail rail[AFC_MAX_RAILS];
    uint32_t n_rails;
    uint64_t mr_mode;
    uint64_t key_mask;
    int all_wait_fd; /* every rail's CQ has a wait fd: the worker can block */
    int no_dc;       /* the provider refused FI_DELIVERY_COMPLETE: fence on plain completion */
    uint32_t rr;     /* next path for a write that is not striped (dom_lock) */
    int wake_fd; /* eventfd: submitters wake a sleeping worker */
    int ev_fd;   /* eventfd: the worker wakes the event loop */
    int epfd;
    struct afc_config cfg;

    /* Everything that calls into libfabric holds dom_lock.  The worker holds
     * it around every provider call, and a provider may never return from one
     * (libfabric 1.17 shm spins for ever on a queue lock a killed peer held):
     * so the event loop never waits for it unbounded.  Failure and statistics
     * calls do not take it at all (requests below, ops_out); the others wait
     * at most cfg.lock_timeout_ms (-AFC_EWEDGED). */
    pthread_mutex_t dom_lock;
    pthread_t worker;
    int worker_started;
    atomic_int stop;
    atomic_int abandoned; /* the worker did not stop in time: never free the engine */
    atomic_uint req;      /* AFC_REQ_*: work for whoever holds dom_lock next */
    _Atomic uint32_t ops_out; /* operations at the provider, published by op_get/op_put */
    _Atomic uint64_t wedge_until; /* afc_debug_wedge: hold dom_lock until then (ns) */
    atomic_int wedge_held;
    atomic_int sleeping;
    atomic_int expecting; /* tasks awaiting inbound traffic */
    _Atomic uint64_t loop_polled_ns; /* when the event loop last polled itself (afc_progress) */

    /* Submission queue: producers serialised by sq_lock, the worker consumes. */
    pthread_mutex_t sq_lock;
    struct afc_sqe *sq;
    uint32_t sq_mask;
    atomic_uint_fast64_t sq_head, sq_tail;

    /* Event ring: produced under dom_lock, consumed by afc_drain. */
    struct afc_event *evr;
    uint32_t ev_mask;
    atomic_uint_fast64_t ev_head, ev_tail;
    atomic_int armed;

    struct afc_batch *batches; /* live batches (dom_lock), freed at close */
    struct afc_batch *fences;  /* stripes whose trailing immediate awaits posting (dom_lock) */
    struct afc_sqe defer[AFC_DEFER]; /* submissions the provider refused for now (dom_lock) */
    uint32_t n_defer;

    /* Peers: a fixed table (written by the owning thread under dom_lock). */
    struct afc_peer *peers;
    uint32_t *peer_free;
    uint32_t n_peer_free;

    /* Operation pool (dom_lock). */
    struct afc_op *ops;
    uint32_t *op_free;
    uint32_t n_op_free;

    /* Message buffers (rail 0): one registered block, recv slots then send slots. */
    char *msg_mem;
    struct fid_mr *msg_mr;
    struct afc_op *recv_ops;
    uint32_t *send_free; /* sq_lock */
    uint32_t n_send_free;
    struct afc_send_slot *send_slots; /* dom_lock to replace one; see afc_peer_fail */
    struct afc_orphan *orphans;       /* dom_lock */

    struct afc_watch_hub *watch; /* watcher.c: the engine's watcher thread, made on first use */

    struct {
        atomic_uint_fast64_t writes_posted, bytes_posted, sends_posted, completions, errors,
            imms_received, msgs_received, eagain, worker_sleeps, worker_wakeups, sends_written_off;
    } st;
};

/* engine.c */
uint32_t afc_write_off_sends(afc_engine *e); /* dom_lock held */

/* worker.c */
void *afc_worker_main(void *arg);
void afc_quiesce(afc_engine *e, int ms);
uint64_t afc_now_ns(void); /* let in-flight operations finish, bounded */
int afc_post_sqe(afc_engine *e, const struct afc_sqe *s);
int afc_post_recv(afc_engine *e, uint32_t slot);
void afc_wake_worker(afc_engine *e);
void afc_notify_loop(afc_engine *e); /* wake the event loop if it is armed */
void afc_batch_free(afc_engine *e, struct afc_batch *b); /* dom_lock held */
int afc_post_fences(afc_engine *e);                       /* dom_lock held */
int afc_ev_push(afc_engine *e, uint64_t id, int32_t kind, int32_t err, uint64_t data,
                uint64_t aux);

static inline char *afc_send_buf(afc_engine *e, uint32_t slot)
{
    return e->send_slots[slot].buf;
}

static inline int afc_sq_empty(afc_engine *e)
{
    return atomic_load(&e->sq_head) == atomic_load(&e->sq_tail);
}

static inline int32_t afc_peer_failed(afc_engine *e, uint32_t peer)
{
    return atomic_load_explicit(&e->peers[peer].failed, memory_order_acquire);
}

#define STAT_ADD(e, f, n) atomic_fetch_add_explicit(&(e)->st.f, (n), memory_order_relaxed)

#endif
