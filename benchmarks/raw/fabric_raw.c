/*
 * fabric_raw.c -- raw libfabric baseline for one-sided RMA writes between two processes.
 *
 *   fabric_raw --provider shm --mode bw   --size 1048576 --inflight 16 --seconds 2
 *   fabric_raw --provider shm --mode rate --size 4096    --inflight 64 --seconds 2
 *   fabric_raw --provider shm --mode rtt  --iters 20000
 *   fabric_raw --provider shm --mode pages   --size 4096 --pages 4096 --inflight 1024 [--imm]
 *   fabric_raw --provider shm --mode scatter --size 65536 --peers 8 --inflight 32 [--imm]
 *
 * Forks itself: parent = target (owns the written region), child = initiator. Each initialises
 * libfabric after the fork; endpoint names, buffer address and MR key go over two pipes.
 * bw/rate: `inflight` fi_write of `size` bytes kept outstanding (one source buffer, one target
 * region), 0.2 s warm-up then `seconds` measured.  rtt: ping-pong of zero-byte fi_writedata with
 * 32-bit remote CQ data, 1000 warm-up round trips then `iters` individually timed.  The
 * initiator prints one JSON line.  Both sides busy-poll their CQ throughout (manual progress).
 *
 * pages: the paged write of aiofabric's TransferEngine.write_pages, posted from C.  A batch is
 * `pages` pages of `size` bytes; page k goes from src + stride*sidx[k] to the target's region at
 * dst + stride*didx[k] (stride defaults to size), where sidx and didx are permutations of
 * 0..pages-1 made by perm() below (Fisher-Yates driven by splitmix64, seeds PERM_SEED_SRC and
 * PERM_SEED_DST; benchmarks/paged_bw.py builds the same arrays and checks index_checksum).  One
 * fi_write per page, or with --imm one fi_writedata per page carrying the 32-bit PAGES_IMM,
 * like write_pages(imm=...).  Batch after batch, with up to `inflight` pages outstanding
 * (-FI_EAGAIN: read the CQ, post again); pages/s and Gbit/s counted from local completions.
 * The target checks that every dst page holds its source page's index and, with --imm, that
 * it consumed exactly one immediate per page posted.
 * scatter: one initiator endpoint writes `size` bytes to each of `peers` target endpoints per
 * round (write i goes to peer i % peers, from src + size * peer), `inflight` writes outstanding;
 * one target process owns all the target endpoints (each its own fabric, domain, CQ, endpoint,
 * like one aiofabric engine each) and polls their CQs in turn; rounds/s and Gbit/s.
 * In these two modes the initiator's 'D' is followed by the number of writes it completed.
 * Shutdown: initiator drains, sends 'D'; target drains, answers 'A'; the initiator keeps
 * polling until 'A', so neither side stops progressing while its peer may need it.
 * Failures: the initiator dies with the target (PR_SET_PDEATHSIG); the target notices a dead
 * initiator through SIGCHLD, kills+reaps it on any error or SIGTERM/SIGINT/SIGHUP.
 *
 * Build: cc -O2 -Wall -Wextra -o fabric_raw fabric_raw.c -lfabric
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#define CQ_BATCH 16    /* CQ entries read per poll in bw/rate/rtt */
#define CQ_BATCH_MAX 32 /* ... and in pages/scatter: aiofabric's worker reads 32 (AFC_CQ_BATCH) */
#define MAX_PEERS 64
#define PAGES_IMM 0x5a17u
#define PERM_SEED_SRC 1u
#define PERM_SEED_DST 2u
#define IMM_DRAIN_S 10.0 /* how long the target waits for the last immediates */
#define PIPE_CHECK_EVERY 4096 /* CQ polls between non-blocking pipe checks */
#define NAME_LEN 1024
#define RTT_WARMUP 1000
#define RTT_CTX 64
#define PIPE_NONE (-1)
#define PIPE_EOF (-2)

enum { MODE_BW, MODE_RATE, MODE_RTT, MODE_PAGES, MODE_SCATTER, N_MODES };
static const char *mode_names[N_MODES] = {"bw", "rate", "rtt", "pages", "scatter"};

struct opts {
    const char *provider;
    int mode, inflight, imm, peers;
    size_t size, stride;
    double seconds;
    long iters, pages;
};

