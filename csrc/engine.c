/* Engine lifetime, addressing, memory registration and the calls Python makes
 * to submit work and drain completions. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "afcore.h"

#define AFC_MR_MODES (FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_PROV_KEY | FI_MR_ALLOCATED | FI_MR_ENDPOINT)

void afc_default_config(struct afc_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->msg_size = 65536;
    cfg->recv_slots = 64;
    cfg->send_slots = 64;
    cfg->max_ops = 4096;
    cfg->sq_slots = 1u << 16;
    cfg->eq_slots = 1u << 16;
    cfg->spin_us = 20000;
    cfg->wait_spin_us = 20000;
    cfg->idle_ms = 10;
    cfg->direct_post = 0;
    cfg->max_peers = 4096;
    cfg->poll_pause_ns = 0;
    cfg->stripe_threshold = 256 * 1024;
    cfg->lock_timeout_ms = 5000;
}

int afc_random_u64(uint64_t *out)
{
    return getrandom(out, sizeof *out, 0) == sizeof *out ? 0 : -FI_EOTHER;
}

static int fail(char *errbuf, size_t errlen, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
    if (rc && n >= 0 && (size_t)n < errlen)
        snprintf(errbuf + n, errlen - (size_t)n, ": %s", fi_strerror(-rc));
    return rc ? rc : -FI_EOTHER;
}

static int is_pow2(uint32_t v) { return v && !(v & (v - 1)); }

static struct fi_info *make_hints(const struct afc_config *cfg, const char *domain, uint64_t extra_caps)
{
    struct fi_info *h = fi_allocinfo();
    if (!h)
        return NULL;
    h->ep_attr->type = FI_EP_RDM;
    h->caps = FI_MSG | FI_RMA | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE | extra_caps;
    h->mode = FI_CONTEXT | FI_CONTEXT2;
    h->domain_attr->mr_mode = AFC_MR_MODES;
    h->domain_attr->threading = FI_THREAD_DOMAIN;
    h->domain_attr->data_progress = FI_PROGRESS_MANUAL;
    h->tx_attr->op_flags = 0;
    if (cfg->provider) {
        h->fabric_attr->prov_name = strdup(cfg->provider);
        /* libfabric 1.17 shm copies plain writes (no immediate) straight into
         * the target with process_vm_writev when no ordering is asked for,
         * checking neither key nor bounds: a stale or forged descriptor then
         * lands anywhere.  Asking for write-after-write ordering keeps shm on
         * its checked path (measured in docs/hostile-peers.md). */
        if (strcmp(cfg->provider, "shm") == 0)
            h->tx_attr->msg_order = FI_ORDER_WAW;
    }
    if (domain)
        h->domain_attr->name = strdup(domain);
    return h;
}

static void free_send_buf(afc_engine *e, char *buf, struct fid_mr *mr);

/* Register on one rail with a random key (unless the provider chooses),
 * binding to the endpoint where the provider asks for it.  dom_lock held or
 * not yet shared. */
static int reg_rail(afc_engine *e, uint32_t r, void *buf, size_t len, uint64_t access,
                    struct fid_mr **out)
{
    struct afc_rail *rl = &e->rail[r];
    int rc = -FI_ENOKEY;
    for (int tries = 0; tries < 16 && rc == -FI_ENOKEY; tries++) {
        uint64_t key = 0;
        if (!(e->mr_mode & FI_MR_PROV_KEY) && afc_random_u64(&key))
            return -FI_EOTHER;
        rc = fi_mr_reg(rl->domain, buf, len, access, 0, key & e->key_mask, 0, out, NULL);
    }
    if (!rc && (e->mr_mode & FI_MR_ENDPOINT)) {
        rc = fi_mr_bind(*out, &rl->ep->fid, 0);
        if (!rc)
            rc = fi_mr_enable(*out);
        if (rc)
            fi_close(&(*out)->fid);
    }
    if (rc)
        *out = NULL; /* nothing for the caller to close */
    return rc;
}

/* CLOCK_MONOTONIC time ms milliseconds from now */
static struct timespec deadline_in(uint32_t ms)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    uint64_t ns = (uint64_t)t.tv_nsec + (uint64_t)ms * 1000000ull;
    t.tv_sec += (time_t)(ns / 1000000000ull);
    t.tv_nsec = (long)(ns % 1000000000ull);
    return t;
}

/* Take dom_lock for a call the event loop makes, waiting at most
 * cfg.lock_timeout_ms.  The worker holds the lock around every provider
 * call, and a provider can spin for ever inside one: then this fails
 * instead of hanging the loop.  0, or -AFC_EWEDGED without the lock. */
static int dom_lock_bounded(afc_engine *e)
{
    struct timespec t = deadline_in(e->cfg.lock_timeout_ms);
    return pthread_mutex_clocklock(&e->dom_lock, CLOCK_MONOTONIC, &t) ? -AFC_EWEDGED : 0;
}

