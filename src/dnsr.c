/* dnsr: see dnsr.h. */
#include "dnsr.h"

#include <ares.h>
#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <ev.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "aio.h"
#include "log.h"

#define MAX_FDS 16

struct dnsr_req {
    dnsr_cb cb;      /* NULL once answered, timed out or cancelled */
    void *ud;
    int type;
    struct tmr *deadline;
    struct tmr *later; /* delivers a failure found while starting */
    const char *late_err;
    unsigned starting : 1, sync : 1;
};

static struct {
    ares_channel ch;
    pid_t pid; /* the process that made ch (workers make their own) */
    const char *server;
    ev_io io[MAX_FDS];
    int nio;
    ev_timer timer;
} R;

static void rearm(void);

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    ares_process_fd(R.ch, revents & EV_READ ? w->fd : ARES_SOCKET_BAD,
                    revents & EV_WRITE ? w->fd : ARES_SOCKET_BAD);
    rearm();
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    ares_process_fd(R.ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    rearm();
}

/* c-ares's next retransmission or timeout, on one timer. */
static void rearm(void)
{
    struct timeval tv, *t = ares_timeout(R.ch, NULL, &tv);
    ev_timer_stop(aio_loop(), &R.timer);
    if (t) {
        ev_timer_set(&R.timer, (double)t->tv_sec + t->tv_usec / 1e6, 0);
        ev_timer_start(aio_loop(), &R.timer);
    }
}

static void sock_state(void *data, ares_socket_t fd, int readable,
                       int writable)
{
    (void)data;
    int i = 0;
    while (i < R.nio && R.io[i].fd != fd)
        i++;
    if (i < R.nio)
        ev_io_stop(aio_loop(), &R.io[i]);
    if (!readable && !writable) {
        if (i < R.nio)
            R.io[i] = R.io[--R.nio];
        return;
    }
    if (i == R.nio) {
        if (R.nio == MAX_FDS)
            return; /* c-ares keeps few sockets; its timeouts still run */
        R.nio++;
    }
    ev_io_init(&R.io[i], on_io, fd,
               (readable ? EV_READ : 0) | (writable ? EV_WRITE : 0));
    ev_io_start(aio_loop(), &R.io[i]);
}

void dnsr_set_server(const char *server) { R.server = server; }

/* The channel of this process, made on first use. */
static const char *channel(void)
{
    if (R.ch && R.pid == getpid())
        return NULL;
    R.ch = NULL; /* a forked copy: c-ares state is not shared */
    R.nio = 0;
    static int lib;
    if (!lib && ares_library_init(ARES_LIB_INIT_ALL) != ARES_SUCCESS)
        return "resolver: library init failed";
    lib = 1;
    struct ares_options o;
    memset(&o, 0, sizeof o);
    o.sock_state_cb = sock_state;
    o.timeout = 1000; /* per try; each query has its own deadline too */
    o.tries = 3;
    o.lookups = (char *)"b"; /* DNS only, never /etc/hosts */
    /* SERVFAIL and REFUSED are answers the script sees as such (c-ares
     * would otherwise retry and report "connection refused") */
    o.flags = ARES_FLAG_NOCHECKRESP;
    int mask = ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES |
               ARES_OPT_LOOKUPS | ARES_OPT_FLAGS;
    if (ares_init_options(&R.ch, &o, mask) != ARES_SUCCESS) {
        R.ch = NULL;
        return "no resolver";
    }
    if (R.server && ares_set_servers_ports_csv(R.ch, R.server) !=
                        ARES_SUCCESS) {
        ares_destroy(R.ch);
        R.ch = NULL;
        return "bad --dns server";
    }
    R.pid = getpid();
    ev_init(&R.timer, on_timer);
    return NULL;
}

static const char *status_err(int st)
{
    switch (st) {
    case ARES_ETIMEOUT: return "timeout";
    case ARES_ESERVFAIL: return "servfail";
    case ARES_EREFUSED: return "refused";
    case ARES_ECONNREFUSED: return "connection refused";
    case ARES_EFORMERR: return "formerr";
    case ARES_ENOTIMP: return "notimp";
    case ARES_EBADRESP: return "bad response";
    case ARES_ENOMEM: return "out of memory";
    case ARES_EBADNAME: return "bad name";
    case ARES_ECANCELLED:
    case ARES_EDESTRUCTION: return "cancelled";
    default: return "lookup failed";
    }
}

static void deliver(struct dnsr_req *r, const struct dnsr_answer *a)
{
    dnsr_cb cb = r->cb;
    r->cb = NULL;
    tmr_cancel(r->deadline);
    r->deadline = NULL;
    if (cb)
        cb(r->ud, a);
}

