/* The worker thread: posts queued work, reads the completion queue, counts
 * immediates and hands records to the event loop.  It never touches Python.
 *
 * Busy (work queued or operations outstanding) it polls; idle it spins for
 * cfg.spin_us, then blocks on the provider's wait fd (or sleeps with an
 * exponential back-off where the provider has none) until woken. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <sys/prctl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "afcore.h"

uint64_t afc_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Event ring (producer holds dom_lock). Returns -FI_EAGAIN when full. */
int afc_ev_push(afc_engine *e, uint64_t id, int32_t kind, int32_t err, uint64_t data, uint64_t aux)
{
    uint64_t tail = atomic_load_explicit(&e->ev_tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&e->ev_head, memory_order_acquire);
    if (tail - head > e->ev_mask)
        return -FI_EAGAIN;
    struct afc_event *ev = &e->evr[tail & e->ev_mask];
    ev->id = id;
    ev->kind = kind;
    ev->err = err;
    ev->data = data;
    ev->aux = aux;
    atomic_store_explicit(&e->ev_tail, tail + 1, memory_order_release);
    return 0;
}

static uint64_t ev_room(afc_engine *e)
{
    uint64_t tail = atomic_load_explicit(&e->ev_tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&e->ev_head, memory_order_acquire);
    return (uint64_t)e->ev_mask + 1 - (tail - head);
}

void afc_notify_loop(afc_engine *e)
{
    if (atomic_exchange(&e->armed, 0)) {
        uint64_t one = 1;
        ssize_t r = write(e->ev_fd, &one, sizeof one);
        (void)r;
    }
}

void afc_wake_worker(afc_engine *e)
{
    if (atomic_load(&e->sleeping)) {
        uint64_t one = 1;
        ssize_t r = write(e->wake_fd, &one, sizeof one);
        (void)r;
    }
}

static struct afc_op *op_get(afc_engine *e)
{
    if (!e->n_op_free)
        return NULL;
    return &e->ops[e->op_free[--e->n_op_free]];
}

static void op_put(afc_engine *e, struct afc_op *op)
{
    e->op_free[e->n_op_free++] = (uint32_t)(op - e->ops);
}

static void send_slot_put(afc_engine *e, uint32_t slot)
{
    pthread_mutex_lock(&e->sq_lock);
    e->send_free[e->n_send_free++] = slot;
    pthread_mutex_unlock(&e->sq_lock);
}

int afc_post_recv(afc_engine *e, uint32_t slot)
{
    struct afc_op *op = &e->recv_ops[slot];
    char *buf = e->msg_mem + (size_t)slot * e->cfg.msg_size;
    return (int)fi_recv(e->ep, buf, e->cfg.msg_size, fi_mr_desc(e->msg_mr), FI_ADDR_UNSPEC,
                        &op->ctx);
}

void afc_batch_free(afc_engine *e, struct afc_batch *b)
{
    if (b->prev)
        b->prev->next_live = b->next_live;
    else
        e->batches = b->next_live;
    if (b->next_live)
        b->next_live->prev = b->prev;
    free(b->sidx);
    free(b);
}

/* Every page of the batch has completed or failed: one record for Python. */
static void batch_done(afc_engine *e, struct afc_batch *b)
{
    if (b->err)
        afc_ev_push(e, b->id, AFC_EV_ERROR, b->err, (uint64_t)(int64_t)b->prov_err, 0);
    else
        afc_ev_push(e, b->id, AFC_EV_DONE, 0, 0, 0);
    afc_batch_free(e, b);
}

/* Post the next pages of a paged write (dom_lock held).  0 when every page is
 * posted (the submission is consumed), AFC_PARTIAL when some wait for room. */
