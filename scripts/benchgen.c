/* benchgen sessions: see benchgen.h. */
#define _GNU_SOURCE
#include "benchgen.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define P_NOCONNECT 0x000001u
#define P_NOHELO 0x000002u
#define P_NOMAIL 0x000004u
#define P_NORCPT 0x000008u
#define P_NOBODY 0x000010u
#define P_NOHDRS 0x000020u
#define P_NOEOH 0x000040u
#define P_NR_HDR 0x000080u
#define P_NODATA 0x000200u
#define P_SKIP 0x000400u
#define P_NR_CONN 0x001000u
#define P_NR_HELO 0x002000u
#define P_NR_MAIL 0x004000u
#define P_NR_RCPT 0x008000u
#define P_NR_DATA 0x010000u
#define P_NR_EOH 0x040000u
#define P_NR_BODY 0x080000u

#define BODY_CHUNK 65535u
#define MAX_FRAME (16u << 20) /* larger replies are a protocol error */
#define MAX_ERR_LINES 20 /* detailed error lines printed */

const char *const gen_step_names[] = {
    "OPTNEG", "CONNECT", "HELO",    "MAIL",  "RCPT", "DATA", "HEADER",
    "EOH",    "BODY",    "BODYEOB", "ABORT", "QUIT", "IDLE", "END"};
const char *const gen_err_names[E__N] = {"wrong_reply", "missing_header",
                                         "timeout", "disconnect", "connect"};

struct opts O = {
    .label = "server",
    .conc = 8,
    .msgs_per_conn = 10,
    .rcpts = 2,
    .headers = 10,
    .threads = 1,
    .body = 4096,
    .duration = 5,
    .warmup = 1,
    .timeout = 10,
    .settle = 1,
    .max_errors = 1000,
};
struct sockaddr_storage g_addr;
socklen_t g_addrlen;
int g_is_tcp;
double t_start, t_ws, t_we;
atomic_long g_started, g_errors;
atomic_int g_stop;
atomic_uint g_neg_protocol;

static char *g_body; /* the message body, shared read-only */
static atomic_int g_err_lines;

double gen_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- output queue: small packets in obuf, body bytes by reference ---- */

void gen_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("benchgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

void *gen_xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p)
        gen_die("out of memory");
    return p;
}

static void out_reserve(struct conn *c, size_t n)
{
    if (c->olen + n > c->ocap) {
        size_t cap = c->ocap ? c->ocap : 1024;
        while (cap < c->olen + n)
            cap *= 2;
        c->obuf = gen_xrealloc(c->obuf, cap);
        c->ocap = cap;
    }
}

static struct seg *seg_new(struct conn *c)
{
    if (c->nsegs == c->segcap) {
        c->segcap = c->segcap ? c->segcap * 2 : 16;
        c->segs = gen_xrealloc(c->segs, (size_t)c->segcap * sizeof *c->segs);
    }
    return &c->segs[c->nsegs++];
}

static void out_bytes(struct conn *c, const void *p, size_t n)
{
    out_reserve(c, n);
    memcpy(c->obuf + c->olen, p, n);
    struct seg *last = c->nsegs ? &c->segs[c->nsegs - 1] : NULL;
    if (last && !last->ext && last->off + last->len == c->olen)
        last->len += n;
    else
        *seg_new(c) = (struct seg){NULL, c->olen, n};
    c->olen += n;
}

static void out_ext(struct conn *c, const char *p, size_t n)
{
    *seg_new(c) = (struct seg){p, 0, n};
}

void gen_put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

uint32_t gen_get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           p[3];
}

/* A frame whose payload is a list of NUL-terminated strings (NULL ends). */
static void out_frame_strs(struct conn *c, char cmd, const char *const *s)
{
    size_t len = 1;
    for (int i = 0; s[i]; i++)
        len += strlen(s[i]) + 1;
    unsigned char hdr[5];
    gen_put_u32(hdr, (uint32_t)len);
    hdr[4] = (unsigned char)cmd;
    out_bytes(c, hdr, 5);
    for (int i = 0; s[i]; i++)
        out_bytes(c, s[i], strlen(s[i]) + 1);
}