static int alloc_rings(afc_engine *e)
{
    const struct afc_config *c = &e->cfg;
    e->sq = calloc(c->sq_slots, sizeof *e->sq);
    e->sq_mask = c->sq_slots - 1;
    e->evr = calloc(c->eq_slots, sizeof *e->evr);
    e->ev_mask = c->eq_slots - 1;
    e->ops = calloc(c->max_ops, sizeof *e->ops);
    e->op_free = calloc(c->max_ops, sizeof *e->op_free);
    e->recv_ops = calloc(c->recv_slots, sizeof *e->recv_ops);
    e->send_free = calloc(c->send_slots, sizeof *e->send_free);
    e->send_slots = calloc(c->send_slots, sizeof *e->send_slots);
    e->peers = calloc(c->max_peers, sizeof *e->peers);
    e->peer_free = calloc(c->max_peers, sizeof *e->peer_free);
    if (posix_memalign((void **)&e->msg_mem, 4096,
                       (size_t)(c->recv_slots + c->send_slots) * c->msg_size))
        e->msg_mem = NULL;
    if (!e->sq || !e->evr || !e->ops || !e->op_free || !e->recv_ops || !e->send_free || !e->send_slots ||
        !e->msg_mem || !e->peers || !e->peer_free)
        return -FI_ENOMEM;
    for (uint32_t i = 0; i < c->max_ops; i++) {
        e->op_free[i] = c->max_ops - 1 - i;
        e->ops[i].peer = AFC_NONE;
    }
    for (uint32_t i = 0; i < c->send_slots; i++)
        e->send_slots[i].buf = e->msg_mem + (size_t)(c->recv_slots + i) * c->msg_size;
    e->n_op_free = c->max_ops; /* ops_out stays 0 */
    for (uint32_t i = 0; i < c->send_slots; i++)
        e->send_free[i] = c->send_slots - 1 - i;
    e->n_send_free = c->send_slots;
    for (uint32_t i = 0; i < c->max_peers; i++)
        e->peer_free[i] = c->max_peers - 1 - i;
    e->n_peer_free = c->max_peers;
    return 0;
}

static int open_fds(afc_engine *e)
{
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->ev_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->wake_fd < 0 || e->ev_fd < 0 || e->epfd < 0)
        return -errno;
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.fd = e->wake_fd;
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wake_fd, &ev))
        return -errno;
    e->all_wait_fd = 1;
    for (uint32_t r = 0; r < e->n_rails; r++) {
        struct afc_rail *rl = &e->rail[r];
        ev.data.fd = rl->cq_fd;
        if (rl->cq_fd < 0 || epoll_ctl(e->epfd, EPOLL_CTL_ADD, rl->cq_fd, &ev))
            e->all_wait_fd = 0; /* the worker falls back to timed sleeps */
    }
    return 0;
}

static int open_cq(struct afc_rail *rl)
{
    struct fi_cq_attr attr = {.format = FI_CQ_FORMAT_DATA, .size = 0, .wait_obj = FI_WAIT_FD};
    rl->cq_fd = -1;
    if (fi_cq_open(rl->domain, &attr, &rl->cq, NULL) == 0) {
        if (fi_control(&rl->cq->fid, FI_GETWAIT, &rl->cq_fd) == 0 && rl->cq_fd >= 0)
            return 0;
        fi_close(&rl->cq->fid);
        rl->cq_fd = -1;
    }
    attr.wait_obj = FI_WAIT_NONE;
    return fi_cq_open(rl->domain, &attr, &rl->cq, NULL);
}

