/* The native core's API, as seen by cffi and by csrc/.  Declarations only:
 * cffi parses this file verbatim, csrc/afcore.h includes it. */

#define AFC_EV_DONE 1     /* an operation completed: id */
#define AFC_EV_ERROR 2    /* an operation failed: id, err (positive fi errno), data = prov_errno */
#define AFC_EV_IMM 3      /* immediates arrived: data = imm value, aux = how many */
#define AFC_EV_RECV 4     /* a message arrived: id = receive slot, data = length */
#define AFC_EV_RERROR 5   /* an error the provider reported for inbound traffic: err, data = prov_errno */

#define AFC_OP_WRITE 1
#define AFC_OP_SEND 2
#define AFC_OP_REPOST 3
#define AFC_OP_PAGES 4

#define AFC_ADDR_MAX 256  /* largest endpoint name we accept */
/* Returned negated by calls that need the domain lock when the worker held it
 * for longer than cfg.lock_timeout_ms: it is stuck inside a provider call.
 * Outside libfabric's errno range (FI_ERRNO_OFFSET 256 and up). */
#define AFC_EWEDGED 4096
#define AFC_MAX_RAILS 4   /* NICs per engine (DomainGroup) */

struct afc_config {
    const char *provider;      /* libfabric provider name, NULL: first that fits */
    const char *domains[4];    /* domain (NIC) names, one per rail (repeats allowed) */
    uint32_t n_domains;        /* 0: one rail on the provider's first domain */
    const char *node;          /* address to bind, NULL: provider default */
    uint32_t msg_size;         /* largest two-sided message, header included */
    uint32_t recv_slots;       /* receive buffers kept posted */
    uint32_t send_slots;       /* send bounce buffers */
    uint32_t max_ops;          /* operations outstanding at the provider */
    uint32_t sq_slots;         /* submission queue entries, power of two */
    uint32_t eq_slots;         /* event ring entries, power of two */
    uint32_t spin_us;          /* keep polling this long after the last activity */
    uint32_t wait_spin_us;     /* ... and this long while Python awaits inbound traffic */
    uint32_t idle_ms;          /* longest block when idle (progress still runs this often) */
    uint32_t direct_post;      /* 1: the calling thread posts; 0: the worker posts */
    uint32_t poll_pause_ns;    /* pause between polls after activity (0: sched_yield) */
    uint32_t max_peers;        /* size of the peer table */
    uint64_t stripe_threshold;       /* single writes of at least this many bytes are striped */
    uint32_t lock_timeout_ms;  /* longest wait for the domain lock (and for the worker to stop at close) */
};

struct afc_event {
    uint64_t id;
    int32_t kind;
    int32_t err;
    uint64_t data;
    uint64_t aux;
};

struct afc_info {
    char provider[64];
    char fabric[128];
    char domain[128];
    uint64_t mr_mode;
    uint64_t caps;
    uint64_t max_msg_size;
    uint64_t inject_size;
    uint32_t cq_data_size;
    uint32_t mr_key_size;
    uint32_t addr_len;
    int32_t data_progress;
    int32_t threading;
    int32_t wait_fd;           /* 1 when the worker can block on the completion queue */
    int32_t rx_events;         /* 1 when remote writes landing here are counted (FI_RMA_EVENT) */
};

struct afc_stats {
    uint64_t writes_posted;
    uint64_t bytes_posted;
    uint64_t sends_posted;
    uint64_t completions;
    uint64_t errors;
    uint64_t imms_received;
    uint64_t msgs_received;
    uint64_t eagain;
    uint64_t worker_sleeps;
    uint64_t worker_wakeups;
    uint64_t sends_written_off; /* send slots replaced because their peer failed */
    uint64_t sq_depth;
    uint64_t ops_in_flight;
    uint64_t rail_bytes[4];    /* bytes posted on each rail */
    uint32_t fence_unconfirmed; /* the provider refused FI_DELIVERY_COMPLETE (see afc_write) */
};

typedef struct afc_engine afc_engine;
typedef struct afc_mr afc_mr;

void afc_default_config(struct afc_config *cfg);
int afc_open(const struct afc_config *cfg, afc_engine **out, char *errbuf, size_t errlen);
/* Stop the worker (waiting up to timeout_ms for it), close the endpoint.
 * -AFC_EWEDGED when the worker did not stop in time: it is stuck inside a
 * provider call.  The engine is then abandoned: the thread is detached and
 * nothing it may still touch is ever freed (afc_close frees nothing). */