/* Records from a hostent's aliases (PTR, NS) or its name (CNAME). */
static int from_hostent(struct hostent *h, struct dnsr_rr **out, size_t *n)
{
    size_t k = 0;
    while (h->h_aliases && h->h_aliases[k])
        k++;
    *out = calloc(k + 1, sizeof **out);
    if (!*out)
        return -1;
    for (size_t i = 0; i < k; i++)
        (*out)[i] = (struct dnsr_rr){h->h_aliases[i], strlen(h->h_aliases[i]),
                                     0};
    *n = k;
    return 0;
}

/* Parses abuf into records (owned: *rr, *txt, *h, *mx freed by caller). */
static int parse(struct dnsr_req *r, const unsigned char *abuf, int alen,
                 struct dnsr_rr **rr, size_t *n, char **strs,
                 struct hostent **h, struct ares_mx_reply **mx,
                 struct ares_txt_ext **txt)
{
    enum { MAXADDR = 64 };
    *n = 0;
    switch (r->type) {
    case DNSR_A:
    case DNSR_AAAA: {
        struct ares_addrttl a4[MAXADDR];
        struct ares_addr6ttl a6[MAXADDR];
        int na = MAXADDR;
        int st = r->type == DNSR_A
                     ? ares_parse_a_reply(abuf, alen, NULL, a4, &na)
                     : ares_parse_aaaa_reply(abuf, alen, NULL, a6, &na);
        if (st != ARES_SUCCESS)
            return st;
        *rr = calloc((size_t)na + 1, sizeof **rr);
        *strs = malloc(((size_t)na + 1) * INET6_ADDRSTRLEN);
        if (!*rr || !*strs)
            return ARES_ENOMEM;
        for (int i = 0; i < na; i++) {
            char *s = *strs + (size_t)i * INET6_ADDRSTRLEN;
            if (r->type == DNSR_A)
                inet_ntop(AF_INET, &a4[i].ipaddr, s, INET6_ADDRSTRLEN);
            else
                inet_ntop(AF_INET6, &a6[i].ip6addr, s, INET6_ADDRSTRLEN);
            (*rr)[i] = (struct dnsr_rr){s, strlen(s), 0};
        }
        *n = (size_t)na;
        return ARES_SUCCESS;
    }
    case DNSR_MX: {
        int st = ares_parse_mx_reply(abuf, alen, mx);
        if (st != ARES_SUCCESS)
            return st;
        size_t k = 0;
        for (struct ares_mx_reply *m = *mx; m; m = m->next)
            k++;
        if (!(*rr = calloc(k + 1, sizeof **rr)))
            return ARES_ENOMEM;
        for (struct ares_mx_reply *m = *mx; m; m = m->next)
            (*rr)[(*n)++] = (struct dnsr_rr){m->host, strlen(m->host),
                                             m->priority};
        return ARES_SUCCESS;
    }
    case DNSR_TXT: {
        int st = ares_parse_txt_reply_ext(abuf, alen, txt);
        if (st != ARES_SUCCESS)
            return st;
        size_t k = 0, bytes = 0;
        for (struct ares_txt_ext *t = *txt; t; t = t->next) {
            k += t->record_start != 0;
            bytes += t->length;
        }
        *rr = calloc(k + 1, sizeof **rr);
        *strs = malloc(bytes + k + 1);
        if (!*rr || !*strs)
            return ARES_ENOMEM;
        char *p = *strs;
        for (struct ares_txt_ext *t = *txt; t; t = t->next) {
            if (t->record_start || !*n) { /* one string per record */
                if (*n)
                    *p++ = '\0';
                (*rr)[(*n)++] = (struct dnsr_rr){p, 0, 0};
            }
            memcpy(p, t->txt, t->length);
            p += t->length;
            (*rr)[*n - 1].len += t->length;
        }
        *p = '\0';
        return ARES_SUCCESS;
    }
    case DNSR_PTR:
    case DNSR_NS: {
        int st = r->type == DNSR_PTR
                     ? ares_parse_ptr_reply(abuf, alen, NULL, 0, AF_INET, h)
                     : ares_parse_ns_reply(abuf, alen, h);
        if (st != ARES_SUCCESS)
            return st;
        return from_hostent(*h, rr, n) < 0 ? ARES_ENOMEM : ARES_SUCCESS;
    }
    default: { /* CNAME: the name the answer's CNAME points to */
        int st = ares_parse_a_reply(abuf, alen, h, NULL, NULL);
        if (st != ARES_SUCCESS)
            return st;
        if (!(*rr = calloc(2, sizeof **rr)))
            return ARES_ENOMEM;
        (*rr)[0] = (struct dnsr_rr){(*h)->h_name, strlen((*h)->h_name), 0};
        *n = 1;
        return ARES_SUCCESS;
    }
    }
}

static void late(void *ud)
{
    struct dnsr_req *r = ud;
    r->later = NULL;
    struct dnsr_answer a = {r->late_err, 0, NULL};
    deliver(r, &a);
    free(r);
}