/* Open rail r on the named domain (NULL: the provider's first). */
static int open_rail(afc_engine *e, uint32_t r, const struct afc_config *cfg, const char *domain,
                     char *errbuf, size_t errlen)
{
    struct afc_rail *rl = &e->rail[r];
    /* Prefer a provider that can count remote writes landing here
     * (FI_RMA_EVENT): the worker then sees inbound traffic that produces no
     * completion entries and keeps polling while it flows. */
    int rc = -FI_ENODATA;
    for (int with_events = 1; with_events >= 0 && rc; with_events--) {
        struct fi_info *hints = make_hints(cfg, domain, with_events ? FI_RMA_EVENT : 0);
        if (!hints)
            return fail(errbuf, errlen, -FI_ENOMEM, "fi_allocinfo");
        rc = fi_getinfo(FI_VERSION(1, 9), cfg->node, NULL, 0, hints, &rl->info);
        fi_freeinfo(hints);
        if (rc == 0 && domain) { /* the event-capable list must still have this NIC */
            struct fi_info *x = rl->info;
            while (x && !(x->domain_attr->name && strcmp(x->domain_attr->name, domain) == 0))
                x = x->next;
            if (!x && with_events) {
                fi_freeinfo(rl->info);
                rl->info = NULL;
                rc = -FI_ENODATA;
            }
        }
    }
    if (rc)
        return fail(errbuf, errlen, rc, "fi_getinfo(provider=%s, domain=%s)",
                    cfg->provider ? cfg->provider : "any", domain ? domain : "any");
    struct fi_info *fi = rl->info;
    if (domain) {
        /* Not every provider filters on the domain name hint: pick it here. */
        while (fi && !(fi->domain_attr->name && strcmp(fi->domain_attr->name, domain) == 0))
            fi = fi->next;
        if (!fi)
            return fail(errbuf, errlen, -FI_ENODATA, "provider %s has no NIC (domain) named %s",
                        cfg->provider ? cfg->provider : "any", domain);
    }
    struct fi_info *chosen = fi_dupinfo(fi);
    fi_freeinfo(rl->info);
    rl->info = fi = chosen;
    if (!fi)
        return fail(errbuf, errlen, -FI_ENOMEM, "fi_dupinfo");
    if (r == 0) {
        e->mr_mode = fi->domain_attr->mr_mode;
        size_t ks = fi->domain_attr->mr_key_size;
        e->key_mask = ks >= 8 || ks == 0 ? ~0ull : (1ull << (8 * ks)) - 1;
    } else if (strcmp(fi->fabric_attr->prov_name, e->rail[0].info->fabric_attr->prov_name) ||
               (uint64_t)fi->domain_attr->mr_mode != e->mr_mode) {
        return fail(errbuf, errlen, -FI_EINVAL, "NIC %s uses provider %s, NIC %s %s: one provider per engine",
                    fi->domain_attr->name, fi->fabric_attr->prov_name,
                    e->rail[0].info->domain_attr->name, e->rail[0].info->fabric_attr->prov_name);
    }
    if ((rc = fi_fabric(fi->fabric_attr, &rl->fabric, NULL)))
        return fail(errbuf, errlen, rc, "fi_fabric");
    if ((rc = fi_domain(rl->fabric, fi, &rl->domain, NULL)))
        return fail(errbuf, errlen, rc, "fi_domain");
    struct fi_av_attr av_attr = {.type = FI_AV_TABLE};
    if ((rc = fi_av_open(rl->domain, &av_attr, &rl->av, NULL)))
        return fail(errbuf, errlen, rc, "fi_av_open");
    if ((rc = open_cq(rl)))
        return fail(errbuf, errlen, rc, "fi_cq_open");
    if ((rc = fi_endpoint(rl->domain, fi, &rl->ep, NULL)))
        return fail(errbuf, errlen, rc, "fi_endpoint");
    if ((rc = fi_ep_bind(rl->ep, &rl->av->fid, 0)))
        return fail(errbuf, errlen, rc, "fi_ep_bind(av)");
    if ((rc = fi_ep_bind(rl->ep, &rl->cq->fid, FI_TRANSMIT | FI_RECV)))
        return fail(errbuf, errlen, rc, "fi_ep_bind(cq)");
    if (fi->caps & FI_RMA_EVENT) {
        struct fi_cntr_attr ca = {.events = FI_CNTR_EVENTS_COMP, .wait_obj = FI_WAIT_NONE};
        if (fi_cntr_open(rl->domain, &ca, &rl->rx_cntr, NULL) == 0 &&
            fi_ep_bind(rl->ep, &rl->rx_cntr->fid, FI_REMOTE_WRITE) != 0) {
            fi_close(&rl->rx_cntr->fid); /* optional: poll without it */
            rl->rx_cntr = NULL;
        }
    }
    if ((rc = fi_enable(rl->ep)))
        return fail(errbuf, errlen, rc, "fi_enable");
    return 0;
}

static int open_rails(afc_engine *e, const struct afc_config *cfg, char *errbuf, size_t errlen)
{
    if (cfg->n_domains > AFC_MAX_RAILS)
        return fail(errbuf, errlen, -FI_EINVAL, "%u NICs: at most %d per engine", cfg->n_domains,
                    AFC_MAX_RAILS);
    e->n_rails = cfg->n_domains ? cfg->n_domains : 1;
    for (uint32_t r = 0; r < e->n_rails; r++) {
        int rc = open_rail(e, r, cfg, cfg->n_domains ? cfg->domains[r] : NULL, errbuf, errlen);
        if (rc)
            return rc;
    }
    /* Messages use rail 0. */
    size_t msg_bytes = (size_t)(e->cfg.recv_slots + e->cfg.send_slots) * e->cfg.msg_size;
    int rc = reg_rail(e, 0, e->msg_mem, msg_bytes, FI_SEND | FI_RECV, &e->msg_mr);
    if (rc)
        return fail(errbuf, errlen, rc, "fi_mr_reg(message buffers)");
    for (uint32_t i = 0; i < e->cfg.send_slots; i++)
        e->send_slots[i].mr = e->msg_mr;
    for (uint32_t i = 0; i < e->cfg.recv_slots; i++)
        if ((rc = afc_post_recv(e, i)))
            return fail(errbuf, errlen, rc, "fi_recv");
    return 0;
}