int afc_stop(afc_engine *e, uint32_t timeout_ms);
void afc_close(afc_engine *e);  /* afc_stop(cfg.lock_timeout_ms), then free everything */
int afc_event_fd(afc_engine *e);
uint32_t afc_n_rails(afc_engine *e);
void afc_get_info(afc_engine *e, uint32_t rail, struct afc_info *out);
int afc_local_addr(afc_engine *e, uint32_t rail, void *buf, size_t *len);
void afc_get_stats(afc_engine *e, struct afc_stats *out);

/* A peer engine: its endpoint names, one per rail (names[i] of lens[i]
 * bytes, concatenated).  Inserts them into our rails' address vectors and
 * returns a peer number for the calls below. */
int afc_peer_add(afc_engine *e, const char *names, const uint32_t *lens, uint32_t n_rails,
                 uint32_t *peer);
int afc_peer_remove(afc_engine *e, uint32_t peer);
uint32_t afc_peer_paths(afc_engine *e, uint32_t peer);
/* Declare a peer failed: nothing more is posted to it (queued and later
 * submissions fail with err, a positive fi errno, without reaching the
 * provider: some providers spin forever on a dead peer's shared memory).
 * Never waits for the domain lock: the worker writes off the peer's stuck
 * sends the next time it holds it. */
int afc_peer_fail(afc_engine *e, uint32_t peer, int32_t err);

/* Register on every rail; keys[i] is rail i's key.  These two, and
 * afc_peer_add / afc_peer_remove, wait at most cfg.lock_timeout_ms for the
 * domain lock, then return -AFC_EWEDGED (afc_mr_close then frees nothing:
 * call it again later). */
int afc_mr_reg(afc_engine *e, void *buf, size_t len, uint64_t access,
               afc_mr **out, uint64_t *keys, uint64_t *remote_base);
int afc_mr_close(afc_mr *mr);

/* Post (or queue) work.  0 on success, -FI_EAGAIN when the queue is full.
 * rkeys[i] is the key of the target region on the peer's rail i.
 * A write of at least cfg.stripe_threshold bytes to a peer with several paths is
 * striped, one shard per path; with imm, the shards are written first and
 * one zero-byte write carrying imm follows once all have been delivered, so
 * a write delivers exactly one immediate however it is split.  Shorter
 * writes take the peer's paths in turn.  path >= 0 pins the path. */
int afc_write(afc_engine *e, uint64_t id, uint64_t src, size_t len, afc_mr *mr,
              uint32_t peer, uint64_t raddr, const uint64_t *rkeys, int64_t imm);
int afc_write_path(afc_engine *e, uint64_t id, uint64_t src, size_t len, afc_mr *mr,
                   uint32_t peer, int32_t path, uint64_t raddr, const uint64_t *rkeys,
                   int64_t imm);
/* Two-sided messages travel on rail 0. */
int afc_send(afc_engine *e, uint64_t id, const char *hdr, size_t hlen,
             const char *data, size_t len, uint32_t peer);
/* Paged write: page k copies page_size bytes from src + src_stride * src_idx[k]
 * to raddr + dst_stride * dst_idx[k], with imm (if >= 0) delivered once per
 * page.  The page list is cut into one contiguous range per path.  The index
 * arrays are copied; indices must be checked by the caller.
 * One completion record (id) when every page has completed or failed. */
int afc_write_pages(afc_engine *e, uint64_t id, uint64_t src, afc_mr *mr, uint32_t peer,
                    uint64_t raddr, const uint64_t *rkeys, uint64_t page_size, uint64_t src_stride,
                    uint64_t dst_stride, const int64_t *src_idx, const int64_t *dst_idx,
                    uint64_t n, int64_t imm);
const void *afc_recv_buf(afc_engine *e, uint32_t slot);
int afc_recv_release(afc_engine *e, uint32_t slot);

/* Drain completion records.  Successful operation ids go to ok_ids (the fast
 * path), everything else to ev.  Returns the number of ok ids; *n_ev the
 * number of events.  When it returns less than max_ok and *n_ev < max_ev the
 * ring was empty and the event fd is armed again. */
int afc_drain(afc_engine *e, uint64_t *ok_ids, int max_ok, struct afc_event *ev, int max_ev,
              int *n_ev);

int afc_random_u64(uint64_t *out);

/* Python tells the worker how many tasks await inbound traffic (counters,
 * messages): while some do, it polls longer before it sleeps. */
void afc_expect(afc_engine *e, int delta);

/* Make progress from the calling thread (posts queued work, reads the
 * completion queue) unless the worker is doing so right now.  Returns the
 * number of entries handled. */
