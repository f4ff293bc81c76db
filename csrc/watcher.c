/* The watcher: slots of 64-bit values that a producer (a CPU thread here, a
 * GPU stream or kernel later) raises; one native thread per engine polls
 * them, submits pre-armed transfers the moment a slot reaches their value,
 * and tells the event loop (through the watcher's eventfd) when a slot that
 * a task awaits has changed.  It never touches Python.
 *
 * Locking: everything below is guarded by the hub's mutex, except the slot
 * values (written by the producer with release stores, read here with
 * acquire loads) and afc_slot_store, which touches only caller-owned memory.
 * The thread holds the mutex for one pass over the active slots and submits
 * through afc_write / afc_write_pages with it held (those take sq_lock or
 * dom_lock; nothing takes the hub mutex while holding either, so the order
 * is always hub -> engine).
 *
 * Idle (no arm waiting, no task watching) the thread blocks on a condition
 * variable; active it polls every watcher's active slots, then sleeps
 * poll_ns (the smallest of the active watchers'; 0 spins, yielding). */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "afcore.h"

#define NO_POS UINT32_MAX
#define AFC_WATCH_MAX_SLOTS (1u << 24)

struct afc_arm {
    struct afc_arm *next;
    uint64_t value, id;
    uint32_t kind, peer; /* AFC_OP_WRITE or AFC_OP_PAGES */
    int32_t err;         /* failed submission: positive errno */
    uint64_t src, len, raddr;
    afc_mr *mr;
    int64_t imm;
    uint64_t rkeys[AFC_MAX_RAILS];
    uint64_t page, sstride, dstride, n;
    int64_t *idx; /* PAGES: n source indices, then n destination indices */
};

struct afc_slot {
    struct afc_arm *arms; /* ascending value; equal values in arming order */
    uint64_t notified;    /* the last value the event loop was told about */
    uint32_t watches;     /* tasks awaiting a change */
    uint32_t pos;         /* index in the watcher's active list, or NO_POS */
};

struct afc_watcher {
    struct afc_watch_hub *hub;
    struct afc_watcher *prev, *next; /* the hub's list (NULL, NULL once detached) */
    int linked;
    uint64_t *slots;    /* caller-owned, n values */
    uint64_t *stamps;   /* caller-owned bump times (tracing), or NULL */
    uint32_t n, poll_ns;
    int ev_fd;
    struct afc_slot *st;
    uint32_t *act, n_act; /* slots with arms or watches */
    struct afc_arm *failed, **failed_tail; /* submissions that failed, for Python */
    struct afc_watch_sample *samples;
    uint32_t cap_samples, n_samples;
    uint64_t armed, fired, n_failed, changes, eagain;
};

struct afc_watch_hub {
    afc_engine *e;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t thread;
    int stop;
    struct afc_watcher *list;
    uint64_t active; /* sum of the watchers' n_act */
    uint64_t passes, sleeps;
};