int afc_open(const struct afc_config *cfg, afc_engine **out, char *errbuf, size_t errlen)
{
    *out = NULL;
    if (!is_pow2(cfg->sq_slots) || !is_pow2(cfg->eq_slots) || !cfg->max_ops || !cfg->recv_slots ||
        !cfg->send_slots || cfg->msg_size < 64 || !cfg->max_peers || cfg->max_peers > (1u << 24) || cfg->poll_pause_ns >= 1000000000u ||
        !cfg->lock_timeout_ms)
        return fail(errbuf, errlen, -FI_EINVAL, "invalid engine configuration");
    afc_engine *e = calloc(1, sizeof *e);
    if (!e)
        return fail(errbuf, errlen, -FI_ENOMEM, "calloc");
    e->cfg = *cfg;
    e->cfg.provider = e->cfg.node = NULL; /* not owned: used only here */
    memset(e->cfg.domains, 0, sizeof e->cfg.domains);
    e->wake_fd = e->ev_fd = e->epfd = -1;
    for (int r = 0; r < AFC_MAX_RAILS; r++)
        e->rail[r].cq_fd = -1;
    atomic_store(&e->armed, 1);
    pthread_mutex_init(&e->dom_lock, NULL);
    pthread_mutex_init(&e->sq_lock, NULL);
    int rc = alloc_rings(e);
    if (rc)
        rc = fail(errbuf, errlen, rc, "allocating engine queues");
    if (!rc)
        rc = open_rails(e, cfg, errbuf, errlen);
    if (!rc && (rc = open_fds(e)))
        rc = fail(errbuf, errlen, -FI_EOTHER, "eventfd/epoll: %s", strerror(-rc));
    if (!rc) {
        if (pthread_create(&e->worker, NULL, afc_worker_main, e))
            rc = fail(errbuf, errlen, -FI_EOTHER, "pthread_create");
        else
            e->worker_started = 1;
    }
    if (rc) {
        afc_close(e);
        return rc;
    }
    *out = e;
    return 0;
}

static void close_fid(struct fid *f)
{
    if (f)
        fi_close(f);
}

/* Join the worker, waiting at most timeout_ms.  0 when it has exited. */
static int join_worker(afc_engine *e, uint32_t timeout_ms)
{
    struct timespec t = deadline_in(timeout_ms);
    return pthread_clockjoin_np(e->worker, NULL, CLOCK_MONOTONIC, &t);
}

int afc_stop(afc_engine *e, uint32_t timeout_ms)
{
    if (atomic_load(&e->abandoned))
        return -AFC_EWEDGED;
    afc_watch_shutdown(e); /* no armed transfer may be submitted from here on */
    atomic_store(&e->stop, 1);
    if (e->worker_started) {
        uint64_t one = 1;
        ssize_t r = write(e->wake_fd, &one, sizeof one);
        (void)r;
        if (join_worker(e, timeout_ms)) {
            /* Stuck inside a provider call, holding dom_lock.  Nothing can
             * interrupt it, and it may return some day and touch the engine,
             * its buffers and the provider's objects: abandon them all. */
            pthread_detach(e->worker);
            e->worker_started = 0;
            atomic_store(&e->abandoned, 1);
            return -AFC_EWEDGED;
        }
        e->worker_started = 0;
    }
    if (e->rail[0].ep && e->rail[0].cq)
        afc_quiesce(e, 200); /* some providers crash closing an endpoint with work in flight */
    for (uint32_t r = 0; r < AFC_MAX_RAILS; r++) {
        if (e->rail[r].ep) {
            fi_close(&e->rail[r].ep->fid);
            e->rail[r].ep = NULL;
        }
    }
    return 0;
}

/* A batch that never reached afc_post_sqe is on no list: only its
 * submission refers to it. */
static void free_queued_batches(afc_engine *e)
{
    for (uint64_t h = atomic_load(&e->sq_head); e->sq && h != atomic_load(&e->sq_tail); h++) {
        struct afc_sqe *s = &e->sq[h & e->sq_mask];
        if (s->kind == AFC_OP_PAGES && !s->batch->live)
            afc_batch_free(e, s->batch);
    }
}

void afc_close(afc_engine *e)
{
    if (!e)
        return;
    if (afc_stop(e, e->cfg.lock_timeout_ms))
        return; /* abandoned: the stuck worker may still use all of it */
    /* Endpoints are closed: no provider holds a send buffer any more. */
    while (e->orphans) {
        struct afc_orphan *o = e->orphans;
        e->orphans = o->next;
        free_send_buf(e, o->buf, o->mr);
        free(o);
    }
    for (uint32_t i = 0; e->send_slots && i < e->cfg.send_slots; i++)
        free_send_buf(e, e->send_slots[i].buf, e->send_slots[i].mr);
    free(e->send_slots);
    close_fid(e->msg_mr ? &e->msg_mr->fid : NULL);
    for (uint32_t r = 0; r < AFC_MAX_RAILS; r++) {
        struct afc_rail *rl = &e->rail[r];
        close_fid(rl->av ? &rl->av->fid : NULL);
        close_fid(rl->cq ? &rl->cq->fid : NULL);
        close_fid(rl->rx_cntr ? &rl->rx_cntr->fid : NULL);
        close_fid(rl->domain ? &rl->domain->fid : NULL);
        close_fid(rl->fabric ? &rl->fabric->fid : NULL);
        if (rl->info)
            fi_freeinfo(rl->info);
    }
    free_queued_batches(e);
    while (e->batches)
        afc_batch_free(e, e->batches);
    if (e->wake_fd >= 0)
        close(e->wake_fd);
    if (e->ev_fd >= 0)
        close(e->ev_fd);
    if (e->epfd >= 0)
        close(e->epfd);
    free(e->sq);
    free(e->evr);
    free(e->ops);
    free(e->op_free);
    free(e->recv_ops);
    free(e->send_free);
    free(e->peers);
    free(e->peer_free);
    free(e->msg_mem);
    pthread_mutex_destroy(&e->dom_lock);
    pthread_mutex_destroy(&e->sq_lock);
    free(e);
}