int afc_progress(afc_engine *e);

/* Test hook: the worker holds the domain lock for ms milliseconds (1 to
 * 600000) from its next pass, as if stuck inside a provider call; ms 0 ends
 * a hold early.  -FI_EINVAL for any other ms.  afc_debug_wedged: 1 while the
 * worker holds the lock for the hook. */
int afc_debug_wedge(afc_engine *e, int64_t ms);
int afc_debug_wedged(afc_engine *e);

/* ---- watcher (csrc/watcher.c) --------------------------------------------
 * Slots of 64-bit values in caller-owned memory that a producer raises with
 * release stores (afc_slot_store here; a GPU stream later).  One thread per
 * engine polls the slots that have arms or watches, submits each arm through
 * afc_write / afc_write_pages as soon as its slot >= its value (arms of one
 * slot in value order, then arming order), and writes the watcher's eventfd
 * when a watched slot changed or an arm's submission failed.  It blocks while
 * nothing is armed or watched.  Call afc_watcher_free for every watcher, then
 * afc_watch_shutdown, before afc_stop. */

typedef struct afc_watcher afc_watcher;

struct afc_watch_stats {
    uint64_t armed;        /* arms waiting for their value */
    uint64_t fired;        /* arms submitted */
    uint64_t failed;       /* arms whose submission failed */
    uint64_t changes;      /* changes of watched slots signalled */
    uint64_t eagain;       /* submissions retried because the queue was full */
    uint64_t active_slots; /* slots with arms or watches */
    uint64_t passes;       /* the engine's watcher thread: poll passes */
    uint64_t sleeps;       /* ... times it blocked with nothing to watch */
};

struct afc_watch_sample {  /* one fired arm, when tracing */
    uint64_t bump_ns;      /* afc_slot_store's clock (CLOCK_MONOTONIC) before its store */
    uint64_t seen_ns;      /* when the thread saw the slot reach the value */
    uint64_t posted_ns;    /* when the submission returned */
    uint64_t value;        /* the slot value seen */
    uint64_t target;       /* the value the arm waited for */
    uint32_t slot;
    uint32_t pad;
};

void afc_slot_store(uint64_t *slots, uint64_t *stamps, uint32_t slot, uint64_t value);
uint64_t afc_slot_load(const uint64_t *slots, uint32_t slot);

int afc_watcher_new(afc_engine *e, uint64_t *slots, uint32_t n, uint32_t poll_ns, afc_watcher **out);
int afc_watcher_fd(afc_watcher *w);
/* A task starts (+1) or stops (-1) awaiting a change of slot. */
int afc_watcher_watch(afc_watcher *w, uint32_t slot, int delta);
int afc_watcher_arm_write(afc_watcher *w, uint32_t slot, uint64_t value, uint64_t id, uint64_t src,
                          uint64_t len, afc_mr *mr, uint32_t peer, uint64_t raddr, const uint64_t *rkeys,
                          uint32_t n_keys, int64_t imm);
/* The index arrays are copied. */
int afc_watcher_arm_pages(afc_watcher *w, uint32_t slot, uint64_t value, uint64_t id, uint64_t src,
                          afc_mr *mr, uint32_t peer, uint64_t raddr, const uint64_t *rkeys, uint32_t n_keys,
                          uint64_t page_size, uint64_t src_stride, uint64_t dst_stride,
                          const int64_t *src_idx, const int64_t *dst_idx, uint64_t n, int64_t imm);
/* 0: removed, it never fires; -FI_ENOENT: not armed (submitted or failed). */
int afc_watcher_disarm(afc_watcher *w, uint32_t slot, uint64_t id);
/* Arms whose submission failed: ids and positive errnos.  Returns how many. */
int afc_watcher_failed(afc_watcher *w, uint64_t *ids, int32_t *errs, int max);
/* Stop polling this watcher (arms stay until disarmed or freed). */
void afc_watcher_detach(afc_watcher *w);
void afc_watcher_free(afc_watcher *w);
/* Record fired arms (capacity samples; 0 stops); stamps: n bump times that
 * afc_slot_store fills when handed them. */
int afc_watcher_trace(afc_watcher *w, uint64_t *stamps, uint32_t capacity);
uint32_t afc_watcher_samples(afc_watcher *w, struct afc_watch_sample *out, uint32_t max);
void afc_watcher_stats(afc_watcher *w, struct afc_watch_stats *out);
/* Stop and join the engine's watcher thread.  -FI_EBUSY if a watcher was
 * not freed first (the hub is then kept, not freed). */
int afc_watch_shutdown(afc_engine *e);