static void out_frame(struct conn *c, char cmd, const void *p, size_t n)
{
    unsigned char hdr[5];
    gen_put_u32(hdr, (uint32_t)(n + 1));
    hdr[4] = (unsigned char)cmd;
    out_bytes(c, hdr, 5);
    if (n)
        out_bytes(c, p, n);
}

/* MACRO packet for command cmd: name/value pairs, NULL-terminated list. */
static void out_macro(struct conn *c, char cmd, const char *const *kv)
{
    size_t len = 2;
    for (int i = 0; kv[i]; i++)
        len += strlen(kv[i]) + 1;
    unsigned char hdr[6];
    gen_put_u32(hdr, (uint32_t)len);
    hdr[4] = 'D';
    hdr[5] = (unsigned char)cmd;
    out_bytes(c, hdr, 6);
    for (int i = 0; kv[i]; i++)
        out_bytes(c, kv[i], strlen(kv[i]) + 1);
}

static void out_macro_qid(struct conn *c, char cmd)
{
    const char *kv[] = {"i", c->qid, NULL};
    out_macro(c, cmd, kv);
}

/* ---- message content ---- */

static const char *const hdr_names[] = {
    "Received",     "From",         "To",
    "Subject",      "Date",         "Message-ID",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "X-Mailer"};
#define NHDR_NAMES (sizeof hdr_names / sizeof hdr_names[0])

static void header_value(struct conn *c, int i, char *v, size_t n)
{
    unsigned long s = c->serial, m = c->mseq;
    switch (i) {
    case 0:
        snprintf(v, n,
                 "from client-%lu.example.net (client-%lu.example.net "
                 "[192.0.2.%lu])\n\tby mail.example.net (Postfix) with ESMTPS "
                 "id %s;\n\tMon,  1 Jan 2024 00:00:00 +0000 (UTC)",
                 s, s, s % 250 + 1, c->qid);
        break;
    case 1: snprintf(v, n, "Sender %lu <sender-%lu@example.net>", s, s); break;
    case 2: snprintf(v, n, "Recipient <rcpt-0@example.org>"); break;
    case 3:
        snprintf(v, n, "Benchmark message %lu of connection %lu", m, s);
        break;
    case 4: snprintf(v, n, "Mon, 1 Jan 2024 00:00:00 +0000"); break;
    case 5: snprintf(v, n, "<%lu.%lu.bench@example.net>", s, m); break;
    case 6: snprintf(v, n, "1.0"); break;
    case 7: snprintf(v, n, "text/plain; charset=utf-8; format=flowed"); break;
    case 8: snprintf(v, n, "8bit"); break;
    case 9: snprintf(v, n, "benchgen 1.0"); break;
    default:
        snprintf(v, n, "extra header %d of message %lu, some filler text", i,
                 m);
        break;
    }
}

void gen_make_body(size_t n)
{
    static const char line[] =
        "The quick brown fox jumps over the lazy dog; benchmark body line\r\n";
    g_body = gen_xrealloc(NULL, n + 1);
    for (size_t i = 0; i < n; i += sizeof line - 1) {
        size_t k = n - i < sizeof line - 1 ? n - i : sizeof line - 1;
        memcpy(g_body + i, line, k);
    }
    if (n >= 2) { /* end on a line break */
        g_body[n - 2] = '\r';
        g_body[n - 1] = '\n';
    }
}

/* ---- errors and results ---- */

