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

/* The pool is dom_lock's; its fill level is published for afc_get_stats,
 * which must not wait for the lock (a plain store: one writer at a time). */
static void publish_ops_out(afc_engine *e)
{
    atomic_store_explicit(&e->ops_out, e->cfg.max_ops - e->n_op_free, memory_order_relaxed);
}

static struct afc_op *op_get(afc_engine *e)
{
    if (!e->n_op_free)
        return NULL;
    struct afc_op *op = &e->ops[e->op_free[--e->n_op_free]];
    publish_ops_out(e);
    return op;
}

static void op_put(afc_engine *e, struct afc_op *op)
{
    op->peer = AFC_NONE;
    e->op_free[e->n_op_free++] = (uint32_t)(op - e->ops);
    publish_ops_out(e);
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
    return (int)fi_recv(e->rail[0].ep, buf, e->cfg.msg_size, fi_mr_desc(e->msg_mr), FI_ADDR_UNSPEC,
                        &op->ctx);
}

/* Put a batch on the engine's live list (freed at close), the first time
 * it is posted.  Submitters do not: they must not wait for dom_lock. */
static void batch_link(afc_engine *e, struct afc_batch *b)
{
    b->prev = NULL;
    b->next_live = e->batches;
    if (e->batches)
        e->batches->prev = b;
    e->batches = b;
    b->live = 1;
}

void afc_batch_free(afc_engine *e, struct afc_batch *b)
{
    if (b->live) {
        if (b->prev)
            b->prev->next_live = b->next_live;
        else
            e->batches = b->next_live;
        if (b->next_live)
            b->next_live->prev = b->prev;
    }
    free(b->sidx);
    free(b);
}

/* Every piece of the batch has completed or failed: one record for Python. */
static void batch_done(afc_engine *e, struct afc_batch *b)
{
    if (b->fence && !b->fence_posted)
        op_put(e, b->fence); /* reserved, never needed */
    if (b->err)
        afc_ev_push(e, b->id, AFC_EV_ERROR, b->err, (uint64_t)(int64_t)b->prov_err, 0);
    else
        afc_ev_push(e, b->id, AFC_EV_DONE, 0, 0, 0);
    afc_batch_free(e, b);
}

/* Post one write on a path to a peer (dom_lock held).  `deliver`: complete
 * only once the data is visible at the target (the shards of a striped
 * write that a trailing immediate vouches for). */
static ssize_t post_write(afc_engine *e, struct afc_peer *p, uint32_t path, const void *src, size_t len,
                          afc_mr *mr, uint64_t raddr, const uint64_t *rkeys, int64_t imm, int deliver,
                          struct afc_op *op)
{
    uint32_t l = path % e->n_rails;
    struct afc_rail *rl = &e->rail[l];
    void *desc = mr ? fi_mr_desc(mr->mr[l]) : NULL;
    uint64_t key = rkeys[path % p->n_rails];
    ssize_t rc;
    if (deliver && !e->no_dc) {
        struct iovec iov = {.iov_base = (void *)src, .iov_len = len};
        struct fi_rma_iov rma = {.addr = raddr, .len = len, .key = key};
        struct fi_msg_rma msg = {.msg_iov = &iov, .desc = &desc, .iov_count = 1, .addr = p->addr[path],
                                 .rma_iov = &rma, .rma_iov_count = 1, .context = &op->ctx};
        rc = fi_writemsg(rl->ep, &msg, FI_COMPLETION | FI_DELIVERY_COMPLETE);
        if (rc == -FI_EBADFLAGS || rc == -FI_ENOSYS || rc == -FI_EOPNOTSUPP) {
            e->no_dc = 1; /* documented: the fence then relies on plain completion */
            rc = fi_write(rl->ep, src, len, desc, p->addr[path], raddr, key, &op->ctx);
        }
    } else if (imm >= 0) {
        rc = fi_writedata(rl->ep, src, len, desc, (uint64_t)imm, p->addr[path], raddr, key, &op->ctx);
    } else {
        rc = fi_write(rl->ep, src, len, desc, p->addr[path], raddr, key, &op->ctx);
    }
    if (rc == 0) {
        STAT_ADD(e, writes_posted, 1);
        STAT_ADD(e, bytes_posted, len);
        atomic_fetch_add_explicit(&rl->bytes_posted, len, memory_order_relaxed);
    }
    return rc;
}

/* The trailing immediate of a striped write: zero bytes on path 0.
 * 0 posted (or failed and recorded), -FI_EAGAIN try later. dom_lock held. */