static uint64_t load_slot(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

void afc_slot_store(uint64_t *slots, uint64_t *stamps, uint32_t slot, uint64_t value)
{
    if (stamps)
        __atomic_store_n(&stamps[slot], afc_now_ns(), __ATOMIC_RELAXED);
    __atomic_store_n(&slots[slot], value, __ATOMIC_RELEASE);
}

uint64_t afc_slot_load(const uint64_t *slots, uint32_t slot) { return load_slot(&slots[slot]); }

static void arm_free(struct afc_arm *a)
{
    free(a->idx);
    free(a);
}

/* Slot i gained or lost interest (hub lock held). */
static void activate(struct afc_watcher *w, uint32_t i)
{
    struct afc_slot *s = &w->st[i];
    if (s->pos != NO_POS)
        return;
    s->pos = w->n_act;
    w->act[w->n_act++] = i;
    if (w->linked && w->hub->active++ == 0)
        pthread_cond_signal(&w->hub->cond);
}

static void deactivate_if_idle(struct afc_watcher *w, uint32_t i)
{
    struct afc_slot *s = &w->st[i];
    if (s->pos == NO_POS || s->arms || s->watches)
        return;
    uint32_t last = w->act[--w->n_act];
    w->act[s->pos] = last;
    w->st[last].pos = s->pos;
    s->pos = NO_POS;
    if (w->linked)
        w->hub->active--;
}

static int fire(afc_engine *e, struct afc_arm *a)
{
    if (a->kind == AFC_OP_PAGES)
        return afc_write_pages(e, a->id, a->src, a->mr, a->peer, a->raddr, a->rkeys, a->page, a->sstride,
                               a->dstride, a->idx, a->idx + a->n, a->n, a->imm);
    return afc_write(e, a->id, a->src, (size_t)a->len, a->mr, a->peer, a->raddr, a->rkeys, a->imm);
}

/* One pass over a watcher's active slots (hub lock held).  Walks the active
 * list backwards so that removing the current entry (swap with the last,
 * already visited) skips nothing. */
static void poll_watcher(afc_engine *e, struct afc_watcher *w)
{
    int notify = 0;
    for (uint32_t k = w->n_act; k-- > 0;) {
        uint32_t i = w->act[k];
        struct afc_slot *s = &w->st[i];
        uint64_t v = load_slot(&w->slots[i]);
        if (s->arms && s->arms->value <= v) {
            uint64_t seen = w->samples ? afc_now_ns() : 0;
            while (s->arms && s->arms->value <= v) {
                struct afc_arm *a = s->arms;
                int rc = fire(e, a);
                if (rc == -FI_EAGAIN) { /* the submission queue is full: next pass */
                    w->eagain++;
                    break;
                }
                s->arms = a->next;
                w->armed--;
                if (w->samples && w->n_samples < w->cap_samples) {
                    struct afc_watch_sample *x = &w->samples[w->n_samples++];
                    x->bump_ns = w->stamps ? __atomic_load_n(&w->stamps[i], __ATOMIC_RELAXED) : 0;
                    x->seen_ns = seen;
                    x->posted_ns = afc_now_ns();
                    x->value = v;
                    x->target = a->value;
                    x->slot = i;
                }
                if (rc) {
                    a->err = -rc;
                    a->next = NULL;
                    *w->failed_tail = a;
                    w->failed_tail = &a->next;
                    w->n_failed++;
                    notify = 1;
                } else {
                    w->fired++;
                    arm_free(a);
                }
            }
        }
        if (s->watches && v != s->notified) {
            s->notified = v;
            w->changes++;
            notify = 1;
        }
        deactivate_if_idle(w, i);
    }
    if (notify) {
        uint64_t one = 1;
        ssize_t r = write(w->ev_fd, &one, sizeof one);
        (void)r;
    }
}

static void *watch_main(void *arg)
{
    struct afc_watch_hub *h = arg;
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); /* short sleeps stay short */
    pthread_mutex_lock(&h->lock);
    while (!h->stop) {
        if (!h->active) {
            h->sleeps++;
            pthread_cond_wait(&h->cond, &h->lock);
            continue;
        }
        uint32_t pause = UINT32_MAX;
        for (struct afc_watcher *w = h->list; w; w = w->next) {
            if (!w->n_act)
                continue;
            poll_watcher(h->e, w);
            if (w->poll_ns < pause)
                pause = w->poll_ns;
        }
        h->passes++;
        pthread_mutex_unlock(&h->lock);
        if (pause == UINT32_MAX) /* cannot happen while active; never spin on it */
            pause = 1000000;
        if (pause == 0) {
            sched_yield(); /* poll_ns 0: spin, letting a runnable thread have the core first */
        } else {
            struct timespec ts = {0, (long)pause};
            nanosleep(&ts, NULL);
        }
        pthread_mutex_lock(&h->lock);
    }
    pthread_mutex_unlock(&h->lock);
    return NULL;
}

static struct afc_watch_hub *hub_get(afc_engine *e)
{
    if (e->watch)
        return e->watch;
    struct afc_watch_hub *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->e = e;
    pthread_mutex_init(&h->lock, NULL);
    pthread_cond_init(&h->cond, NULL);
    if (pthread_create(&h->thread, NULL, watch_main, h)) {
        pthread_mutex_destroy(&h->lock);
        pthread_cond_destroy(&h->cond);
        free(h);
        return NULL;
    }
    pthread_setname_np(h->thread, "af-watcher");
    e->watch = h;
    return h;
}

int afc_watcher_new(afc_engine *e, uint64_t *slots, uint32_t n, uint32_t poll_ns, afc_watcher **out)
{
    *out = NULL;
    if (!slots || ((uintptr_t)slots & 7) || n == 0 || n > AFC_WATCH_MAX_SLOTS || poll_ns >= 1000000000u)
        return -FI_EINVAL;
    if (atomic_load(&e->stop))
        return -FI_ESHUTDOWN;
    struct afc_watcher *w = calloc(1, sizeof *w);
    if (!w)
        return -FI_ENOMEM;
    w->slots = slots;
    w->n = n;
    w->poll_ns = poll_ns;
    w->failed_tail = &w->failed;
    w->st = calloc(n, sizeof *w->st);
    w->act = calloc(n, sizeof *w->act);
    w->ev_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct afc_watch_hub *h = w->st && w->act && w->ev_fd >= 0 ? hub_get(e) : NULL;
    if (!h) {
        if (w->ev_fd >= 0)
            close(w->ev_fd);
        free(w->st);
        free(w->act);
        free(w);
        return -FI_ENOMEM;
    }
    for (uint32_t i = 0; i < n; i++)
        w->st[i].pos = NO_POS;
    w->hub = h;
    pthread_mutex_lock(&h->lock);
    w->next = h->list;
    if (h->list)
        h->list->prev = w;
    h->list = w;
    w->linked = 1;
    pthread_mutex_unlock(&h->lock);
    *out = w;
    return 0;
}