int afc_event_fd(afc_engine *e) { return e->ev_fd; }

void afc_expect(afc_engine *e, int delta)
{
    if (atomic_fetch_add(&e->expecting, delta) + delta > 0 && delta > 0)
        afc_wake_worker(e);
}

static void copy_str(char *dst, size_t n, const char *src)
{
    snprintf(dst, n, "%s", src ? src : "");
}

uint32_t afc_n_rails(afc_engine *e) { return e->n_rails; }

void afc_get_info(afc_engine *e, uint32_t rail, struct afc_info *o)
{
    memset(o, 0, sizeof *o);
    if (rail >= e->n_rails)
        return;
    struct afc_rail *rl = &e->rail[rail];
    struct fi_info *fi = rl->info;
    copy_str(o->provider, sizeof o->provider, fi->fabric_attr->prov_name);
    copy_str(o->fabric, sizeof o->fabric, fi->fabric_attr->name);
    copy_str(o->domain, sizeof o->domain, fi->domain_attr->name);
    o->mr_mode = fi->domain_attr->mr_mode;
    o->caps = fi->caps;
    o->max_msg_size = fi->ep_attr->max_msg_size;
    o->inject_size = fi->tx_attr->inject_size;
    o->cq_data_size = (uint32_t)fi->domain_attr->cq_data_size;
    o->mr_key_size = (uint32_t)fi->domain_attr->mr_key_size;
    o->data_progress = fi->domain_attr->data_progress;
    o->threading = fi->domain_attr->threading;
    o->wait_fd = rl->cq_fd >= 0;
    o->rx_events = rl->rx_cntr != NULL;
    size_t len = 0;
    fi_getname(&rl->ep->fid, NULL, &len);
    o->addr_len = (uint32_t)len;
}

int afc_local_addr(afc_engine *e, uint32_t rail, void *buf, size_t *len)
{
    if (rail >= e->n_rails)
        return -FI_EINVAL;
    return fi_getname(&e->rail[rail].ep->fid, buf, len);
}

void afc_get_stats(afc_engine *e, struct afc_stats *o)
{
#define S(f) o->f = atomic_load_explicit(&e->st.f, memory_order_relaxed)
    S(writes_posted);
    S(bytes_posted);
    S(sends_posted);
    S(completions);
    S(errors);
    S(imms_received);
    S(msgs_received);
    S(eagain);
    S(worker_sleeps);
    S(worker_wakeups);
    S(sends_written_off);
#undef S
    for (uint32_t r = 0; r < AFC_MAX_RAILS; r++)
        o->rail_bytes[r] = atomic_load_explicit(&e->rail[r].bytes_posted, memory_order_relaxed);
    o->fence_unconfirmed = (uint32_t)e->no_dc;
    o->sq_depth = atomic_load(&e->sq_tail) - atomic_load(&e->sq_head);
    /* Published by op_get/op_put: statistics never wait for the domain lock. */
    o->ops_in_flight = atomic_load_explicit(&e->ops_out, memory_order_relaxed);
}

static void peer_release(afc_engine *e, uint32_t id) /* dom_lock held */
{
    struct afc_peer *p = &e->peers[id];
    for (uint32_t k = 0; k < p->n_paths; k++) {
        if (p->addr[k] != FI_ADDR_NOTAVAIL) {
            /* Paths that share a (rail, peer rail) pair share the entry. */
            int dup = 0;
            for (uint32_t j = 0; j < k; j++)
                dup |= p->addr[j] == p->addr[k] && j % e->n_rails == k % e->n_rails;
            if (!dup)
                fi_av_remove(e->rail[k % e->n_rails].av, &p->addr[k], 1, 0);
        }
    }
    memset(p, 0, sizeof *p);
    e->peer_free[e->n_peer_free++] = id;
}

int afc_peer_add(afc_engine *e, const char *names, const uint32_t *lens, uint32_t n_rails,
                 uint32_t *peer)
{
    if (n_rails == 0 || n_rails > AFC_MAX_RAILS)
        return -FI_EINVAL;
    size_t off[AFC_MAX_RAILS], o = 0;
    for (uint32_t r = 0; r < n_rails; r++) {
        if (lens[r] == 0 || lens[r] > AFC_ADDR_MAX)
            return -FI_EINVAL;
        off[r] = o;
        o += lens[r];
    }
    int rc = dom_lock_bounded(e);
    if (rc)
        return rc;
    if (!e->n_peer_free) {
        pthread_mutex_unlock(&e->dom_lock);
        return -FI_ENOSPC;
    }
    uint32_t id = e->peer_free[--e->n_peer_free];
    struct afc_peer *p = &e->peers[id];
    p->n_rails = n_rails;
    p->n_paths = n_rails > e->n_rails ? n_rails : e->n_rails;
    for (uint32_t k = 0; k < AFC_MAX_RAILS; k++)
        p->addr[k] = FI_ADDR_NOTAVAIL;
    for (uint32_t k = 0; k < p->n_paths && !rc; k++) {
        uint32_t l = k % e->n_rails, r = k % n_rails;
        for (uint32_t j = 0; j < k; j++) /* an earlier path over the same pair */
            if (j % e->n_rails == l && j % n_rails == r)
                p->addr[k] = p->addr[j];
        if (p->addr[k] != FI_ADDR_NOTAVAIL)
            continue;
        int n = fi_av_insert(e->rail[l].av, names + off[r], 1, &p->addr[k], 0, NULL);
        if (n != 1) {
            p->addr[k] = FI_ADDR_NOTAVAIL;
            rc = n < 0 ? n : -FI_EADDRNOTAVAIL;
        }
    }
    p->live = 1;
    if (rc)
        peer_release(e, id);
    pthread_mutex_unlock(&e->dom_lock);
    if (!rc)
        *peer = id;
    return rc;
}