#define AFC_PARTIAL 1
static int post_pages(afc_engine *e, struct afc_batch *b)
{
    int budget = AFC_SQ_BUDGET;
    while (b->posted < b->n && budget-- > 0) {
        struct afc_op *op = op_get(e);
        if (!op)
            return AFC_PARTIAL;
        uint64_t k = b->posted;
        const void *src = (const void *)(uintptr_t)(b->src + b->sstride * (uint64_t)b->sidx[k]);
        uint64_t dst = b->raddr + b->dstride * (uint64_t)b->didx[k];
        op->id = b->id;
        op->kind = AFC_OP_PAGES;
        op->batch = b;
        ssize_t rc = b->imm >= 0
                         ? fi_writedata(e->ep, src, b->page, b->desc, (uint64_t)b->imm, b->dest, dst,
                                        b->rkey, &op->ctx)
                         : fi_write(e->ep, src, b->page, b->desc, b->dest, dst, b->rkey, &op->ctx);
        if (rc == 0) {
            b->posted++;
            STAT_ADD(e, writes_posted, 1);
            STAT_ADD(e, bytes_posted, b->page);
            continue;
        }
        op_put(e, op);
        if (rc == -FI_EAGAIN) {
            STAT_ADD(e, eagain, 1);
            return AFC_PARTIAL;
        }
        /* Hard failure: the pages not yet posted fail with it. */
        STAT_ADD(e, errors, 1);
        if (!b->err)
            b->err = (int32_t)-rc;
        b->remaining -= b->n - b->posted;
        b->posted = b->n;
        if (b->remaining == 0)
            batch_done(e, b);
        return 0;
    }
    return b->posted < b->n ? AFC_PARTIAL : 0;
}

/* Post one submission (dom_lock held).  0, -FI_EAGAIN (try again later),
 * AFC_PARTIAL (a paged write is partly posted), or another error that has
 * been turned into an AFC_EV_ERROR record. */
int afc_post_sqe(afc_engine *e, const struct afc_sqe *s)
{
    if (s->kind == AFC_OP_PAGES) {
        if (ev_room(e) < AFC_CQ_BATCH + 2)
            return -FI_EAGAIN;
        return post_pages(e, s->batch);
    }
    if (s->kind == AFC_OP_REPOST) {
        int rc = afc_post_recv(e, s->slot);
        if (rc == -FI_EAGAIN)
            STAT_ADD(e, eagain, 1);
        else if (rc)
            afc_ev_push(e, 0, AFC_EV_RERROR, -rc, 0, 0);
        return rc == -FI_EAGAIN ? rc : 0;
    }
    if (ev_room(e) < AFC_CQ_BATCH + 2)
        return -FI_EAGAIN; /* keep room for the error record */
    struct afc_op *op = op_get(e);
    if (!op)
        return -FI_EAGAIN;
    op->id = s->id;
    op->kind = s->kind;
    op->slot = s->slot;
    ssize_t rc;
    if (s->kind == AFC_OP_WRITE) {
        if (s->imm >= 0)
            rc = fi_writedata(e->ep, s->src, s->len, s->desc, (uint64_t)s->imm, s->dest, s->raddr,
                              s->rkey, &op->ctx);
        else
            rc = fi_write(e->ep, s->src, s->len, s->desc, s->dest, s->raddr, s->rkey, &op->ctx);
    } else {
        rc = fi_send(e->ep, afc_send_buf(e, s->slot), s->len, fi_mr_desc(e->msg_mr), s->dest,
                     &op->ctx);
    }
    if (rc == 0) {
        if (s->kind == AFC_OP_WRITE) {
            STAT_ADD(e, writes_posted, 1);
            STAT_ADD(e, bytes_posted, s->len);
        } else {
            STAT_ADD(e, sends_posted, 1);
        }
        return 0;
    }
    op_put(e, op);
    if (rc == -FI_EAGAIN) {
        STAT_ADD(e, eagain, 1);
        return -FI_EAGAIN;
    }
    STAT_ADD(e, errors, 1);
    if (s->kind == AFC_OP_SEND)
        send_slot_put(e, s->slot);
    afc_ev_push(e, s->id, AFC_EV_ERROR, (int32_t)-rc, 0, 0);
    return 0;
}

/* Post queued submissions (dom_lock held).  Returns how many left the queue. */
static int submit_queued(afc_engine *e)
{
    int n = 0;
    uint64_t head = atomic_load_explicit(&e->sq_head, memory_order_relaxed);
    while (n < AFC_SQ_BUDGET) {
        uint64_t tail = atomic_load_explicit(&e->sq_tail, memory_order_acquire);
        if (head == tail)
            break;
        int rc = afc_post_sqe(e, &e->sq[head & e->sq_mask]);
        if (rc == -FI_EAGAIN || rc == AFC_PARTIAL)
            break;
        head++;
        n++;
        atomic_store_explicit(&e->sq_head, head, memory_order_release);
    }
    return n;
}