int afc_watcher_fd(afc_watcher *w) { return w->ev_fd; }

int afc_watcher_watch(afc_watcher *w, uint32_t slot, int delta)
{
    if (slot >= w->n)
        return -FI_EINVAL;
    pthread_mutex_lock(&w->hub->lock);
    struct afc_slot *s = &w->st[slot];
    int rc = 0;
    if (delta > 0) {
        if (s->watches++ == 0)
            s->notified = load_slot(&w->slots[slot]); /* the caller reads the value after this */
        activate(w, slot);
    } else if (s->watches) {
        s->watches--;
        deactivate_if_idle(w, slot);
    } else {
        rc = -FI_EINVAL;
    }
    pthread_mutex_unlock(&w->hub->lock);
    return rc;
}

static int arm_insert(afc_watcher *w, uint32_t slot, struct afc_arm *a)
{
    pthread_mutex_lock(&w->hub->lock);
    if (!w->linked) { /* detached: closing */
        pthread_mutex_unlock(&w->hub->lock);
        arm_free(a);
        return -FI_ESHUTDOWN;
    }
    struct afc_arm **p = &w->st[slot].arms;
    while (*p && (*p)->value <= a->value)
        p = &(*p)->next;
    a->next = *p;
    *p = a;
    w->armed++;
    activate(w, slot);
    pthread_mutex_unlock(&w->hub->lock);
    return 0;
}

static struct afc_arm *arm_new(afc_watcher *w, uint32_t slot, uint64_t value, uint64_t id, uint32_t kind,
                               uint64_t src, afc_mr *mr, uint32_t peer, uint64_t raddr,
                               const uint64_t *rkeys, uint32_t n_keys, int64_t imm)
{
    struct afc_arm *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->value = value;
    a->id = id;
    a->kind = kind;
    a->src = src;
    a->mr = mr;
    a->peer = peer;
    a->raddr = raddr;
    a->imm = imm;
    memcpy(a->rkeys, rkeys, n_keys * sizeof *rkeys);
    return a;
}

int afc_watcher_arm_write(afc_watcher *w, uint32_t slot, uint64_t value, uint64_t id, uint64_t src,
                          uint64_t len, afc_mr *mr, uint32_t peer, uint64_t raddr, const uint64_t *rkeys,
                          uint32_t n_keys, int64_t imm)
{
    if (slot >= w->n || n_keys == 0 || n_keys > AFC_MAX_RAILS || !mr)
        return -FI_EINVAL;
    struct afc_arm *a = arm_new(w, slot, value, id, AFC_OP_WRITE, src, mr, peer, raddr, rkeys, n_keys, imm);
    if (!a)
        return -FI_ENOMEM;
    a->len = len;
    return arm_insert(w, slot, a);
}

int afc_watcher_arm_pages(afc_watcher *w, uint32_t slot, uint64_t value, uint64_t id, uint64_t src,
                          afc_mr *mr, uint32_t peer, uint64_t raddr, const uint64_t *rkeys, uint32_t n_keys,
                          uint64_t page_size, uint64_t src_stride, uint64_t dst_stride,
                          const int64_t *src_idx, const int64_t *dst_idx, uint64_t n, int64_t imm)
{
    if (slot >= w->n || n_keys == 0 || n_keys > AFC_MAX_RAILS || !mr || n == 0 || page_size == 0)
        return -FI_EINVAL;
    struct afc_arm *a = arm_new(w, slot, value, id, AFC_OP_PAGES, src, mr, peer, raddr, rkeys, n_keys, imm);
    int64_t *idx = a ? malloc(2 * n * sizeof *idx) : NULL;
    if (!idx) {
        free(a);
        return -FI_ENOMEM;
    }
    memcpy(idx, src_idx, n * sizeof *idx);
    memcpy(idx + n, dst_idx, n * sizeof *idx);
    a->idx = idx;
    a->n = n;
    a->page = page_size;
    a->sstride = src_stride;
    a->dstride = dst_stride;
    return arm_insert(w, slot, a);
}