int afc_peer_remove(afc_engine *e, uint32_t peer)
{
    int rc = dom_lock_bounded(e);
    if (rc)
        return rc;
    rc = peer < e->cfg.max_peers && e->peers[peer].live ? 0 : -FI_EINVAL;
    if (!rc)
        peer_release(e, peer);
    pthread_mutex_unlock(&e->dom_lock);
    return rc;
}

/* A send buffer of its own (a replacement), or a piece of the message block. */
static void free_send_buf(afc_engine *e, char *buf, struct fid_mr *mr)
{
    if (mr && mr != e->msg_mr)
        fi_close(&mr->fid);
    if (buf && (buf < e->msg_mem ||
                buf >= e->msg_mem + (size_t)(e->cfg.recv_slots + e->cfg.send_slots) * e->cfg.msg_size))
        free(buf);
}

/* Sends to a failed peer may never complete (shm and rxd keep them for
 * ever): give their slots back with fresh buffers, so that a dead peer cannot
 * use up the slots every other peer needs.  The provider keeps the old
 * buffer until close; a late completion finds the slot written off.
 * dom_lock held (the worker serves AFC_REQ_WRITEOFF: afc_peer_fail cannot
 * wait for the lock).  Covers every failed peer; returns how many were
 * written off. */
uint32_t afc_write_off_sends(afc_engine *e)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < e->cfg.max_ops; i++) {
        struct afc_op *op = &e->ops[i];
        if (op->peer == AFC_NONE || op->kind != AFC_OP_SEND || op->slot == AFC_NONE ||
            !afc_peer_failed(e, op->peer))
            continue;
        struct afc_orphan *o = malloc(sizeof *o);
        char *buf = NULL;
        struct fid_mr *mr = NULL;
        if (!o || posix_memalign((void **)&buf, 4096, e->cfg.msg_size)) {
            free(o);
            break; /* out of memory: the slot stays with its operation */
        }
        if (reg_rail(e, 0, buf, e->cfg.msg_size, FI_SEND, &mr)) {
            free(o);
            free(buf);
            break;
        }
        struct afc_send_slot *s = &e->send_slots[op->slot];
        o->buf = s->buf;
        o->mr = s->mr;
        o->next = e->orphans;
        e->orphans = o;
        s->buf = buf;
        s->mr = mr;
        pthread_mutex_lock(&e->sq_lock);
        e->send_free[e->n_send_free++] = op->slot;
        pthread_mutex_unlock(&e->sq_lock);
        op->slot = AFC_NONE;
        n++;
    }
    return n;
}

/* Called when failure detection fires, which is exactly when the worker may
 * be stuck in the provider on that peer: so no lock.  `live` is written only
 * by the caller's thread (afc_peer_add/remove); the posting paths read
 * `failed` before every post, and the worker writes off the peer's sends the
 * next time it holds the lock. */
int afc_peer_fail(afc_engine *e, uint32_t peer, int32_t err)
{
    if (peer >= e->cfg.max_peers || !e->peers[peer].live)
        return -FI_EINVAL;
    atomic_store(&e->peers[peer].failed, err > 0 ? err : FI_EHOSTUNREACH);
    atomic_fetch_or(&e->req, AFC_REQ_WRITEOFF);
    afc_wake_worker(e);
    return 0;
}

uint32_t afc_peer_paths(afc_engine *e, uint32_t peer)
{
    return peer < e->cfg.max_peers ? e->peers[peer].n_paths : 0;
}

/* Close a registration's per-rail regions (dom_lock held); first error. */
static int close_mrs(afc_mr *m)
{
    int rc = 0;
    for (uint32_t r = 0; r < AFC_MAX_RAILS; r++)
        if (m->mr[r]) {
            int x = fi_close(&m->mr[r]->fid);
            rc = rc ? rc : x;
            m->mr[r] = NULL;
        }
    return rc;
}