static int post_fence(afc_engine *e, struct afc_batch *b)
{
    struct afc_op *op = b->fence;
    int32_t failed = afc_peer_failed(e, b->peer);
    if (failed) {
        b->err = failed;
        batch_done(e, b); /* gives the reserved op back */
        return 0;
    }
    op->id = b->id;
    op->kind = AFC_OP_FENCE;
    op->batch = b;
    ssize_t rc = post_write(e, &e->peers[b->peer], 0, (const void *)(uintptr_t)b->src, 0, b->mr, b->raddr,
                            b->rkeys, b->imm, 0, op);
    if (rc == -FI_EAGAIN) {
        STAT_ADD(e, eagain, 1);
        return -FI_EAGAIN;
    }
    b->fence_posted = 1;
    if (rc) {
        STAT_ADD(e, errors, 1);
        op_put(e, op);
        b->err = (int32_t)-rc;
        batch_done(e, b);
    }
    return 0;
}

int afc_post_fences(afc_engine *e)
{
    int n = 0;
    while (e->fences) {
        struct afc_batch *b = e->fences, *next = b->next_fence; /* b may be freed by post_fence */
        if (post_fence(e, b) == -FI_EAGAIN)
            break;
        e->fences = next;
        n++;
    }
    return n;
}

/* All shards are in: fail, or send the immediate that vouches for them. */
static void stripe_landed(afc_engine *e, struct afc_batch *b)
{
    if (b->imm < 0 || b->err || !b->fence) {
        batch_done(e, b);
    } else if (e->fences || post_fence(e, b) == -FI_EAGAIN) {
        struct afc_batch **t = &e->fences; /* keep the order of arrival */
        while (*t)
            t = &(*t)->next_fence;
        b->next_fence = NULL;
        *t = b;
    }
}

/* Post the next pieces of a batch (dom_lock held).  0 when every piece is
 * posted (the submission is consumed), AFC_PARTIAL when some wait for room. */
static int post_batch(afc_engine *e, struct afc_batch *b)
{
    struct afc_peer *p = &e->peers[b->peer];
    int32_t failed = afc_peer_failed(e, b->peer);
    if (failed && b->posted < b->n) { /* the rest never reaches the provider */
        if (!b->err)
            b->err = failed;
        b->remaining -= b->n - b->posted;
        b->posted = b->n;
        if (b->remaining == 0)
            b->kind == AFC_BATCH_STRIPE ? stripe_landed(e, b) : batch_done(e, b);
        return 0;
    }
    int stripe = b->kind == AFC_BATCH_STRIPE;
    if (stripe && b->imm >= 0 && !b->fence && !(b->fence = op_get(e)))
        return AFC_PARTIAL;
    int budget = AFC_SQ_BUDGET;
    while (b->posted < b->n && budget-- > 0) {
        struct afc_op *op = op_get(e);
        if (!op)
            return AFC_PARTIAL;
        uint32_t path;
        const void *src;
        uint64_t dst, len, k = 0;
        if (stripe) {
            path = (uint32_t)b->posted;
            uint64_t off = b->page * b->posted;
            len = b->len - off < b->page ? b->len - off : b->page;
            src = (const void *)(uintptr_t)(b->src + off);
            dst = b->raddr + off;
        } else {
            path = b->rr;
            while (b->cur[path] == b->end[path]) /* some path still has pages: posted < n */
                path = (path + 1) % p->n_paths;
            k = b->cur[path];
            src = (const void *)(uintptr_t)(b->src + b->sstride * (uint64_t)b->sidx[k]);
            dst = b->raddr + b->dstride * (uint64_t)b->didx[k];
            len = b->page;
        }
        op->id = b->id;
        op->kind = AFC_OP_PAGES;
        op->batch = b;
        ssize_t rc = post_write(e, p, path, src, len, b->mr, dst, b->rkeys, stripe ? -1 : b->imm,
                                stripe && b->imm >= 0, op);
        if (rc == 0) {
            b->posted++;
            if (!stripe) {
                b->cur[path]++;
                b->rr = (path + 1) % p->n_paths;
            }
            continue;
        }
        op_put(e, op);
        if (rc == -FI_EAGAIN) {
            STAT_ADD(e, eagain, 1);
            return AFC_BLOCKED; /* the provider has no room towards this peer now */
        }
        /* Hard failure: the pieces not yet posted fail with it. */
        STAT_ADD(e, errors, 1);
        if (!b->err)
            b->err = (int32_t)-rc;
        b->remaining -= b->n - b->posted;
        b->posted = b->n;
        if (b->remaining == 0)
            stripe ? stripe_landed(e, b) : batch_done(e, b);
        return 0;
    }
    return b->posted < b->n ? AFC_PARTIAL : 0;
}