int afc_watcher_disarm(afc_watcher *w, uint32_t slot, uint64_t id)
{
    if (slot >= w->n)
        return -FI_EINVAL;
    int rc = -FI_ENOENT;
    pthread_mutex_lock(&w->hub->lock);
    for (struct afc_arm **p = &w->st[slot].arms; *p; p = &(*p)->next) {
        if ((*p)->id == id) {
            struct afc_arm *a = *p;
            *p = a->next;
            arm_free(a);
            w->armed--;
            deactivate_if_idle(w, slot);
            rc = 0;
            break;
        }
    }
    pthread_mutex_unlock(&w->hub->lock);
    return rc;
}

int afc_watcher_failed(afc_watcher *w, uint64_t *ids, int32_t *errs, int max)
{
    int n = 0;
    pthread_mutex_lock(&w->hub->lock);
    while (w->failed && n < max) {
        struct afc_arm *a = w->failed;
        ids[n] = a->id;
        errs[n] = a->err;
        n++;
        w->failed = a->next;
        arm_free(a);
    }
    if (!w->failed)
        w->failed_tail = &w->failed;
    pthread_mutex_unlock(&w->hub->lock);
    return n;
}

void afc_watcher_detach(afc_watcher *w)
{
    struct afc_watch_hub *h = w->hub;
    pthread_mutex_lock(&h->lock);
    if (w->linked) {
        if (w->prev)
            w->prev->next = w->next;
        else
            h->list = w->next;
        if (w->next)
            w->next->prev = w->prev;
        w->prev = w->next = NULL;
        h->active -= w->n_act;
        w->linked = 0;
    }
    pthread_mutex_unlock(&h->lock);
}

void afc_watcher_free(afc_watcher *w)
{
    if (!w)
        return;
    afc_watcher_detach(w);
    for (uint32_t i = 0; i < w->n; i++) {
        while (w->st[i].arms) {
            struct afc_arm *a = w->st[i].arms;
            w->st[i].arms = a->next;
            arm_free(a);
        }
    }
    while (w->failed) {
        struct afc_arm *a = w->failed;
        w->failed = a->next;
        arm_free(a);
    }
    close(w->ev_fd);
    free(w->st);
    free(w->act);
    free(w->samples);
    free(w);
}

int afc_watcher_trace(afc_watcher *w, uint64_t *stamps, uint32_t capacity)
{
    struct afc_watch_sample *buf = capacity ? calloc(capacity, sizeof *buf) : NULL;
    if (capacity && !buf)
        return -FI_ENOMEM;
    pthread_mutex_lock(&w->hub->lock);
    struct afc_watch_sample *old = w->samples;
    w->samples = buf;
    w->cap_samples = capacity;
    w->n_samples = 0;
    w->stamps = capacity ? stamps : NULL;
    pthread_mutex_unlock(&w->hub->lock);
    free(old);
    return 0;
}

uint32_t afc_watcher_samples(afc_watcher *w, struct afc_watch_sample *out, uint32_t max)
{
    pthread_mutex_lock(&w->hub->lock);
    uint32_t n = w->n_samples < max ? w->n_samples : max;
    if (n)
        memcpy(out, w->samples, n * sizeof *out);
    w->n_samples = 0;
    pthread_mutex_unlock(&w->hub->lock);
    return n;
}

void afc_watcher_stats(afc_watcher *w, struct afc_watch_stats *o)
{
    struct afc_watch_hub *h = w->hub;
    pthread_mutex_lock(&h->lock);
    o->armed = w->armed;
    o->fired = w->fired;
    o->failed = w->n_failed;
    o->changes = w->changes;
    o->eagain = w->eagain;
    o->active_slots = w->n_act;
    o->passes = h->passes;
    o->sleeps = h->sleeps;
    pthread_mutex_unlock(&h->lock);
}

int afc_watch_shutdown(afc_engine *e)
{
    struct afc_watch_hub *h = e->watch;
    if (!h)
        return 0;
    pthread_mutex_lock(&h->lock);
    h->stop = 1;
    pthread_cond_signal(&h->cond);
    int busy = h->list != NULL;
    pthread_mutex_unlock(&h->lock);
    pthread_join(h->thread, NULL);
    e->watch = NULL;
    if (busy) /* a watcher still points at the hub's lock: keep it (a leak, not a crash) */
        return -FI_EBUSY;
    pthread_mutex_destroy(&h->lock);
    pthread_cond_destroy(&h->cond);
    free(h);
    return 0;
}