int afc_mr_reg(afc_engine *e, void *buf, size_t len, uint64_t access, afc_mr **out, uint64_t *keys,
               uint64_t *remote_base)
{
    afc_mr *m = calloc(1, sizeof *m);
    if (!m)
        return -FI_ENOMEM;
    m->engine = e;
    int rc = dom_lock_bounded(e);
    if (rc) {
        free(m);
        return rc;
    }
    for (uint32_t r = 0; r < e->n_rails && !rc; r++)
        rc = reg_rail(e, r, buf, len, access, &m->mr[r]);
    if (rc)
        close_mrs(m); /* the rails registered before the failure */
    pthread_mutex_unlock(&e->dom_lock);
    if (rc) {
        free(m);
        return rc;
    }
    for (uint32_t r = 0; r < e->n_rails; r++)
        keys[r] = fi_mr_key(m->mr[r]);
    *remote_base = (e->mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)buf : 0;
    *out = m;
    return 0;
}

int afc_mr_close(afc_mr *m)
{
    afc_engine *e = m->engine;
    int rc = dom_lock_bounded(e);
    if (rc)
        return rc; /* still registered: the caller may try again */
    rc = close_mrs(m);
    pthread_mutex_unlock(&e->dom_lock);
    free(m);
    return rc;
}

/* Queue a submission (or post it from this thread in direct mode). */
static int submit(afc_engine *e, const struct afc_sqe *s)
{
    if (atomic_load_explicit(&e->stop, memory_order_relaxed))
        return -FI_ESHUTDOWN;
    /* Direct posting only when the lock is free right now: the worker holds it
     * while it polls (queueing is then as fast) or while stuck in the provider
     * (waiting would hang the caller). */
    if (e->cfg.direct_post && s->kind != AFC_OP_PAGES && afc_sq_empty(e) &&
        pthread_mutex_trylock(&e->dom_lock) == 0) {
        uint64_t published = atomic_load_explicit(&e->ev_tail, memory_order_relaxed);
        int rc = afc_post_sqe(e, s);
        pthread_mutex_unlock(&e->dom_lock);
        if (atomic_load_explicit(&e->ev_tail, memory_order_relaxed) != published)
            afc_notify_loop(e); /* the post failed at once: its error record is waiting */
        if (rc != -FI_EAGAIN && rc != AFC_BLOCKED) { /* refused for now: queue it */
            afc_wake_worker(e);
            return rc;
        }
    }
    pthread_mutex_lock(&e->sq_lock);
    uint64_t tail = atomic_load_explicit(&e->sq_tail, memory_order_relaxed);
    if (tail - atomic_load_explicit(&e->sq_head, memory_order_acquire) > e->sq_mask) {
        pthread_mutex_unlock(&e->sq_lock);
        return -FI_EAGAIN;
    }
    e->sq[tail & e->sq_mask] = *s;
    atomic_store_explicit(&e->sq_tail, tail + 1, memory_order_release);
    pthread_mutex_unlock(&e->sq_lock);
    afc_wake_worker(e);
    return 0;
}

/* Peers are added and written to by the same (event loop) thread; the table
 * never moves, so reading an entry here needs no lock. */
static struct afc_peer *peer_of(afc_engine *e, uint32_t peer)
{
    return peer < e->cfg.max_peers && e->peers[peer].live ? &e->peers[peer] : NULL;
}

static struct afc_batch *batch_new(afc_engine *e, uint64_t id, uint32_t kind, uint32_t peer, afc_mr *mr,
                                   uint64_t src, uint64_t raddr, const uint64_t *rkeys, int64_t imm)
{
    struct afc_batch *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->id = id;
    b->kind = kind;
    b->peer = peer;
    b->mr = mr;
    b->src = src;
    b->raddr = raddr;
    b->imm = imm;
    memcpy(b->rkeys, rkeys, e->peers[peer].n_rails * sizeof *rkeys);
    return b;
}

/* Queue a batch; frees it when it could not be queued.  No lock: the batch
 * joins the engine's live list when it is first posted (afc_post_sqe), and
 * afc_close frees those still queued. */
static int submit_batch(afc_engine *e, struct afc_batch *b)
{
    struct afc_sqe s = {.kind = AFC_OP_PAGES, .id = b->id, .imm = b->imm, .batch = b};
    int rc = submit(e, &s); /* batches always go through the worker */
    if (rc) /* not queued: nothing else references the batch */
        afc_batch_free(e, b);
    return rc;
}

int afc_write_path(afc_engine *e, uint64_t id, uint64_t src, size_t len, afc_mr *mr, uint32_t peer,
                   int32_t path, uint64_t raddr, const uint64_t *rkeys, int64_t imm)
{
    struct afc_peer *p = peer_of(e, peer);
    if (!p || path >= (int32_t)p->n_paths)
        return -FI_EINVAL;
    if (path < 0 && p->n_paths > 1 && len >= e->cfg.stripe_threshold && len >= 2) {
        struct afc_batch *b = batch_new(e, id, AFC_BATCH_STRIPE, peer, mr, src, raddr, rkeys, imm);
        if (!b)
            return -FI_ENOMEM;
        /* Shards of equal size rounded up to 4 KiB; no empty shard is posted. */
        uint64_t shard = (len + p->n_paths - 1) / p->n_paths;
        shard = (shard + 4095) & ~4095ull;
        b->page = shard;
        b->len = len;
        b->n = (len + shard - 1) / shard;
        b->remaining = b->n;
        return submit_batch(e, b);
    }
    struct afc_sqe s = {.kind = AFC_OP_WRITE, .id = id, .src = (const void *)(uintptr_t)src, .len = len,
                        .mr = mr, .peer = peer, .path = path, .raddr = raddr, .imm = imm};
    memcpy(s.rkeys, rkeys, p->n_rails * sizeof *rkeys);
    return submit(e, &s);
}