static void verr(struct conn *c, int kind, const char *fmt, va_list ap)
{
    struct worker *w = c->w;
    w->errs[kind]++;
    long total = atomic_fetch_add(&g_errors, 1) + 1;
    if (atomic_fetch_add(&g_err_lines, 1) < MAX_ERR_LINES) {
        char msg[256];
        vsnprintf(msg, sizeof msg, fmt, ap);
        fprintf(stderr, "benchgen: error %s: conn %lu, message %d, at %s: %s\n",
                gen_err_names[kind], c->serial, c->msgs + 1,
                gen_step_names[c->await >= 0 ? c->await : c->step], msg);
    }
    if (O.max_errors && total >= O.max_errors && !atomic_load(&g_stop)) {
        fprintf(stderr, "benchgen: %ld errors: giving up\n", total);
        atomic_store(&g_stop, 1);
    }
}

/* Counts (and for the first few, prints) one error. */
void gen_err(struct conn *c, int kind, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    verr(c, kind, fmt, ap);
    va_end(ap);
}

static void record_done(struct conn *c, double now)
{
    struct worker *w = c->w;
    w->done_total++;
    w->t_last_done = now;
    if (now < t_ws || now >= t_we)
        return;
    w->done_window++;
    if (w->nlat == w->latcap) {
        w->latcap = w->latcap ? w->latcap * 2 : 4096;
        w->lat = gen_xrealloc(w->lat, w->latcap * sizeof *w->lat);
    }
    w->lat[w->nlat++] = now - c->t_mail;
}

/* ---- connection ---- */

static void ep_mod(struct conn *c, int out)
{
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0),
                             .data.ptr = c};
    epoll_ctl(c->w->ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->epollout = out;
}