/* Post one submission (dom_lock held).  0, -FI_EAGAIN (try again later),
 * AFC_PARTIAL (a batch is partly posted), or another error that has been
 * turned into an AFC_EV_ERROR record. */
int afc_post_sqe(afc_engine *e, const struct afc_sqe *s)
{
    if (s->kind == AFC_OP_PAGES) {
        if (!s->batch->live)
            batch_link(e, s->batch);
        if (ev_room(e) < AFC_CQ_BATCH + 2)
            return -FI_EAGAIN;
        return post_batch(e, s->batch);
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
    int32_t failed = afc_peer_failed(e, s->peer);
    if (failed) { /* never reaches the provider */
        STAT_ADD(e, errors, 1);
        if (s->kind == AFC_OP_SEND)
            send_slot_put(e, s->slot);
        afc_ev_push(e, s->id, AFC_EV_ERROR, failed, 0, 0);
        return 0;
    }
    struct afc_op *op = op_get(e);
    if (!op)
        return -FI_EAGAIN;
    op->id = s->id;
    op->kind = s->kind;
    op->slot = s->slot;
    op->peer = s->kind == AFC_OP_SEND ? s->peer : AFC_NONE;
    struct afc_peer *p = &e->peers[s->peer];
    ssize_t rc;
    if (s->kind == AFC_OP_WRITE) {
        /* Writes that are not striped take the paths in turn, engine-wide, so
         * that a scatter to many peers spreads over our NICs too. */
        uint32_t path = s->path >= 0 ? (uint32_t)s->path : e->rr % p->n_paths;
        rc = post_write(e, p, path, s->src, s->len, s->mr, s->raddr, s->rkeys, s->imm, 0, op);
        if (rc == 0 && s->path < 0)
            e->rr++;
    } else {
        rc = fi_send(e->rail[0].ep, afc_send_buf(e, s->slot), s->len, fi_mr_desc(e->send_slots[s->slot].mr),
                     p->addr[0], &op->ctx);
        if (rc == 0)
            STAT_ADD(e, sends_posted, 1);
    }
    if (rc == 0)
        return 0;
    op_put(e, op);
    if (rc == -FI_EAGAIN) {
        STAT_ADD(e, eagain, 1);
        return AFC_BLOCKED;
    }
    STAT_ADD(e, errors, 1);
    if (s->kind == AFC_OP_SEND)
        send_slot_put(e, s->slot);
    afc_ev_push(e, s->id, AFC_EV_ERROR, (int32_t)-rc, 0, 0);
    return 0;
}

/* Retry the submissions set aside because the provider had no room for
 * them (dom_lock held).  Returns how many went out. */
static int post_deferred(afc_engine *e)
{
    int n = 0;
    uint32_t keep = 0, i = 0;
    for (; i < e->n_defer; i++) {
        int rc = afc_post_sqe(e, &e->defer[i]);
        if (rc == AFC_BLOCKED) {
            e->defer[keep++] = e->defer[i];
        } else if (rc == -FI_EAGAIN || rc == AFC_PARTIAL) {
            break; /* out of shared resources: keep this one and the rest as they are */
        } else {
            n++;
        }
    }
    for (; i < e->n_defer; i++)
        e->defer[keep++] = e->defer[i];
    e->n_defer = keep;
    return n;
}

/* Post queued submissions (dom_lock held).  Returns how many left the queue.
 * A submission the provider refuses for now (-FI_EAGAIN: the peer's queue is
 * full, or the peer is gone and never drains it) is set aside, up to
 * AFC_DEFER of them, so that it does not hold up traffic to every other
 * peer; set-aside ones are retried first.  No order is promised anyway. */
static int submit_queued(afc_engine *e)
{
    int n = e->fences ? afc_post_fences(e) : 0;
    if (e->n_defer)
        n += post_deferred(e);
    uint64_t head = atomic_load_explicit(&e->sq_head, memory_order_relaxed);
    while (n < AFC_SQ_BUDGET) {
        uint64_t tail = atomic_load_explicit(&e->sq_tail, memory_order_acquire);
        if (head == tail)
            break;
        struct afc_sqe *s = &e->sq[head & e->sq_mask];
        int rc = afc_post_sqe(e, s);
        if (rc == AFC_BLOCKED && e->n_defer < AFC_DEFER)
            e->defer[e->n_defer++] = *s;
        else if (rc == -FI_EAGAIN || rc == AFC_PARTIAL || rc == AFC_BLOCKED)
            break;
        head++;
        n++;
        atomic_store_explicit(&e->sq_head, head, memory_order_release);
    }
    return n;
}

static void complete_op(afc_engine *e, struct afc_op *op, int err, int prov_errno)
{
    if (op->kind == AFC_OP_PAGES || op->kind == AFC_OP_FENCE) {
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
        if (op->kind == AFC_OP_FENCE)
            batch_done(e, b);
        else if (--b->remaining == 0 && b->posted == b->n)
            b->kind == AFC_BATCH_STRIPE ? stripe_landed(e, b) : batch_done(e, b);
        return;
    }
    if (err) {
        STAT_ADD(e, errors, 1);
        afc_ev_push(e, op->id, AFC_EV_ERROR, err, (uint64_t)(int64_t)prov_errno, 0);
    } else {
        STAT_ADD(e, completions, 1);
        afc_ev_push(e, op->id, AFC_EV_DONE, 0, 0, 0);
    }
    if (op->kind == AFC_OP_SEND && op->slot != AFC_NONE)
        send_slot_put(e, op->slot);
    op_put(e, op);
}

static int is_recv_op(afc_engine *e, void *ctx)
{
    return ctx >= (void *)e->recv_ops && ctx < (void *)(e->recv_ops + e->cfg.recv_slots);
}

static void read_cq_error(afc_engine *e, struct afc_rail *rl)
{
    struct fi_cq_err_entry err;
    memset(&err, 0, sizeof err);
    if (fi_cq_readerr(rl->cq, &err, 0) < 0)
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

/* Read one rail's completion queue (dom_lock held).  Returns entries handled. */
static int poll_rail(afc_engine *e, struct afc_rail *rl)
{
    struct fi_cq_data_entry cqe[AFC_CQ_BATCH];
    if (ev_room(e) < AFC_CQ_BATCH + 1)
        return 0; /* Python is behind: leave completions in the provider's queue */
    ssize_t n = fi_cq_read(rl->cq, cqe, AFC_CQ_BATCH);
    if (n == -FI_EAVAIL) {
        read_cq_error(e, rl);
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

static int poll_cq(afc_engine *e)
{
    int n = 0;
    for (uint32_t r = 0; r < e->n_rails; r++) {
        struct afc_rail *rl = &e->rail[r];
        n += poll_rail(e, rl);
        if (rl->rx_cntr) { /* remote writes without completion entries are activity too */
            uint64_t v = fi_cntr_read(rl->rx_cntr);
            if (v != rl->rx_seen) {
                rl->rx_seen = v;
                n++;
            }
        }
    }
    return n;
}

/* Block until woken, the provider signals, or the timeout passes.  Returns 1
 * when something woke it, 0 on timeout or when it did not block. */
static int idle_block(afc_engine *e, int timeout_us)
{
    int woke = 0;
    atomic_store(&e->sleeping, 1);
    if (!afc_sq_empty(e) || atomic_load(&e->stop) || atomic_load(&e->req)) {
        atomic_store(&e->sleeping, 0);
        return 1;
    }
    STAT_ADD(e, worker_sleeps, 1);
    if (e->all_wait_fd) {
        int ready = 1;
        pthread_mutex_lock(&e->dom_lock);
        for (uint32_t r = 0; r < e->n_rails && ready; r++) {
            struct fid *fids[1] = {&e->rail[r].cq->fid};
            ready = fi_trywait(e->rail[r].fabric, fids, 1) == FI_SUCCESS;
        }
        pthread_mutex_unlock(&e->dom_lock);
        if (ready) {
            struct epoll_event evs[AFC_MAX_RAILS + 1];
            woke = epoll_wait(e->epfd, evs, AFC_MAX_RAILS + 1, (timeout_us + 999) / 1000) > 0;
        } else {
            woke = 1;
        }
    } else {
        struct pollfd p = {.fd = e->wake_fd, .events = POLLIN};
        struct timespec ts = {.tv_sec = timeout_us / 1000000, .tv_nsec = (timeout_us % 1000000) * 1000};
        woke = ppoll(&p, 1, &ts, NULL) > 0;
    }
    uint64_t v;
    if (woke && read(e->wake_fd, &v, sizeof v) < 0 && !e->all_wait_fd)
        woke = 0; /* nothing was written: the poll timed out or fired spuriously */
    atomic_store(&e->sleeping, 0);
    if (woke)
        STAT_ADD(e, worker_wakeups, 1);
    return woke;
}

/* The test hook's hold (dom_lock held): as if stuck inside a provider call,
 * until wedge_until passes or afc_debug_wedge(e, 0) clears it.  Deaf to
 * stop, like a provider spinning on a dead peer's lock. */
static void debug_hold(afc_engine *e)
{
    const struct timespec ms = {0, 1000000};
    atomic_store(&e->wedge_held, 1);
    while (afc_now_ns() < atomic_load(&e->wedge_until))
        nanosleep(&ms, NULL);
    atomic_store(&e->wedge_held, 0);
}

/* Serve the requests made without dom_lock (held now).  Only the worker
 * serves the test hook: afc_progress runs on the event loop's thread. */
static void serve_requests(afc_engine *e, int worker)
{
    if (!atomic_load_explicit(&e->req, memory_order_relaxed))
        return;
    if (worker && (atomic_fetch_and(&e->req, ~AFC_REQ_WEDGE) & AFC_REQ_WEDGE))
        debug_hold(e);
    if (atomic_fetch_and(&e->req, ~AFC_REQ_WRITEOFF) & AFC_REQ_WRITEOFF) {
        uint32_t n = afc_write_off_sends(e);
        if (n) {
            STAT_ADD(e, sends_written_off, n);
            afc_notify_loop(e); /* messages waiting for a slot can go now */
        }
    }
}

int afc_debug_wedge(afc_engine *e, int64_t ms)
{
    if (ms < 0 || ms > 600000)
        return -FI_EINVAL;
    atomic_store(&e->wedge_until, ms ? afc_now_ns() + (uint64_t)ms * 1000000ull : 0);
    if (ms) {
        atomic_fetch_or(&e->req, AFC_REQ_WEDGE);
        afc_wake_worker(e);
    }
    return 0;
}

int afc_debug_wedged(afc_engine *e)
{
    return atomic_load(&e->wedge_held);
}

int afc_progress(afc_engine *e)
{
    if (atomic_load_explicit(&e->stop, memory_order_relaxed) || pthread_mutex_trylock(&e->dom_lock))
        return 0;
    serve_requests(e, 0);
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
    const struct timespec pause = {0, (long)e->cfg.poll_pause_ns};

    while (!atomic_load_explicit(&e->stop, memory_order_relaxed)) {
        /* While the event loop polls for itself (loop_spin_us), one poller per
         * engine is enough: sleep, but wake at once for submissions. */
        uint64_t polled = atomic_load_explicit(&e->loop_polled_ns, memory_order_relaxed);
        if (polled && afc_now_ns() - polled < 100000 && !atomic_load_explicit(&e->req, memory_order_relaxed)) {
            idle_block(e, 100);
            continue;
        }
        uint64_t published = atomic_load_explicit(&e->ev_tail, memory_order_relaxed);
        pthread_mutex_lock(&e->dom_lock);
        serve_requests(e, 1);
        int work = submit_queued(e);
        work += poll_cq(e);
        int busy = e->n_op_free < e->cfg.max_ops || !afc_sq_empty(e) || e->n_defer;
        pthread_mutex_unlock(&e->dom_lock);
        if (atomic_load_explicit(&e->ev_tail, memory_order_relaxed) != published)
            afc_notify_loop(e); /* only when there is something for Python */
        /* Operations out but nothing happening for a whole spin window (a peer
         * that never completes them, a long transfer): stop busy polling. */
        if (work || (busy && afc_now_ns() - last_active < spin_ns)) {
            if (work)
                last_active = afc_now_ns();
            sleep_us = 50;
            continue;
        }
        uint64_t window = atomic_load_explicit(&e->expecting, memory_order_relaxed) > 0 && !e->all_wait_fd
                              ? wait_spin_ns
                              : spin_ns;
        if (afc_now_ns() - last_active < window) {
            /* Polling, but let a thread that waits for this core run first (on
             * small machines the event loop that must run next may be one). */
            if (pause.tv_nsec)
                nanosleep(&pause, NULL);
            else
                sched_yield();
            continue;
        }
        /* Idle.  With a wait fd block long; without one back off up to 1 ms. */
        int t = e->all_wait_fd ? max_sleep_us : sleep_us;
        if (idle_block(e, t)) {
            last_active = afc_now_ns();
            sleep_us = 50;
        } else if (!e->all_wait_fd) {
            /* No wait fd: nothing can wake us when a peer writes, so back off,
             * to 1 ms while a task awaits inbound traffic, to idle_ms when none does. */
            int cap = atomic_load_explicit(&e->expecting, memory_order_relaxed) > 0 || busy ? 1000 : max_sleep_us;
            sleep_us = sleep_us * 2 > cap ? cap : sleep_us * 2;
        }
    }
    return NULL;
}