struct fab {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_cq *cq;
    struct fid_av *av;
    struct fid_ep *ep;
    struct fid_mr *mr;
    void *buf, *desc;
    size_t buf_len;
    uint64_t my_addr, my_key;       /* what the peer uses to write to us */
    fi_addr_t peer;
    uint64_t raddr, rkey;           /* where we write in the peer */
    int npeers;                     /* scatter initiator: every target endpoint */
    fi_addr_t peers[MAX_PEERS];
    uint64_t peer_raddr[MAX_PEERS], peer_rkey[MAX_PEERS];
    int cq_batch;                   /* CQ entries per fi_cq_read */
    uint64_t imm_count, imm_bad;    /* inbound FI_REMOTE_CQ_DATA entries; pages/scatter: */
    int64_t expect_imm;             /*   those whose data is not expect_imm (-1: no check) */
    struct fi_context2 *ctx;        /* one context per outstanding operation */
    int *free_idx, nfree;           /* stack of free ctx indices */
    size_t tx_outstanding;
    uint64_t rx_count;              /* inbound completions (remote writes) */
    uint64_t last_data, last_flags; /* of the latest inbound completion */
    int pipe_rd, pipe_wr;
};

struct peer_msg {
    uint64_t addr, key;
    uint32_t name_len;
    uint8_t name[NAME_LEN];
};

static pid_t child_pid = -1; /* set in the parent (target) only */

/* The target never leaves its initiator behind.  child_pid is cleared first so that
 * on_sigchld ignores this (expected) death. */
static void kill_child(void)
{
    pid_t c = child_pid;
    child_pid = -1;
    if (c > 0) {
        kill(c, SIGKILL);
        waitpid(c, NULL, 0);
    }
}