int gen_connect_fd(void)
{
    int fd = socket(g_addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {(time_t)O.timeout,
                         (suseconds_t)((O.timeout - (time_t)O.timeout) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    /* Blocking connect (bounded by SO_SNDTIMEO): a full unix-socket
     * backlog then waits for the server instead of failing with EAGAIN. */
    if (connect(fd, (struct sockaddr *)&g_addr, g_addrlen) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    if (g_is_tcp) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void advance(struct conn *c);
static void flush(struct conn *c);

/* Opens a fresh connection in c's slot and starts its session. */
int gen_conn_start(struct conn *c)
{
    struct worker *w = c->w;
    c->fd = gen_connect_fd();
    if (c->fd < 0) {
        c->await = -1;
        gen_err(c, E_CONNECT, "connect: %s", strerror(errno));
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(w->ep, EPOLL_CTL_ADD, c->fd, &ev);
    c->active = 1;
    c->epollout = 0;
    c->serial =
        (unsigned long)w->id + w->next_serial++ * (unsigned long)O.threads;
    c->step = S_OPTNEG;
    c->await = -1;
    c->msgs = 0;
    c->olen = 0;
    c->nsegs = c->segpos = 0;
    c->segoff = 0;
    c->ilen = 0;
    w->conns_opened++;
    advance(c);
    return 0;
}

void gen_conn_close(struct conn *c)
{
    if (c->fd >= 0) {
        epoll_ctl(c->w->ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->active = 0;
}

/* The slot's connection ended (cleanly or not): open the next one. */
static void conn_next(struct conn *c)
{
    gen_conn_close(c);
    for (;;) {
        int more = !atomic_load(&g_stop) && !O.idle;
        if (O.total && atomic_load(&g_started) >= O.total)
            more = 0;
        if (!more) {
            c->w->active--;
            return;
        }
        if (gen_conn_start(c) == 0)
            return;
        struct timespec ts = {0, 50 * 1000 * 1000}; /* server gone? */
        nanosleep(&ts, NULL);
    }
}

/* An error that ends the connection (the stream can't be trusted). */
static void fail(struct conn *c, int kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void fail(struct conn *c, int kind, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    verr(c, kind, fmt, ap);
    va_end(ap);
    conn_next(c);
}

static void new_qid(struct conn *c)
{
    c->mseq++;
    snprintf(c->qid, sizeof c->qid, "%02X%09lX", (unsigned)(c->w->id & 0xff),
             (c->serial * 1000003ul + c->mseq) & 0xfffffffffUL);
}

static void wait_reply(struct conn *c, int step)
{
    c->await = step;
    c->deadline = gen_now() + O.timeout;
}

/* Writes the packets up to the next one that needs a reply, then sends. */
static void advance(struct conn *c)
{
    char a[96], b[160], d[48], v[512];
    uint32_t p = c->protocol;
    while (c->await < 0 && c->step != S_END && c->step != S_IDLE) {
        switch (c->step) {
        case S_OPTNEG: {
            unsigned char pl[12];
            gen_put_u32(pl, OFFER_VERSION);
            gen_put_u32(pl + 4, OFFER_ACTIONS);
            gen_put_u32(pl + 8, OFFER_PROTOCOL);
            out_frame(c, 'O', pl, 12);
            wait_reply(c, S_OPTNEG);
            c->step = S_CONNECT;
            break;
        }
        case S_CONNECT: {
            unsigned long s = c->serial;
            snprintf(a, sizeof a, "client-%lu.example.net", s);
            snprintf(d, sizeof d, "192.0.2.%lu", s % 250 + 1);
            snprintf(b, sizeof b, "%s [%s]", a, d);
            const char *kv[] = {"j",
                                "mail.example.net",
                                "{daemon_name}",
                                "mail.example.net",
                                "{daemon_addr}",
                                "127.0.0.1",
                                "v",
                                "Postfix 3.7.11",
                                "_",
                                b,
                                NULL};
            out_macro(c, 'C', kv);
            if (!(p & P_NOCONNECT)) {
                size_t hl = strlen(a) + 1, al = strlen(d) + 1;
                char pl[256];
                memcpy(pl, a, hl);
                pl[hl] = '4';
                pl[hl + 1] = (char)((40000 + s % 20000) >> 8);
                pl[hl + 2] = (char)((40000 + s % 20000) & 0xff);
                memcpy(pl + hl + 3, d, al);
                out_frame(c, 'C', pl, hl + 3 + al);
                if (!(p & P_NR_CONN))
                    wait_reply(c, S_CONNECT);
            }
            c->step = O.idle ? S_IDLE : S_HELO;
            break;
        }
        case S_HELO: {
            static const char *const none[] = {NULL}; /* no TLS */
            out_macro(c, 'H', none);
            if (!(p & P_NOHELO)) {
                snprintf(a, sizeof a, "client-%lu.example.net", c->serial);
                const char *s[] = {a, NULL};
                out_frame_strs(c, 'H', s);
                if (!(p & P_NR_HELO))
                    wait_reply(c, S_HELO);
            }
            c->step = S_MAIL;
            break;
        }
        case S_MAIL: {
            int more = c->msgs < O.msgs_per_conn && !atomic_load(&g_stop);
            if (more && O.total && atomic_fetch_add(&g_started, 1) >= O.total) {
                more = 0;
            } else if (more && !O.total) {
                atomic_fetch_add(&g_started, 1);
            }
            if (!more) {
                c->step = S_QUIT;
                break;
            }
            new_qid(c);
            c->skip = c->got_header = 0;
            c->body_off = 0;
            c->idx = 0;
            c->t_mail = gen_now();
            snprintf(a, sizeof a, "sender-%lu@example.net", c->serial);
            const char *kv[] = {
                "{mail_addr}",   a,      "{mail_host}", "mail.example.org",
                "{mail_mailer}", "smtp", NULL};
            out_macro(c, 'M', kv);
            if (!(p & P_NOMAIL)) {
                snprintf(b, sizeof b, "<%s>", a);
                snprintf(d, sizeof d, "SIZE=%zu", O.body + 64u * O.headers);
                const char *s[] = {b, d, "BODY=8BITMIME", NULL};
                out_frame_strs(c, 'M', s);
                if (!(p & P_NR_MAIL))
                    wait_reply(c, S_MAIL);
            }
            c->step = S_RCPT;
            break;
        }
        case S_RCPT: {
            if (c->idx >= O.rcpts) {
                c->step = S_DATA;
                break;
            }
            snprintf(a, sizeof a, "rcpt-%d@example.org", c->idx);
            /* Postfix has a queue id only after the first recipient. */
            const char *kv1[] = {
                "{rcpt_addr}",   a,      "{rcpt_host}", "mail.example.org",
                "{rcpt_mailer}", "smtp", NULL};
            const char *kv2[] = {"i",
                                 c->qid,
                                 "{rcpt_addr}",
                                 a,
                                 "{rcpt_host}",
                                 "mail.example.org",
                                 "{rcpt_mailer}",
                                 "smtp",
                                 NULL};
            out_macro(c, 'R', c->idx == 0 ? kv1 : kv2);
            if (!(p & P_NORCPT)) {
                snprintf(b, sizeof b, "<%s>", a);
                const char *s[] = {b, NULL};
                out_frame_strs(c, 'R', s);
                if (!(p & P_NR_RCPT))
                    wait_reply(c, S_RCPT);
            }
            c->idx++;
            break;
        }
        case S_DATA: /* Postfix has no DATA event below version 4 */
            if (c->version >= 4)
                out_macro_qid(c, 'T');
            if (!(p & P_NODATA) && c->version >= 4) {
                out_frame(c, 'T', NULL, 0);
                if (!(p & P_NR_DATA))
                    wait_reply(c, S_DATA);
            }
            c->step = S_HEADER;
            c->idx = 0;
            break;
        case S_HEADER: {
            if (c->idx >= O.headers || (p & P_NOHDRS)) {
                c->step = S_EOH;
                break;
            }
            const char *name = hdr_names[c->idx % NHDR_NAMES];
            if (c->idx >= (int)NHDR_NAMES) {
                snprintf(a, sizeof a, "X-Bench-Extra-%d", c->idx);
                name = a;
            }
            header_value(c, c->idx, v, sizeof v);
            out_macro_qid(c, 'L');
            const char *s[] = {name, v, NULL};
            out_frame_strs(c, 'L', s);
            if (!(p & P_NR_HDR))
                wait_reply(c, S_HEADER);
            c->idx++;
            break;
        }
        case S_EOH:
            if (!(p & P_NOEOH)) {
                out_macro_qid(c, 'N');
                out_frame(c, 'N', NULL, 0);
                if (!(p & P_NR_EOH))
                    wait_reply(c, S_EOH);
            }
            c->step = S_BODY;
            break;
        case S_BODY: {
            if ((p & P_NOBODY) || c->skip || c->body_off >= O.body) {
                c->step = S_EOB;
                break;
            }
            size_t n = O.body - c->body_off;
            if (n > BODY_CHUNK)
                n = BODY_CHUNK;
            out_macro_qid(c, 'B');
            unsigned char hdr[5];
            gen_put_u32(hdr, (uint32_t)(n + 1));
            hdr[4] = 'B';
            out_bytes(c, hdr, 5);
            out_ext(c, g_body + c->body_off, n);
            c->body_off += n;
            if (!(p & P_NR_BODY))
                wait_reply(c, S_BODY);
            break;
        }
        case S_EOB:
            out_macro_qid(c, 'E');
            out_frame(c, 'E', NULL, 0);
            wait_reply(c, S_EOB);
            c->step = S_ABORT;
            break;
        case S_ABORT: /* Postfix sends ABORT after every message */
            out_frame(c, 'A', NULL, 0);
            c->msgs++;
            c->step = S_MAIL;
            break;
        case S_QUIT: /* ... and ABORT, QUIT at the end of the session */
            out_frame(c, 'A', NULL, 0);
            out_frame(c, 'Q', NULL, 0);
            c->step = S_END;
            break;
        default: c->step = S_END; break;
        }
    }
    flush(c);
}

static void flush(struct conn *c)
{
    while (c->segpos < c->nsegs) {
        struct iovec iov[64];
        int n = 0;
        for (int i = c->segpos; i < c->nsegs && n < 64; i++, n++) {
            const struct seg *s = &c->segs[i];
            const char *base = s->ext ? s->ext : c->obuf + s->off;
            size_t skip = i == c->segpos ? c->segoff : 0;
            iov[n].iov_base = (void *)(base + skip);
            iov[n].iov_len = s->len - skip;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t k = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (!c->epollout)
                    ep_mod(c, 1);
                return;
            }
            fail(c, E_DISCONNECT, "write: %s", strerror(errno));
            return;
        }
        size_t left = (size_t)k;
        while (left && c->segpos < c->nsegs) {
            struct seg *s = &c->segs[c->segpos];
            size_t rem = s->len - c->segoff;
            if (left >= rem) {
                left -= rem;
                c->segpos++;
                c->segoff = 0;
            } else {
                c->segoff += left;
                left = 0;
            }
        }
    }
    c->nsegs = c->segpos = 0;
    c->segoff = 0;
    c->olen = 0;
    if (c->epollout)
        ep_mod(c, 0);
    if (c->step == S_END) /* QUIT is out: the session is over */
        conn_next(c);
}

static int is_mod(int cmd, uint32_t actions)
{
    switch (cmd) {
    case 'h':
    case 'i': return (actions & 0x01) != 0;
    case 'b': return (actions & 0x02) != 0;
    case '+': return (actions & 0x04) != 0;
    case '-': return (actions & 0x08) != 0;
    case 'm': return (actions & 0x10) != 0;
    case 'q': return (actions & 0x20) != 0;
    case 'e': return (actions & 0x40) != 0;
    case '2': return (actions & 0x80) != 0;
    default: return 0;
    }
}

const char *gen_show(int cmd)
{
    static _Thread_local char s[8];
    if (cmd > 0x20 && cmd < 0x7f)
        snprintf(s, sizeof s, "'%c'", cmd);
    else
        snprintf(s, sizeof s, "0x%02x", cmd);
    return s;
}

/* Checks one reply frame; returns 0 to go on, -1 when c was failed. */
static int on_frame(struct conn *c, int cmd, const unsigned char *pl, size_t n)
{
    int st = c->await;
    if (st < 0) {
        fail(c, E_WRONG, "unsolicited reply %s", gen_show(cmd));
        return -1;
    }
    if (cmd == 'p') { /* PROGRESS: legal whenever a reply is awaited */
        c->deadline = gen_now() + O.timeout;
        return 0;
    }
    switch (st) {
    case S_OPTNEG: {
        if (cmd != 'O' || n < 12) {
            fail(c, E_WRONG, "OPTNEG answered with %s (%zu bytes)",
                 gen_show(cmd), n);
            return -1;
        }
        c->version = gen_get_u32(pl);
        c->actions = gen_get_u32(pl + 4);
        c->protocol = gen_get_u32(pl + 8);
        if (c->version < 2 || c->version > OFFER_VERSION ||
            (c->actions & ~OFFER_ACTIONS) || (c->protocol & ~OFFER_PROTOCOL)) {
            char why[96];
            snprintf(why, sizeof why, "bad OPTNEG reply v%u a0x%x p0x%x",
                     c->version, c->actions, c->protocol);
            fail(c, E_WRONG, "%s", why);
            return -1;
        }
        atomic_store(&g_neg_protocol, c->protocol);
        break;
    }
    case S_EOB:
        if (is_mod(cmd, c->actions)) {
            const unsigned char *s = pl;
            size_t k = n;
            if (cmd == 'i') { /* u32 index first */
                s = k >= 4 ? pl + 4 : pl;
                k = k >= 4 ? k - 4 : 0;
            }
            if (cmd == 'h' || cmd == 'i') {
                const unsigned char *nul = memchr(s, 0, k);
                if (!nul || !memchr(nul + 1, 0, k - (size_t)(nul + 1 - s))) {
                    fail(c, E_WRONG, "malformed %s packet", gen_show(cmd));
                    return -1;
                }
                if (O.expect_header &&
                    strcasecmp((const char *)s, O.expect_header) == 0)
                    c->got_header = 1;
            }
            return 0;
        }
        if (cmd != 'c' && cmd != 'a') {
            fail(c, E_WRONG, "BODYEOB answered with %s", gen_show(cmd));
            return -1;
        }
        if (O.expect_header && !c->got_header)
            gen_err(c, E_HEADER, "no ADDHEADER %s", O.expect_header);
        else
            record_done(c, gen_now());
        break;
    case S_BODY:
        if (cmd == 's' && (c->protocol & P_SKIP)) {
            c->skip = 1;
            break;
        }
        /* fall through */
    default:
        if (cmd != 'c') {
            fail(c, E_WRONG, "%s answered with %s", gen_step_names[st],
                 gen_show(cmd));
            return -1;
        }
        break;
    }
    c->await = -1;
    return 0;
}

static void on_readable(struct conn *c)
{
    if (c->icap - c->ilen < 4096) {
        c->icap = c->icap ? c->icap * 2 : 8192;
        c->ibuf = gen_xrealloc(c->ibuf, c->icap);
    }
    ssize_t k = recv(c->fd, c->ibuf + c->ilen, c->icap - c->ilen, MSG_DONTWAIT);
    if (k < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (k <= 0) {
        fail(c, E_DISCONNECT, "server closed the connection%s%s",
             k < 0 ? ": " : "", k < 0 ? strerror(errno) : "");
        return;
    }
    c->ilen += (size_t)k;
    size_t pos = 0;
    while (c->ilen - pos >= 5) {
        const unsigned char *f = (const unsigned char *)c->ibuf + pos;
        uint32_t len = gen_get_u32(f);
        if (len == 0 || len > MAX_FRAME) {
            fail(c, E_WRONG, "bad reply frame length %u", len);
            return;
        }
        if (c->ilen - pos < 4 + (size_t)len)
            break;
        if (on_frame(c, f[4], f + 5, len - 1) < 0)
            return;
        pos += 4 + (size_t)len;
    }
    memmove(c->ibuf, c->ibuf + pos, c->ilen - pos);
    c->ilen -= pos;
    if (c->await < 0 && c->step != S_END && c->step != S_IDLE)
        advance(c);
}

static void check_timeouts(struct worker *w, double now)
{
    for (int i = 0; i < w->nconns; i++) {
        struct conn *c = &w->conns[i];
        if (c->active && c->await >= 0 && now > c->deadline)
            fail(c, E_TIMEOUT, "no reply within %.1fs", O.timeout);
    }
}

void gen_worker_loop(struct worker *w, double until)
{
    struct epoll_event evs[256];
    double last_scan = gen_now();
    while (w->active > 0) {
        double now = gen_now();
        if (until > 0 && now >= until)
            return;
        int n = epoll_wait(w->ep, evs, 256, 20);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c->active)
                continue;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
            if (c->active && (evs[i].events & EPOLLOUT))
                flush(c);
        }
        now = gen_now();
        if (now - last_scan > 0.02) {
            check_timeouts(w, now);
            last_scan = now;
        }
    }
}

void *gen_worker_main(void *arg)
{
    struct worker *w = arg;
    for (int i = 0; i < w->nconns; i++) {
        if (gen_conn_start(&w->conns[i]) == 0)
            w->active++;
        else
            w->conns[i].active = 0;
    }
    gen_worker_loop(w, 0);
    return NULL;
}