static void answered(void *arg, int status, int timeouts, unsigned char *abuf,
                     int alen)
{
    (void)timeouts;
    struct dnsr_req *r = arg;
    if (r->starting) {
        /* from inside ares_query: answer from the loop instead (c-ares
         * keeps no cache, so this is a failure or an empty answer) */
        r->sync = 1;
        r->late_err = status == ARES_ENOTFOUND || status == ARES_ENODATA
                          ? NULL
                          : status_err(status == ARES_SUCCESS ? ARES_EBADRESP
                                                              : status);
        return;
    }
    struct dnsr_rr *rr = NULL;
    char *strs = NULL;
    struct hostent *h = NULL;
    struct ares_mx_reply *mx = NULL;
    struct ares_txt_ext *txt = NULL;
    struct dnsr_answer a = {NULL, 0, NULL};
    if (r->cb) {
        if (status == ARES_SUCCESS)
            status = parse(r, abuf, alen, &rr, &a.n, &strs, &h, &mx, &txt);
        if (status == ARES_ENOTFOUND || status == ARES_ENODATA)
            a.n = 0; /* no such name, or no record of that type */
        else if (status != ARES_SUCCESS)
            a.err = status_err(status);
        a.rr = rr;
        deliver(r, &a);
    }
    free(rr);
    free(strs);
    if (h)
        ares_free_hostent(h);
    if (mx)
        ares_free_data(mx);
    if (txt)
        ares_free_data(txt);
    free(r);
}

static void timed_out(void *ud)
{
    struct dnsr_req *r = ud;
    r->deadline = NULL;
    struct dnsr_answer a = {"timeout", 0, NULL};
    deliver(r, &a); /* c-ares frees r when it gives up on the query */
}

struct dnsr_req *dnsr_query(const char *name, int type, double timeout,
                            dnsr_cb cb, void *ud, const char **err)
{
    static const int types[] = {ns_t_a,   ns_t_aaaa,  ns_t_mx, ns_t_txt,
                                ns_t_ptr, ns_t_cname, ns_t_ns};
    *err = channel();
    if (*err)
        return NULL;
    struct dnsr_req *r = calloc(1, sizeof *r);
    if (!r) {
        *err = "out of memory";
        return NULL;
    }
    r->cb = cb;
    r->ud = ud;
    r->type = type;
    r->deadline = tmr_start(timeout, timed_out, r);
    r->starting = 1;
    ares_query(R.ch, name, ns_c_in, types[type], answered, r);
    r->starting = 0;
    if (r->sync) { /* c-ares is done with r: we deliver and free it */
        tmr_cancel(r->deadline);
        r->deadline = NULL;
        r->later = tmr_start(0, late, r);
        return r;
    }
    rearm();
    return r;
}

void dnsr_cancel(struct dnsr_req *r)
{
    if (!r)
        return;
    r->cb = NULL;
    tmr_cancel(r->deadline);
    r->deadline = NULL;
    if (r->later) { /* ours to free: c-ares is already done with it */
        tmr_cancel(r->later);
        free(r);
    } /* else c-ares still owns the query: answered() frees r */
}

int dnsr_reverse(const char *addr, const char *zone, char *out, size_t n)
{
    unsigned char b[16];
    size_t w = 0;
    if (inet_pton(AF_INET, addr, b) == 1) {
        w = (size_t)snprintf(out, n, "%u.%u.%u.%u", b[3], b[2], b[1], b[0]);
        if (!zone)
            w += (size_t)snprintf(out + w, n > w ? n - w : 0, ".in-addr.arpa");
    } else if (inet_pton(AF_INET6, addr, b) == 1) {
        static const char hex[] = "0123456789abcdef";
        if (n < 64 + 1)
            return -1;
        for (int i = 15; i >= 0; i--) {
            out[w++] = hex[b[i] & 15];
            out[w++] = '.';
            out[w++] = hex[b[i] >> 4];
            out[w++] = '.';
        }
        w--; /* the last dot */
        out[w] = '\0';
        if (!zone)
            w += (size_t)snprintf(out + w, n - w, ".ip6.arpa");
    } else {
        return -1;
    }
    if (zone)
        w += (size_t)snprintf(out + w, n > w ? n - w : 0, ".%s", zone);
    return w < n ? 0 : -1;
}

void dnsr_shutdown(void)
{
    if (!R.ch || R.pid != getpid())
        return;
    ev_timer_stop(aio_loop(), &R.timer);
    ares_destroy(R.ch); /* pending queries end (ARES_EDESTRUCTION), freed */
    R.ch = NULL;
    for (int i = 0; i < R.nio; i++)
        ev_io_stop(aio_loop(), &R.io[i]);
    R.nio = 0;
    ares_library_cleanup();
}