static void complete_op(afc_engine *e, struct afc_op *op, int err, int prov_errno)
{
    if (op->kind == AFC_OP_PAGES) {
        struct afc_batch *b = op->batch;
        STAT_ADD(e, completions, 1);
        if (err) {
            STAT_ADD(e, errors, 1);
            if (!b->err) {
                b->err = err;
                b->prov_err = prov_errno;
            }
        }
        op_put(e, op);
        if (--b->remaining == 0 && b->posted == b->n)
            batch_done(e, b);
        return;
    }
    if (err) {
        STAT_ADD(e, errors, 1);
        afc_ev_push(e, op->id, AFC_EV_ERROR, err, (uint64_t)(int64_t)prov_errno, 0);
    } else {
        STAT_ADD(e, completions, 1);
        afc_ev_push(e, op->id, AFC_EV_DONE, 0, 0, 0);
    }
    if (op->kind == AFC_OP_SEND)
        send_slot_put(e, op->slot);
    op_put(e, op);
}

static int is_recv_op(afc_engine *e, void *ctx)
{
    return ctx >= (void *)e->recv_ops && ctx < (void *)(e->recv_ops + e->cfg.recv_slots);
}

static void read_cq_error(afc_engine *e)
{
    struct fi_cq_err_entry err;
    memset(&err, 0, sizeof err);
    if (fi_cq_readerr(e->cq, &err, 0) < 0)
        return;
    if (err.op_context && is_recv_op(e, err.op_context)) {
        /* A receive failed (cancelled at close, or truncated): report, repost. */
        STAT_ADD(e, errors, 1);
        afc_ev_push(e, 0, AFC_EV_RERROR, err.err, (uint64_t)(int64_t)err.prov_errno, 0);
        if (!atomic_load(&e->stop) && err.err != FI_ECANCELED)
            afc_post_recv(e, (uint32_t)((struct afc_op *)err.op_context - e->recv_ops));
    } else if (err.op_context) {
        complete_op(e, err.op_context, err.err ? err.err : FI_EOTHER, err.prov_errno);
    } else {
        STAT_ADD(e, errors, 1);
        afc_ev_push(e, 0, AFC_EV_RERROR, err.err, (uint64_t)(int64_t)err.prov_errno, 0);
    }
}

/* Read the completion queue (dom_lock held).  Returns entries handled. */
static int poll_cq(afc_engine *e)
{
    struct fi_cq_data_entry cqe[AFC_CQ_BATCH];
    if (ev_room(e) < AFC_CQ_BATCH + 1)
        return 0; /* Python is behind: leave completions in the provider's queue */
    ssize_t n = fi_cq_read(e->cq, cqe, AFC_CQ_BATCH);
    if (n == -FI_EAVAIL) {
        read_cq_error(e);
        return 1;
    }
    if (n <= 0)
        return 0;
    int64_t imm_val = -1;
    uint64_t imm_n = 0;
    for (ssize_t i = 0; i < n; i++) {
        struct fi_cq_data_entry *c = &cqe[i];
        if (c->flags & FI_REMOTE_CQ_DATA) {
            int64_t v = (int64_t)(c->data & 0xffffffffu);
            STAT_ADD(e, imms_received, 1);
            if (v != imm_val && imm_n) {
                afc_ev_push(e, 0, AFC_EV_IMM, 0, (uint64_t)imm_val, imm_n);
                imm_n = 0;
            }
            imm_val = v;
            imm_n++;
        } else if (c->flags & FI_RECV) {
            uint32_t slot = (uint32_t)((struct afc_op *)c->op_context - e->recv_ops);
            STAT_ADD(e, msgs_received, 1);
            afc_ev_push(e, slot, AFC_EV_RECV, 0, c->len, 0);
        } else if (c->op_context) {
            complete_op(e, c->op_context, 0, 0);
        }
    }
    if (imm_n)
        afc_ev_push(e, 0, AFC_EV_IMM, 0, (uint64_t)imm_val, imm_n);
    return (int)n;
}

/* Block until woken, the provider signals, or the timeout passes.  Returns 1
 * when something woke it, 0 on timeout or when it did not block. */