static void die(const char *fmt, ...)
{
    va_list ap;
    fputs("fabric_raw: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    kill_child();
    exit(1);
}

/* Target's SIGTERM/SIGINT/SIGHUP handler: take the initiator down with us, reaped. */
static void on_signal(int sig)
{
    kill_child();
    _exit(128 + sig);
}

/* Target's SIGCHLD handler, active until the target sends 'A' (the initiator cannot exit
 * cleanly before that).  A dying initiator can leave the target stuck inside the provider
 * (e.g. shm spinning on a lock the initiator held), so react here, not in the poll loop. */
static void on_sigchld(int sig)
{
    int st;
    (void)sig;
    if (child_pid <= 0 || waitpid(child_pid, &st, WNOHANG) != child_pid)
        return;
    child_pid = -1;
    static const char msg[] = "fabric_raw: initiator exited abnormally\n";
    if (write(2, msg, sizeof(msg) - 1) < 0) { /* nothing more to do */ }
    _exit(1);
}

static void check(ssize_t rc, const char *call)
{
    if (rc < 0)
        die("%s: %s", call, fi_strerror((int)-rc));
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Blocking full read/write on a pipe.  Returns 0, or -1 on EOF (peer exited). */
static int pipe_io(int fd, void *p, size_t n, int wr)
{
    char *c = p;
    while (n > 0) {
        ssize_t r = wr ? write(fd, c, n) : read(fd, c, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0 && !wr)
            return -1;
        if (r <= 0)
            die("pipe %s: %s", wr ? "write" : "read", strerror(errno));
        c += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Non-blocking: PIPE_NONE if nothing to read, PIPE_EOF, or the byte read. */
static int pipe_check(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int r = poll(&p, 1, 0);
    unsigned char c;
    if (r < 0 && errno != EINTR)
        die("poll: %s", strerror(errno));
    if (r <= 0)
        return PIPE_NONE;
    ssize_t n = read(fd, &c, 1);
    return n == 1 ? c : n < 0 && errno == EINTR ? PIPE_NONE : PIPE_EOF;
}

static const char *mr_mode_str(int m)
{
    static char s[256];
    static const char *names[] = {"BASIC", "SCALABLE", "LOCAL", "RAW", "VIRT_ADDR", "ALLOCATED",
                                  "PROV_KEY", "MMU_NOTIFY", "RMA_EVENT", "ENDPOINT", "HMEM",
                                  "COLLECTIVE"};
    s[0] = '\0';
    for (int i = 0; i < (int)(sizeof(names) / sizeof(names[0])); i++)
        if (m & (1 << i))
            strcat(strcat(s, s[0] ? "|" : ""), names[i]);
    return s[0] ? s : "0";
}

static void fab_init(struct fab *f, const struct opts *o, int nctx, int is_target, size_t buf_len,
                     int av_count)
{
    struct fi_info *hints = fi_allocinfo();
    if (!hints)
        die("fi_allocinfo: out of memory");
    hints->ep_attr->type = FI_EP_RDM;
    hints->caps = FI_MSG | FI_RMA;
    hints->mode = FI_CONTEXT | FI_CONTEXT2;
    hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_PROV_KEY |
                                  FI_MR_ALLOCATED | FI_MR_ENDPOINT;
    hints->domain_attr->threading = FI_THREAD_DOMAIN;
    hints->fabric_attr->prov_name = strdup(o->provider);
    check(fi_getinfo(FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION), NULL, NULL, 0,
                     hints, &f->info), "fi_getinfo");
    fi_freeinfo(hints);
    int mr_mode = f->info->domain_attr->mr_mode;
    if ((o->mode == MODE_RTT || o->imm) && f->info->domain_attr->cq_data_size < 4)
        die("provider %s: cq_data_size %zu < 4, no 32-bit immediate data", o->provider,
            f->info->domain_attr->cq_data_size);

    check(fi_fabric(f->info->fabric_attr, &f->fabric, NULL), "fi_fabric");
    check(fi_domain(f->fabric, f->info, &f->domain, NULL), "fi_domain");

    struct fi_cq_attr cq_attr = {.format = FI_CQ_FORMAT_DATA, .wait_obj = FI_WAIT_NONE};
    check(fi_cq_open(f->domain, &cq_attr, &f->cq, NULL), "fi_cq_open");
    struct fi_av_attr av_attr = {.type = FI_AV_TABLE, .count = (size_t)av_count};
    check(fi_av_open(f->domain, &av_attr, &f->av, NULL), "fi_av_open");
    check(fi_endpoint(f->domain, f->info, &f->ep, NULL), "fi_endpoint");
    check(fi_ep_bind(f->ep, &f->av->fid, 0), "fi_ep_bind(av)");
    check(fi_ep_bind(f->ep, &f->cq->fid, FI_TRANSMIT | FI_RECV), "fi_ep_bind(cq)");
    check(fi_enable(f->ep), "fi_enable");

    /* One registered buffer per endpoint: the initiator's source, the target's
     * region.  In rtt mode each side uses it as both. */
    f->buf_len = buf_len < 64 ? 64 : buf_len;
    if (posix_memalign(&f->buf, 4096, f->buf_len))
        die("posix_memalign: out of memory");
    memset(f->buf, is_target ? 0 : 0xab, f->buf_len);
    uint64_t access = FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE;
    uint64_t req_key = (mr_mode & FI_MR_PROV_KEY) ? 0 : (uint64_t)(0x1000 + is_target);
    check(fi_mr_reg(f->domain, f->buf, f->buf_len, access, 0, req_key, 0, &f->mr, NULL),
          "fi_mr_reg");
    if (mr_mode & FI_MR_ENDPOINT) {
        check(fi_mr_bind(f->mr, &f->ep->fid, 0), "fi_mr_bind");
        check(fi_mr_enable(f->mr), "fi_mr_enable");
    }
    f->desc = fi_mr_desc(f->mr);
    f->my_key = fi_mr_key(f->mr);
    if (f->my_key == FI_KEY_NOTAVAIL)
        die("fi_mr_key: key not available (FI_MR_RAW keys are not supported)");
    f->my_addr = (mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)f->buf : 0;

    f->ctx = calloc((size_t)nctx, sizeof(*f->ctx));
    f->free_idx = calloc((size_t)nctx, sizeof(*f->free_idx));
    if (!f->ctx || !f->free_idx)
        die("calloc: out of memory");
    for (f->nfree = 0; f->nfree < nctx; f->nfree++)
        f->free_idx[f->nfree] = f->nfree;
    f->cq_batch = o->mode == MODE_PAGES || o->mode == MODE_SCATTER ? CQ_BATCH_MAX : CQ_BATCH;
    f->expect_imm = o->mode == MODE_PAGES || o->mode == MODE_SCATTER ? (int64_t)PAGES_IMM : -1;
}

static void send_name(struct fab *f, int fd)
{
    struct peer_msg mine = {.addr = f->my_addr, .key = f->my_key};
    size_t len = NAME_LEN;
    check(fi_getname(&f->ep->fid, mine.name, &len), "fi_getname");
    mine.name_len = (uint32_t)len;
    pipe_io(fd, &mine, sizeof(mine), 1);
}

static void insert_peer(struct fab *f, const struct peer_msg *m, fi_addr_t *out)
{
    int n = fi_av_insert(f->av, m->name, 1, out, 0, NULL);
    if (n != 1)
        die("fi_av_insert: %s", n < 0 ? fi_strerror(-n) : "address not inserted");
}

/* Target: send the names of its nt endpoints, read the initiator's, insert it everywhere.
 * Returns 0 on success, -1 if the initiator exited first. */
static int exchange_target(struct fab *fs, int nt)
{
    struct peer_msg theirs;
    for (int i = 0; i < nt; i++)
        send_name(&fs[i], fs[0].pipe_wr);
    if (pipe_io(fs[0].pipe_rd, &theirs, sizeof(theirs), 0) < 0)
        return -1; /* main() reports the initiator's exit status */
    for (int i = 0; i < nt; i++) {
        fs[i].raddr = theirs.addr;
        fs[i].rkey = theirs.key;
        insert_peer(&fs[i], &theirs, &fs[i].peer);
    }
    return 0;
}

/* Initiator: send its name, read the nt target endpoints' names (peer = the first). */
static void exchange_initiator(struct fab *f, int nt)
{
    struct peer_msg theirs;
    send_name(f, f->pipe_wr);
    for (int i = 0; i < nt; i++) {
        if (pipe_io(f->pipe_rd, &theirs, sizeof(theirs), 0) < 0)
            die("target exited before the address exchange");
        f->peer_raddr[i] = theirs.addr;
        f->peer_rkey[i] = theirs.key;
        insert_peer(f, &theirs, &f->peers[i]);
    }
    f->npeers = nt;
    f->peer = f->peers[0];
    f->raddr = f->peer_raddr[0];
    f->rkey = f->peer_rkey[0];
}

/* pages mode: the permutation both sides (and benchmarks/paged_bw.py) use. */
static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int64_t *perm(long n, uint64_t seed)
{
    int64_t *idx = malloc((size_t)n * sizeof(*idx));
    if (!idx)
        die("malloc: out of memory");
    for (long i = 0; i < n; i++)
        idx[i] = i;
    for (long i = n - 1; i > 0; i--) {
        long j = (long)(splitmix64(&seed) % (uint64_t)(i + 1));
        int64_t t = idx[i];
        idx[i] = idx[j];
        idx[j] = t;
    }
    return idx;
}

/* FNV-1a over the values of both index arrays: the Python side compares it with its own. */
static uint64_t index_checksum(const int64_t *sidx, const int64_t *didx, long n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (long i = 0; i < 2 * n; i++)
        h = (h ^ (uint64_t)(i < n ? sidx[i] : didx[i - n])) * 0x100000001b3ull;
    return h;
}

/* pages mode: a page's first bytes hold its source index, the rest 0xab. */
static void page_tag(unsigned char *page, size_t size, int64_t src_index)
{
    uint64_t v = (uint64_t)src_index;
    memcpy(page, &v, size < sizeof(v) ? size : sizeof(v));
}

static void fab_close(struct fab *f)
{
    check(fi_close(&f->mr->fid), "fi_close(mr)");
    check(fi_close(&f->ep->fid), "fi_close(ep)");
    check(fi_close(&f->av->fid), "fi_close(av)");
    check(fi_close(&f->cq->fid), "fi_close(cq)");
    check(fi_close(&f->domain->fid), "fi_close(domain)");
    check(fi_close(&f->fabric->fid), "fi_close(fabric)");
    fi_freeinfo(f->info);
    free(f->buf);
    free(f->ctx);
    free(f->free_idx);
}

/* Reads up to CQ_BATCH completions; returns the number of local (transmit)
 * completions.  Inbound remote-write completions bump rx_count. */
static int progress(struct fab *f)
{
    struct fi_cq_data_entry e[CQ_BATCH_MAX];
    ssize_t n = fi_cq_read(f->cq, e, (size_t)f->cq_batch);
    if (n == -FI_EAGAIN)
        return 0;
    if (n == -FI_EAVAIL) {
        struct fi_cq_err_entry err = {0};
        char buf[256];
        check(fi_cq_readerr(f->cq, &err, 0), "fi_cq_readerr");
        die("fi_cq_read: completion error: %s (prov_errno %d: %s, flags 0x%llx)",
            fi_strerror(err.err), err.prov_errno,
            fi_cq_strerror(f->cq, err.prov_errno, err.err_data, buf, sizeof(buf)),
            (unsigned long long)err.flags);
    }
    check(n, "fi_cq_read");
    int tx = 0;
    for (ssize_t i = 0; i < n; i++) {
        if (e[i].flags & (FI_REMOTE_CQ_DATA | FI_REMOTE_WRITE)) {
            f->rx_count++;
            f->last_data = e[i].data;
            f->last_flags = e[i].flags;
            if (e[i].flags & FI_REMOTE_CQ_DATA) {
                f->imm_count++;
                if (f->expect_imm >= 0 && (e[i].data & 0xffffffffu) != (uint64_t)f->expect_imm)
                    f->imm_bad++;
            }
        } else {
            struct fi_context2 *c = e[i].op_context;
            if (!c || f->tx_outstanding == 0)
                die("fi_cq_read: unexpected completion (flags 0x%llx)",
                    (unsigned long long)e[i].flags);
            f->free_idx[f->nfree++] = (int)(c - f->ctx);
            f->tx_outstanding--;
            tx++;
        }
    }
    return tx;
}

static struct fi_context2 *get_ctx(struct fab *f)
{
    while (f->nfree == 0)
        progress(f);
    f->tx_outstanding++;
    return &f->ctx[f->free_idx[--f->nfree]];
}

/* Zero-byte write with 32-bit immediate data; retries on -FI_EAGAIN. */
static void post_writedata(struct fab *f, uint64_t data)
{
    struct fi_context2 *c = get_ctx(f);
    for (;;) {
        ssize_t rc = fi_writedata(f->ep, f->buf, 0, f->desc, data, f->peer, f->raddr,
                                  f->rkey, c);
        if (rc == 0)
            return;
        if (rc != -FI_EAGAIN)
            check(rc, "fi_writedata");
        progress(f);
    }
}

/* pages/scatter: after 'D', check what the initiator's `total` completed writes left behind. */
static void target_check(struct fab *fs, int nt, const struct opts *o, uint64_t total)
{
    if (o->imm) { /* exactly one immediate per write, each at its own endpoint */
        double deadline = now() + IMM_DRAIN_S;
        for (;;) {
            int all = 1;
            for (int i = 0; i < nt; i++) {
                progress(&fs[i]);
                uint64_t want = total / (uint64_t)nt + ((uint64_t)i < total % (uint64_t)nt);
                if (fs[i].imm_count > want)
                    die("target: endpoint %d consumed %llu immediates for %llu writes", i,
                        (unsigned long long)fs[i].imm_count, (unsigned long long)want);
                all &= fs[i].imm_count == want;
            }
            if (all)
                break;
            if (now() > deadline)
                die("target: immediates missing %.0f s after the last write completed",
                    IMM_DRAIN_S);
        }
        for (int i = 0; i < nt; i++)
            if (fs[i].imm_bad)
                die("target: %llu immediates with the wrong value",
                    (unsigned long long)fs[i].imm_bad);
    }
    if (o->mode == MODE_PAGES && total >= (uint64_t)o->pages) { /* every page written */
        int64_t *sidx = perm(o->pages, PERM_SEED_SRC), *didx = perm(o->pages, PERM_SEED_DST);
        unsigned char want[8];
        size_t tag = o->size < sizeof(want) ? o->size : sizeof(want);
        for (long k = 0; k < o->pages; k++) {
            const unsigned char *pg = (unsigned char *)fs[0].buf + o->stride * (size_t)didx[k];
            page_tag(want, o->size, sidx[k]);
            if (memcmp(pg, want, tag) || pg[o->size - 1] != (o->size > 8 ? 0xab : want[tag - 1]))
                die("target: dst page %lld does not hold src page %lld",
                    (long long)didx[k], (long long)sidx[k]);
        }
        free(sidx);
        free(didx);
    }
    if (o->mode == MODE_SCATTER)
        for (int i = 0; i < nt && (uint64_t)i < total; i++) {
            unsigned char *b = fs[i].buf;
            if (b[0] != 0xab || b[o->size - 1] != 0xab)
                die("target: endpoint %d's region was not written", i);
        }
}

static void run_target(struct fab *fs, int nt, const struct opts *o)
{
    struct fab *f = &fs[0];
    uint64_t answered = 0;
    unsigned long polls = 0;
    for (;;) {
        for (int i = 0; i < nt; i++)
            progress(&fs[i]);
        while (o->mode == MODE_RTT && answered < f->rx_count) {
            answered++;
            post_writedata(f, f->last_data); /* echo the initiator's sequence number */
        }
        if (++polls % PIPE_CHECK_EVERY == 0) {
            int c = pipe_check(f->pipe_rd);
            if (c == 'D')
                break;
            if (c == PIPE_EOF)
                return; /* initiator died; main() reports its exit status */
            if (c != PIPE_NONE)
                die("target: unexpected pipe message 0x%02x", c);
        }
    }
    for (int i = 0; i < nt; i++)
        while (fs[i].tx_outstanding > 0)
            progress(&fs[i]);
    unsigned char *b = f->buf; /* sanity: the initiator's 0xab pattern must have landed */
    if ((o->mode == MODE_BW || o->mode == MODE_RATE) && (b[0] != 0xab || b[o->size - 1] != 0xab))
        die("target: region was not written (bad remote address or key?)");
    if (o->mode == MODE_PAGES || o->mode == MODE_SCATTER) {
        uint64_t total;
        if (pipe_io(f->pipe_rd, &total, sizeof(total), 0) < 0)
            return;
        target_check(fs, nt, o, total);
    }
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL); /* from here on main() reaps the initiator */
    pipe_io(f->pipe_wr, "A", 1, 1);
}

static void initiator_wait_ack(struct fab *f, const uint64_t *total)
{
    pipe_io(f->pipe_wr, "D", 1, 1);
    if (total) /* pages/scatter: the target checks what arrived against it */
        pipe_io(f->pipe_wr, (void *)total, sizeof(*total), 1);
    for (unsigned long polls = 1;; polls++) {
        progress(f);
        if (polls % PIPE_CHECK_EVERY == 0) {
            int c = pipe_check(f->pipe_rd);
            if (c == 'A')
                return;
            if (c != PIPE_NONE)
                die("initiator: target exited during shutdown");
        }
    }
}

static void run_bw(struct fab *f, const struct opts *o)
{
    double t_begin = now(), t_start = 0, t_stop = 0;
    int measuring = 0;
    uint64_t ops = 0;
    for (;;) {
        while (f->nfree > 0) {
            struct fi_context2 *c = get_ctx(f);
            ssize_t rc = fi_write(f->ep, f->buf, o->size, f->desc, f->peer, f->raddr,
                                  f->rkey, c);
            if (rc == -FI_EAGAIN) { /* give the context back, poll, retry */
                f->tx_outstanding--;
                f->free_idx[f->nfree++] = (int)(c - f->ctx);
                break;
            }
            check(rc, "fi_write");
        }
        int done = progress(f);
        double t = now();
        if (measuring) {
            ops += (uint64_t)done;
            if (t - t_start >= o->seconds) {
                t_stop = t;
                break;
            }
        } else if (t - t_begin >= 0.2) {
            measuring = 1;
            t_start = t;
        }
    }
    while (f->tx_outstanding > 0)
        progress(f);
    initiator_wait_ack(f, NULL);

    double secs = t_stop - t_start;
    printf("{\"mode\":\"%s\",\"provider\":\"%s\",\"size\":%zu,\"inflight\":%d,"
           "\"ops\":%llu,\"seconds\":%.6f,\"ops_per_s\":%.1f,\"gbit_per_s\":%.4f,"
           "\"mr_mode\":\"%s\"}\n",
           mode_names[o->mode], o->provider, o->size, o->inflight, (unsigned long long)ops,
           secs, (double)ops / secs, (double)ops * (double)o->size * 8.0 / secs / 1e9,
           mr_mode_str(f->info->domain_attr->mr_mode));
}

/* pages/scatter: keep up to `inflight` writes outstanding, one page (or one peer) after the
 * other, 0.2 s warm-up then `seconds` measured. */
static void run_stream(struct fab *f, const struct opts *o)
{
    int pages = o->mode == MODE_PAGES;
    long n = pages ? o->pages : f->npeers; /* posts per batch / per round */
    int64_t *sidx = NULL, *didx = NULL;
    unsigned char *src = f->buf;
    if (pages) {
        sidx = perm(n, PERM_SEED_SRC);
        didx = perm(n, PERM_SEED_DST);
        for (long j = 0; j < n; j++)
            page_tag(src + o->stride * (size_t)j, o->size, j);
    }
    double t_begin = now(), t_start = 0, t_stop = 0;
    int measuring = 0;
    uint64_t ops = 0, total = 0, next = 0;
    long k = 0; /* position in the batch / round of the next post */
    for (;;) {
        while (f->nfree > 0) {
            struct fi_context2 *c = get_ctx(f);
            const void *from;
            fi_addr_t to;
            uint64_t raddr, rkey;
            if (pages) {
                from = src + o->stride * (size_t)sidx[k];
                to = f->peer;
                raddr = f->raddr + o->stride * (uint64_t)didx[k];
                rkey = f->rkey;
            } else {
                from = src + o->size * (size_t)k;
                to = f->peers[k];
                raddr = f->peer_raddr[k];
                rkey = f->peer_rkey[k];
            }
            ssize_t rc = o->imm ? fi_writedata(f->ep, from, o->size, f->desc, PAGES_IMM, to, raddr,
                                               rkey, c)
                                : fi_write(f->ep, from, o->size, f->desc, to, raddr, rkey, c);
            if (rc == -FI_EAGAIN) { /* give the context back, poll, retry */
                f->tx_outstanding--;
                f->free_idx[f->nfree++] = (int)(c - f->ctx);
                break;
            }
            check(rc, o->imm ? "fi_writedata" : "fi_write");
            next++;
            if (++k == n)
                k = 0;
        }
        int done = progress(f);
        total += (uint64_t)done;
        double t = now();
        if (measuring) {
            ops += (uint64_t)done;
            if (t - t_start >= o->seconds) {
                t_stop = t;
                break;
            }
        } else if (t - t_begin >= 0.2) {
            measuring = 1;
            t_start = t;
        }
    }
    while (f->tx_outstanding > 0)
        total += (uint64_t)progress(f);
    if (total != next)
        die("initiator: %llu writes posted, %llu completed", (unsigned long long)next,
            (unsigned long long)total);
    initiator_wait_ack(f, &total);

    double secs = t_stop - t_start;
    double gbit = (double)ops * (double)o->size * 8.0 / secs / 1e9;
    if (pages)
        printf("{\"mode\":\"pages\",\"provider\":\"%s\",\"size\":%zu,\"stride\":%zu,\"pages\":%ld,"
               "\"inflight\":%d,\"imm\":%d,\"ops\":%llu,\"seconds\":%.6f,\"ops_per_s\":%.1f,"
               "\"pages_per_s\":%.1f,\"batches\":%.3f,\"gbit_per_s\":%.4f,\"total_pages\":%llu,"
               "\"index_checksum\":%llu,\"mr_mode\":\"%s\"}\n",
               o->provider, o->size, o->stride, n, o->inflight, o->imm, (unsigned long long)ops,
               secs, (double)ops / secs, (double)ops / secs, (double)ops / (double)n, gbit,
               (unsigned long long)total, (unsigned long long)index_checksum(sidx, didx, n),
               mr_mode_str(f->info->domain_attr->mr_mode));
    else
        printf("{\"mode\":\"scatter\",\"provider\":\"%s\",\"size\":%zu,\"peers\":%ld,"
               "\"inflight\":%d,\"imm\":%d,\"ops\":%llu,\"seconds\":%.6f,\"ops_per_s\":%.1f,"
               "\"rounds_per_s\":%.1f,\"gbit_per_s\":%.4f,\"total_writes\":%llu,"
               "\"mr_mode\":\"%s\"}\n",
               o->provider, o->size, n, o->inflight, o->imm, (unsigned long long)ops, secs,
               (double)ops / secs, (double)ops / (double)n / secs, gbit,
               (unsigned long long)total, mr_mode_str(f->info->domain_attr->mr_mode));
    free(sidx);
    free(didx);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void run_rtt(struct fab *f, const struct opts *o)
{
    long total = RTT_WARMUP + o->iters;
    double *rtt = malloc((size_t)o->iters * sizeof(double));
    if (!rtt)
        die("malloc: out of memory");
    for (long i = 0; i < total; i++) {
        uint32_t seq = (uint32_t)i;
        double t0 = now();
        post_writedata(f, seq);
        while (f->rx_count <= (uint64_t)i)
            progress(f);
        double t1 = now();
        if (!(f->last_flags & FI_REMOTE_CQ_DATA))
            die("rtt: inbound completion without FI_REMOTE_CQ_DATA (flags 0x%llx)",
                (unsigned long long)f->last_flags);
        if ((uint32_t)f->last_data != seq)
            die("rtt: immediate data mismatch: got %llu, expected %u",
                (unsigned long long)f->last_data, seq);
        if (i >= RTT_WARMUP)
            rtt[i - RTT_WARMUP] = (t1 - t0) * 1e6;
    }
    while (f->tx_outstanding > 0)
        progress(f);
    initiator_wait_ack(f, NULL);

    long n = o->iters;
    double sum = 0;
    for (long i = 0; i < n; i++)
        sum += rtt[i];
    qsort(rtt, (size_t)n, sizeof(double), cmp_double);
    double median = n % 2 ? rtt[n / 2] : (rtt[n / 2 - 1] + rtt[n / 2]) / 2;
    printf("{\"mode\":\"rtt\",\"provider\":\"%s\",\"iters\":%ld,\"size\":0,"
           "\"rtt_us_median\":%.3f,\"rtt_us_mean\":%.3f,\"rtt_us_p99\":%.3f,"
           "\"mr_mode\":\"%s\"}\n",
           o->provider, n, median, sum / (double)n, rtt[(long)(0.99 * (double)(n - 1))],
           mr_mode_str(f->info->domain_attr->mr_mode));
    free(rtt);
}

static void parse_args(int argc, char **argv, struct opts *o)
{
    static const struct option lo[] = {
        {"provider", required_argument, NULL, 'p'}, {"mode", required_argument, NULL, 'm'},
        {"size", required_argument, NULL, 's'},     {"inflight", required_argument, NULL, 'i'},
        {"seconds", required_argument, NULL, 't'},  {"iters", required_argument, NULL, 'n'},
        {"pages", required_argument, NULL, 'P'},    {"stride", required_argument, NULL, 'S'},
        {"peers", required_argument, NULL, 'e'},    {"imm", no_argument, NULL, 'I'},
        {NULL, 0, NULL, 0},
    };
    *o = (struct opts){.mode = MODE_BW, .size = 4096, .inflight = 16, .seconds = 2.0,
                       .iters = 20000, .pages = 4096, .peers = 8};
    int c;
    while ((c = getopt_long(argc, argv, "p:m:s:i:t:n:P:S:e:I", lo, NULL)) != -1) {
        switch (c) {
        case 'p': o->provider = optarg; break;
        case 'm':
            for (o->mode = 0; o->mode < N_MODES && strcmp(optarg, mode_names[o->mode]);)
                o->mode++;
            break;
        case 's': o->size = strtoull(optarg, NULL, 0); break;
        case 'i': o->inflight = atoi(optarg); break;
        case 't': o->seconds = atof(optarg); break;
        case 'n': o->iters = atol(optarg); break;
        case 'P': o->pages = atol(optarg); break;
        case 'S': o->stride = strtoull(optarg, NULL, 0); break;
        case 'e': o->peers = atoi(optarg); break;
        case 'I': o->imm = 1; break;
        default: o->provider = NULL; optind = argc; break;
        }
    }
    if (!o->provider || optind != argc || o->mode == N_MODES || o->inflight < 1 ||
        o->inflight > 65536 || o->seconds <= 0 || o->iters < 1 ||
        (o->mode != MODE_RTT && o->size == 0) || o->pages < 1 || o->pages > (1L << 24) ||
        (o->stride && o->stride < o->size) || o->peers < 1 || o->peers > MAX_PEERS ||
        (o->imm && o->mode != MODE_PAGES && o->mode != MODE_SCATTER)) {
        fprintf(stderr, "usage: fabric_raw --provider NAME [--mode bw|rate|rtt|pages|scatter]"
                        " [--size BYTES] [--inflight N] [--seconds S] [--iters N]"
                        " [--pages N] [--stride BYTES] [--peers N] [--imm]\n");
        exit(2);
    }
    if (!o->stride)
        o->stride = o->size;
    if (o->mode == MODE_RTT)
        o->size = 0; /* zero-byte fi_writedata */
}

int main(int argc, char **argv)
{
    struct opts o;
    parse_args(argc, argv, &o);
    int nctx = o.mode == MODE_RTT ? RTT_CTX : o.inflight;
    int nt = o.mode == MODE_SCATTER ? o.peers : 1; /* target endpoints */
    /* Registered bytes: pages: a region of `pages` strides each side; scatter: the initiator
     * a source block per peer, each target endpoint `size`; otherwise `size` each. */
    size_t init_len = o.mode == MODE_PAGES     ? o.stride * (size_t)o.pages
                      : o.mode == MODE_SCATTER ? o.size * (size_t)o.peers
                                               : o.size;
    size_t target_len = o.mode == MODE_PAGES ? init_len : o.size;

    int p2c[2], c2p[2];
    if (pipe(p2c) || pipe(c2p))
        die("pipe: %s", strerror(errno));
    fflush(NULL);
    pid_t ppid = getpid();
    pid_t pid = fork();
    if (pid < 0)
        die("fork: %s", strerror(errno));

    struct fab f = {0};
    struct fab *fs;
    if (pid == 0) { /* child: initiator */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != ppid)
            _exit(1);
        close(p2c[1]), close(c2p[0]);
        f.pipe_rd = p2c[0], f.pipe_wr = c2p[1];
        fab_init(&f, &o, nctx, 0, init_len, nt + 1 < 2 ? 2 : nt + 1);
        exchange_initiator(&f, nt);
        if (o.mode == MODE_RTT)
            run_rtt(&f, &o);
        else if (o.mode == MODE_PAGES || o.mode == MODE_SCATTER)
            run_stream(&f, &o);
        else
            run_bw(&f, &o);
        fab_close(&f);
        fflush(stdout);
        return 0;
    }

    /* parent: target */
    child_pid = pid;
    signal(SIGPIPE, SIG_IGN); /* a dead child shows up as EPIPE / EOF */
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGHUP, on_signal);
    signal(SIGCHLD, on_sigchld);
    close(p2c[0]), close(c2p[1]);
    if (!(fs = calloc((size_t)nt, sizeof(*fs))))
        die("calloc: out of memory");
    for (int i = 0; i < nt; i++) {
        fs[i].pipe_rd = c2p[0], fs[i].pipe_wr = p2c[1];
        fab_init(&fs[i], &o, o.mode == MODE_BW || o.mode == MODE_RATE ? nctx : RTT_CTX, 1,
                 target_len, 2);
    }
    if (exchange_target(fs, nt) == 0)
        run_target(fs, nt, &o);
    for (int i = 0; i < nt; i++)
        fab_close(&fs[i]);
    free(fs);

    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            die("waitpid: %s", strerror(errno));
    child_pid = -1;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return 0;
    if (WIFSIGNALED(status))
        fprintf(stderr, "fabric_raw: initiator killed by signal %d\n", WTERMSIG(status));
    return 1;
}
