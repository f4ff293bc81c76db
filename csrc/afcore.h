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

/* A paged write in progress (owned by the worker once queued). */
struct afc_batch {
    struct afc_batch *prev, *next_live; /* engine's list of live batches (dom_lock) */
    uint64_t id;
    uint64_t n, posted, remaining;
    int32_t err, prov_err;
    uint64_t src, raddr, rkey, page, sstride, dstride, dest;
    void *desc;
    int64_t imm;
    int64_t *sidx, *didx;
};

/* One submission: what Python asked for, copied by value. */
struct afc_sqe {
    uint32_t kind;
    uint32_t slot;
    uint64_t id;
    const void *src;
    size_t len;
    void *desc;
    uint64_t dest;
    uint64_t raddr;
    uint64_t rkey;
    int64_t imm;
    struct afc_batch *batch; /* AFC_OP_PAGES */
};

/* An operation at the provider; its address is the libfabric context. */
struct afc_op {
    struct fi_context2 ctx; /* first: providers in FI_CONTEXT mode write here */
    uint64_t id;
    uint32_t kind;
    uint32_t slot;
    struct afc_batch *batch; /* AFC_OP_PAGES: the paged write this page belongs to */
};

struct afc_mr {
    struct fid_mr *mr;
    afc_engine *engine;
};

struct afc_engine {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_av *av;
    struct fid_cq *cq;
    struct fid_ep *ep;
    uint64_t mr_mode;
    uint64_t key_mask;
    int cq_fd;   /* provider's wait fd, -1 when it has none */
    int wake_fd; /* eventfd: submitters wake a sleeping worker */
    int ev_fd;   /* eventfd: the worker wakes the event loop */
    int epfd;
    struct afc_config cfg;

    /* Everything that calls into libfabric holds dom_lock. */
    pthread_mutex_t dom_lock;
    pthread_t worker;
    int worker_started;
    atomic_int stop;
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

    struct afc_batch *batches; /* live paged writes (dom_lock), freed at close */

    /* Operation pool (dom_lock). */
    struct afc_op *ops;
    uint32_t *op_free;
    uint32_t n_op_free;

    /* Message buffers: one registered block, recv slots then send slots. */
    char *msg_mem;
    struct fid_mr *msg_mr;
    struct afc_op *recv_ops;
    uint32_t *send_free; /* sq_lock */
    uint32_t n_send_free;

    struct {
        atomic_uint_fast64_t writes_posted, bytes_posted, sends_posted, completions, errors,
            imms_received, msgs_received, eagain, worker_sleeps, worker_wakeups;
    } st;
};

/* worker.c */
void *afc_worker_main(void *arg);
void afc_quiesce(afc_engine *e, int ms);
uint64_t afc_now_ns(void); /* let in-flight operations finish, bounded */
int afc_post_sqe(afc_engine *e, const struct afc_sqe *s);
int afc_post_recv(afc_engine *e, uint32_t slot);
void afc_wake_worker(afc_engine *e);
void afc_notify_loop(afc_engine *e); /* wake the event loop if it is armed */
void afc_batch_free(afc_engine *e, struct afc_batch *b); /* dom_lock held */
int afc_ev_push(afc_engine *e, uint64_t id, int32_t kind, int32_t err, uint64_t data,
                uint64_t aux);

static inline char *afc_send_buf(afc_engine *e, uint32_t slot)
{
    return e->msg_mem + (size_t)(e->cfg.recv_slots + slot) * e->cfg.msg_size;
}

static inline int afc_sq_empty(afc_engine *e)
{
    return atomic_load(&e->sq_head) == atomic_load(&e->sq_tail);
}

#define STAT_ADD(e, f, n) atomic_fetch_add_explicit(&(e)->st.f, (n), memory_order_relaxed)

#endif