static int idle_block(afc_engine *e, int timeout_us)
{
    int woke = 0;
    atomic_store(&e->sleeping, 1);
    if (!afc_sq_empty(e) || atomic_load(&e->stop)) {
        atomic_store(&e->sleeping, 0);
        return 1;
    }
    STAT_ADD(e, worker_sleeps, 1);
    if (e->cq_fd >= 0) {
        struct fid *fids[1] = {&e->cq->fid};
        pthread_mutex_lock(&e->dom_lock);
        int rc = fi_trywait(e->fabric, fids, 1);
        pthread_mutex_unlock(&e->dom_lock);
        if (rc == FI_SUCCESS) {
            struct epoll_event evs[2];
            woke = epoll_wait(e->epfd, evs, 2, (timeout_us + 999) / 1000) > 0;
        } else {
            woke = 1;
        }
    } else {
        struct pollfd p = {.fd = e->wake_fd, .events = POLLIN};
        struct timespec ts = {.tv_sec = timeout_us / 1000000, .tv_nsec = (timeout_us % 1000000) * 1000};
        woke = ppoll(&p, 1, &ts, NULL) > 0;
    }
    uint64_t v;
    if (woke && read(e->wake_fd, &v, sizeof v) < 0 && e->cq_fd < 0)
        woke = 0; /* nothing was written: the poll timed out or fired spuriously */
    atomic_store(&e->sleeping, 0);
    if (woke)
        STAT_ADD(e, worker_wakeups, 1);
    return woke;
}

int afc_progress(afc_engine *e)
{
    if (atomic_load_explicit(&e->stop, memory_order_relaxed) || pthread_mutex_trylock(&e->dom_lock))
        return 0;
    int n = submit_queued(e);
    n += poll_cq(e);
    pthread_mutex_unlock(&e->dom_lock);
    atomic_store_explicit(&e->loop_polled_ns, afc_now_ns(), memory_order_relaxed);
    return n;
}

void afc_quiesce(afc_engine *e, int ms)
{
    uint64_t deadline = afc_now_ns() + (uint64_t)ms * 1000000ull;
    pthread_mutex_lock(&e->dom_lock);
    while (e->n_op_free < e->cfg.max_ops && afc_now_ns() < deadline) {
        if (!poll_cq(e))
            sched_yield();
    }
    pthread_mutex_unlock(&e->dom_lock);
}

void *afc_worker_main(void *arg)
{
    afc_engine *e = arg;
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); /* short sleeps stay short (default slack: 50 us) */
    const uint64_t spin_ns = (uint64_t)e->cfg.spin_us * 1000;
    const uint64_t wait_spin_ns = (uint64_t)e->cfg.wait_spin_us * 1000;
    const int max_sleep_us = (int)e->cfg.idle_ms * 1000;
    uint64_t last_active = afc_now_ns();
    int sleep_us = 50;

    while (!atomic_load_explicit(&e->stop, memory_order_relaxed)) {
        /* While the event loop polls for itself (loop_spin_us), one poller per
         * engine is enough: sleep, but wake at once for submissions. */
        uint64_t polled = atomic_load_explicit(&e->loop_polled_ns, memory_order_relaxed);
        if (polled && afc_now_ns() - polled < 100000) {
            idle_block(e, 100);
            continue;
        }
        uint64_t published = atomic_load_explicit(&e->ev_tail, memory_order_relaxed);
        pthread_mutex_lock(&e->dom_lock);
        int work = submit_queued(e);
        work += poll_cq(e);
        int busy = e->n_op_free < e->cfg.max_ops || !afc_sq_empty(e);
        pthread_mutex_unlock(&e->dom_lock);
        if (atomic_load_explicit(&e->ev_tail, memory_order_relaxed) != published)
            afc_notify_loop(e); /* only when there is something for Python */
        if (work || busy) {
            if (work)
                last_active = afc_now_ns();
            sleep_us = 50;
            continue;
        }
        uint64_t window = atomic_load_explicit(&e->expecting, memory_order_relaxed) > 0 && e->cq_fd < 0
                              ? wait_spin_ns
                              : spin_ns;
        if (afc_now_ns() - last_active < window) {
            /* Polling, but give the core away for a moment: on small machines the
             * event loop that must run next may be waiting for it. */
            struct timespec pause = {0, 2000};
            nanosleep(&pause, NULL);
            continue;
        }
        /* Idle.  With a wait fd block long; without one back off up to 1 ms. */
        int t = e->cq_fd >= 0 ? max_sleep_us : sleep_us;
        if (idle_block(e, t)) {
            last_active = afc_now_ns();
            sleep_us = 50;
        } else if (e->cq_fd < 0) {
            /* No wait fd: nothing can wake us when a peer writes, so back off,
             * to 1 ms while a task awaits inbound traffic, to idle_ms when none does. */
            int cap = atomic_load_explicit(&e->expecting, memory_order_relaxed) > 0 ? 1000 : max_sleep_us;
            sleep_us = sleep_us * 2 > cap ? cap : sleep_us * 2;
        }
    }
    return NULL;
}