int afc_write(afc_engine *e, uint64_t id, uint64_t src, size_t len, afc_mr *mr, uint32_t peer,
              uint64_t raddr, const uint64_t *rkeys, int64_t imm)
{
    return afc_write_path(e, id, src, len, mr, peer, -1, raddr, rkeys, imm);
}

int afc_send(afc_engine *e, uint64_t id, const char *hdr, size_t hlen, const char *data, size_t len,
             uint32_t peer)
{
    if (hlen + len > e->cfg.msg_size)
        return -FI_EMSGSIZE;
    if (!peer_of(e, peer))
        return -FI_EINVAL;
    pthread_mutex_lock(&e->sq_lock);
    if (!e->n_send_free) {
        pthread_mutex_unlock(&e->sq_lock);
        return -FI_EAGAIN;
    }
    uint32_t slot = e->send_free[--e->n_send_free];
    pthread_mutex_unlock(&e->sq_lock);
    char *buf = afc_send_buf(e, slot);
    memcpy(buf, hdr, hlen);
    memcpy(buf + hlen, data, len);
    struct afc_sqe s = {.kind = AFC_OP_SEND, .id = id, .slot = slot, .len = hlen + len, .peer = peer,
                        .path = 0, .imm = -1};
    int rc = submit(e, &s);
    if (rc) {
        pthread_mutex_lock(&e->sq_lock);
        e->send_free[e->n_send_free++] = slot;
        pthread_mutex_unlock(&e->sq_lock);
    }
    return rc;
}

int afc_write_pages(afc_engine *e, uint64_t id, uint64_t src, afc_mr *mr, uint32_t peer, uint64_t raddr,
                    const uint64_t *rkeys, uint64_t page_size, uint64_t src_stride, uint64_t dst_stride,
                    const int64_t *src_idx, const int64_t *dst_idx, uint64_t n, int64_t imm)
{
    struct afc_peer *p = peer_of(e, peer);
    if (n == 0 || page_size == 0 || !p)
        return -FI_EINVAL;
    struct afc_batch *b = batch_new(e, id, AFC_BATCH_PAGES, peer, mr, src, raddr, rkeys, imm);
    int64_t *idx = malloc(2 * n * sizeof *idx);
    if (!b || !idx) {
        free(b);
        free(idx);
        return -FI_ENOMEM;
    }
    memcpy(idx, src_idx, n * sizeof *idx);
    memcpy(idx + n, dst_idx, n * sizeof *idx);
    b->n = b->remaining = n;
    b->page = page_size;
    b->sstride = src_stride;
    b->dstride = dst_stride;
    b->sidx = idx;
    b->didx = idx + n;
    /* One contiguous range of pages per path. */
    for (uint32_t k = 0; k < p->n_paths; k++) {
        b->cur[k] = n * k / p->n_paths;
        b->end[k] = n * (k + 1) / p->n_paths;
    }
    return submit_batch(e, b);
}

const void *afc_recv_buf(afc_engine *e, uint32_t slot)
{
    return slot < e->cfg.recv_slots ? e->msg_mem + (size_t)slot * e->cfg.msg_size : NULL;
}

int afc_recv_release(afc_engine *e, uint32_t slot)
{
    if (slot >= e->cfg.recv_slots)
        return -FI_EINVAL;
    struct afc_sqe s = {.kind = AFC_OP_REPOST, .slot = slot, .imm = -1};
    return submit(e, &s);
}

int afc_drain(afc_engine *e, uint64_t *ok_ids, int max_ok, struct afc_event *ev, int max_ev, int *n_ev)
{
    int n_ok = 0, ne = 0;
    uint64_t v;
    ssize_t r = read(e->ev_fd, &v, sizeof v);
    (void)r;
    for (;;) {
        uint64_t head = atomic_load_explicit(&e->ev_head, memory_order_relaxed);
        uint64_t tail = atomic_load_explicit(&e->ev_tail, memory_order_acquire);
        while (head != tail && n_ok < max_ok && ne < max_ev) {
            struct afc_event *x = &e->evr[head & e->ev_mask];
            if (x->kind == AFC_EV_DONE) {
                ok_ids[n_ok++] = x->id;
            } else if (x->kind == AFC_EV_IMM && ne && ev[ne - 1].kind == AFC_EV_IMM &&
                       ev[ne - 1].data == x->data) {
                ev[ne - 1].aux += x->aux;
            } else {
                ev[ne++] = *x;
            }
            head++;
        }
        atomic_store_explicit(&e->ev_head, head, memory_order_release);
        if (head != tail || n_ok == max_ok || ne == max_ev)
            break; /* caller's buffers are full: it calls again */
        atomic_store(&e->armed, 1);
        if (atomic_load(&e->ev_tail) == head || !atomic_exchange(&e->armed, 0))
            break;
    }
    *n_ev = ne;
    return n_ok;
}
