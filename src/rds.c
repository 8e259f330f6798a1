/* rds: see rds.h. */
#include "rds.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
/* static functions of hiredis' own, all used by redisLibevAttach: this is
 * the one file that includes it */
#include <hiredis/adapters/libev.h>

#include "aio.h"

/* Distinct URLs a process may use: each keeps a connection open. */
#define RDS_MAX_URLS 64

struct rds {
    char *url;            /* the key, as given */
    char *host;           /* numeric address, or NULL for a unix socket */
    int port;
    char *path;           /* unix socket */
    char *user, *pass;    /* AUTH [user] pass when pass is set */
    long db;              /* SELECT db when not 0 */
    redisAsyncContext *ac; /* the connection, NULL until made */
    int ready;            /* AUTH and SELECT answered: send at once */
    int setup_pending;    /* their replies still to come */
    struct rds_req *waiting; /* started before ready, in order */
    char errbuf[160];
    struct rds *next;
};

struct rds_req {
    struct rds *r;
    rds_cb cb;
    void *ud;
    size_t ncmds, nadded, got;
    char **cmd;           /* formatted commands, until sent */
    size_t *cmdlen;
    struct rds_reply *replies;
    int inflight;         /* hiredis callbacks still to come */
    int done;             /* cb ran, or cancelled: it never runs again */
    struct tmr *timer;    /* the deadline, or the late delivery */
    const char *late;     /* an error found at start, delivered from the loop */
    char errbuf[160];
    struct rds_req *next, **pprev; /* r->waiting */
};

static struct rds *servers;
static int nservers;

/* ---- replies -------------------------------------------------------- */

static void free_reply(struct rds_reply *x)
{
    free(x->str);
    for (size_t i = 0; i < x->n; i++)
        free_reply(&x->elem[i]);
    free(x->elem);
    memset(x, 0, sizeof *x);
}

/* A deep copy (hiredis frees its reply when the callback returns, and a
 * pipeline's replies are handed over together). The reader nests at most
 * a few levels, which bounds the recursion. 0, or -1 out of memory. */
static int copy_reply(struct rds_reply *d, const redisReply *s)
{
    memset(d, 0, sizeof *d);
    switch (s->type) {
    case REDIS_REPLY_STRING: d->type = RDS_STRING; break;
    case REDIS_REPLY_STATUS: d->type = RDS_STATUS; break;
    case REDIS_REPLY_ERROR: d->type = RDS_ERROR; break;
    case REDIS_REPLY_INTEGER: d->type = RDS_INTEGER; break;
    case REDIS_REPLY_ARRAY: d->type = RDS_ARRAY; break;
    default: d->type = RDS_NIL; break;
    }
    d->integer = s->integer;
    if (d->type == RDS_STRING || d->type == RDS_STATUS ||
        d->type == RDS_ERROR) {
        d->str = malloc(s->len + 1);
        if (!d->str)
            return -1;
        if (s->len)
            memcpy(d->str, s->str, s->len);
        d->str[s->len] = 0;
        d->len = s->len;
    } else if (d->type == RDS_ARRAY && s->elements) {
        d->elem = calloc(s->elements, sizeof *d->elem);
        if (!d->elem)
            return -1;
        d->n = s->elements;
        for (size_t i = 0; i < s->elements; i++)
            if (copy_reply(&d->elem[i], s->element[i]) < 0)
                return -1;
    }
    return 0;
}

/* ---- requests ------------------------------------------------------- */

struct rds_req *rds_req_new(size_t ncmds)
{
    if (ncmds == 0)
        return NULL;
    struct rds_req *q = calloc(1, sizeof *q);
    if (!q)
        return NULL;
    q->ncmds = ncmds;
    q->cmd = calloc(ncmds, sizeof *q->cmd);
    q->cmdlen = calloc(ncmds, sizeof *q->cmdlen);
    q->replies = calloc(ncmds, sizeof *q->replies);
    if (!q->cmd || !q->cmdlen || !q->replies) {
        rds_req_free(q);
        return NULL;
    }
    return q;
}

int rds_req_add(struct rds_req *q, int argc, const char *const *argv,
                const size_t *lens)
{
    if (q->nadded >= q->ncmds || argc < 1)
        return -1;
    char *cmd = NULL;
    int len = redisFormatCommandArgv(&cmd, argc, (const char **)argv, lens);
    if (len < 0 || !cmd)
        return -1;
    q->cmd[q->nadded] = cmd;
    q->cmdlen[q->nadded] = (size_t)len;
    q->nadded++;
    return 0;
}

void rds_req_free(struct rds_req *q)
{
    if (!q)
        return;
    if (q->cmd)
        for (size_t i = 0; i < q->ncmds; i++)
            redisFreeCommand(q->cmd[i]);
    if (q->replies)
        for (size_t i = 0; i < q->ncmds; i++)
            free_reply(&q->replies[i]);
    free(q->cmd);
    free(q->cmdlen);
    free(q->replies);
    free(q);
}

static void unlink_req(struct rds_req *q)
{
    if (q->pprev) {
        *q->pprev = q->next;
        if (q->next)
            q->next->pprev = q->pprev;
    }
    q->next = NULL;
    q->pprev = NULL;
}

static void maybe_free(struct rds_req *q)
{
    if (q->done && q->inflight == 0)
        rds_req_free(q);
}

/* Ends q once: its callback runs now (the caller frees with maybe_free). */
static void finish(struct rds_req *q, const char *err)
{
    if (q->done)
        return;
    q->done = 1;
    tmr_cancel(q->timer);
    q->timer = NULL;
    unlink_req(q);
    q->cb(q->ud, err, err ? NULL : q->replies, err ? 0 : q->ncmds);
}

void rds_cancel(struct rds_req *q)
{
    if (!q || q->done)
        return;
    q->done = 1; /* hiredis may still call back: on_reply ignores it */
    tmr_cancel(q->timer);
    q->timer = NULL;
    unlink_req(q);
    maybe_free(q);
}

/* ---- the connection ------------------------------------------------- */

/* What went wrong on ac, short and lowercase ("closed" when nothing did:
 * the connection was dropped on purpose). */
static const char *ac_err(const redisAsyncContext *ac, char *buf, size_t n)
{
    switch (ac->err) {
    case 0:
    case REDIS_ERR_EOF: return "closed";
    case REDIS_ERR_PROTOCOL: return "protocol error";
    case REDIS_ERR_OOM: return "out of memory";
    default: break;
    }
    snprintf(buf, n, "%s", ac->errstr[0] ? ac->errstr : "connection error");
    for (char *p = buf; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    return buf;
}

/* The requests waiting for the connection's setup fail with err. */
static void fail_waiting(struct rds *r, const char *err)
{
    while (r->waiting) {
        struct rds_req *q = r->waiting;
        finish(q, err); /* unlinks it */
        maybe_free(q);
    }
}

/* Forgets the connection (the next request makes a new one). */
static void forget(struct rds *r)
{
    r->ac = NULL;
    r->ready = 0;
    r->setup_pending = 0;
}

/* Drops the connection from outside hiredis' callbacks: what was sent
 * on it fails with "closed" (hiredis calls back with no reply). */
static void drop(struct rds *r)
{
    redisAsyncContext *ac = r->ac;
    if (!ac)
        return;
    forget(r);
    fail_waiting(r, "closed");
    redisAsyncFree(ac);
}

static void on_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    struct rds_req *q = priv;
    q->inflight--;
    if (!q->done) {
        if (!reply) {
            finish(q, ac_err(ac, q->errbuf, sizeof q->errbuf));
        } else if (copy_reply(&q->replies[q->got], reply) < 0) {
            finish(q, "out of memory");
        } else if (++q->got == q->ncmds) {
            finish(q, NULL);
        }
    }
    maybe_free(q);
}

/* Hands q's commands to hiredis, which writes them in one go. */
static void send_req(struct rds *r, struct rds_req *q)
{
    for (size_t i = 0; i < q->ncmds; i++) {
        if (redisAsyncFormattedCommand(r->ac, on_reply, q, q->cmd[i],
                                       q->cmdlen[i]) != REDIS_OK) {
            /* only when hiredis is tearing it down, which it would have
             * told us about: the replies of what was sent still come */
            finish(q, "closed");
            break;
        }
        q->inflight++;
        redisFreeCommand(q->cmd[i]);
        q->cmd[i] = NULL;
    }
}

static void on_setup(redisAsyncContext *ac, void *reply, void *priv)
{
    struct rds *r = priv;
    redisReply *x = reply;
    if (r->ac != ac || !x)
        return; /* an old connection, or the disconnect tells the rest */
    if (x->type == REDIS_REPLY_ERROR) {
        snprintf(r->errbuf, sizeof r->errbuf, "%s", x->str);
        forget(r);
        fail_waiting(r, r->errbuf);
        redisAsyncFree(ac); /* inside a callback: hiredis frees it after */
        return;
    }
    if (--r->setup_pending > 0)
        return;
    r->ready = 1;
    while (r->waiting) {
        struct rds_req *q = r->waiting;
        unlink_req(q);
        send_req(r, q);
        if (r->ac != ac)
            break;
    }
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    struct rds *r = ac->data;
    if (status == REDIS_OK || r->ac != ac)
        return;
    forget(r);
    fail_waiting(r, ac_err(ac, r->errbuf, sizeof r->errbuf));
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    struct rds *r = ac->data;
    if (r->ac != ac)
        return;
    forget(r);
    fail_waiting(r, ac_err(ac, r->errbuf, sizeof r->errbuf));
}

/* Makes r's connection and queues AUTH and SELECT. NULL, or the error. */
static const char *connect_to(struct rds *r, char *buf, size_t n)
{
    static int pipe_ignored;
    if (!pipe_ignored) { /* hiredis writes with write(2) */
        struct sigaction sa;
        if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
            signal(SIGPIPE, SIG_IGN);
        pipe_ignored = 1;
    }
    redisAsyncContext *ac = r->path ? redisAsyncConnectUnix(r->path)
                                    : redisAsyncConnect(r->host, r->port);
    if (!ac)
        return "out of memory";
    if (ac->err) {
        const char *err = ac_err(ac, buf, n);
        redisAsyncFree(ac);
        return err;
    }
    if (redisLibevAttach(aio_loop(), ac) != REDIS_OK) {
        redisAsyncFree(ac);
        return "out of memory";
    }
    ac->data = r;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    r->ac = ac;
    r->ready = 1;
    r->setup_pending = 0;
    if (r->pass) {
        const char *argv[3] = {"AUTH", r->user ? r->user : r->pass, r->pass};
        if (redisAsyncCommandArgv(ac, on_setup, r, r->user ? 3 : 2, argv,
                                  NULL) != REDIS_OK)
            goto fail;
        r->setup_pending++;
    }
    if (r->db) {
        if (redisAsyncCommand(ac, on_setup, r, "SELECT %ld", r->db) !=
            REDIS_OK)
            goto fail;
        r->setup_pending++;
    }
    r->ready = r->setup_pending == 0;
    return NULL;
fail:
    forget(r);
    redisAsyncFree(ac);
    return "out of memory";
}

static void on_timeout(void *ud)
{
    struct rds_req *q = ud;
    struct rds *r = q->r;
    q->timer = NULL; /* tmr frees itself after this callback */
    q->inflight++;   /* holds q over the drop */
    finish(q, "timeout");
    /* q waited on r's connection: a server that does not answer in time
     * gets a new connection for the next request */
    drop(r);
    q->inflight--;
    maybe_free(q);
}

static void on_late(void *ud)
{
    struct rds_req *q = ud;
    q->timer = NULL;
    finish(q, q->late);
    maybe_free(q);
}

int rds_start(struct rds *r, struct rds_req *q, double timeout, rds_cb cb,
              void *ud)
{
    if (q->nadded != q->ncmds) {
        rds_req_free(q);
        return -1;
    }
    q->r = r;
    q->cb = cb;
    q->ud = ud;
    const char *err = NULL;
    if (!r->ac)
        err = connect_to(r, q->errbuf, sizeof q->errbuf);
    if (err) { /* told from the loop, never from inside this call */
        q->late = err;
        q->timer = tmr_start(0, on_late, q);
    } else {
        q->timer = tmr_start(timeout, on_timeout, q);
    }
    if (!q->timer) {
        rds_req_free(q);
        return -1;
    }
    if (err)
        return 0;
    if (r->ready) {
        send_req(r, q);
    } else { /* behind AUTH and SELECT: appended, in order */
        struct rds_req **pp = &r->waiting;
        while (*pp)
            pp = &(*pp)->next;
        *pp = q;
        q->pprev = pp;
    }
    return 0;
}

/* ---- URLs ----------------------------------------------------------- */

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = tolower(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* An owned copy of s[0..n) with %XX decoded; NULL when bad or no memory. */
static char *decoded(const char *s, size_t n)
{
    char *d = malloc(n + 1), *o = d;
    if (!d)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%' && i + 2 < n && hexval(s[i + 1]) >= 0 &&
            hexval(s[i + 2]) >= 0) {
            *o++ = (char)(hexval(s[i + 1]) * 16 + hexval(s[i + 2]));
            i += 2;
        } else if (s[i] == '%' || s[i] == '\0') {
            free(d);
            return NULL;
        } else {
            *o++ = s[i];
        }
    }
    *o = 0;
    return d;
}

/* Digits only, 0..max; -1 otherwise. */
static long number(const char *s, size_t n, long max)
{
    if (n == 0 || n > 9)
        return -1;
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v <= max ? v : -1;
}

/* "db=N&password=P": fills r; 0, or -1 when bad. */
static int parse_query(struct rds *r, const char *q)
{
    while (*q) {
        const char *end = strchr(q, '&');
        size_t n = end ? (size_t)(end - q) : strlen(q);
        if (n > 3 && strncmp(q, "db=", 3) == 0) {
            if ((r->db = number(q + 3, n - 3, 1000000)) < 0)
                return -1;
        } else if (n > 9 && strncmp(q, "password=", 9) == 0) {
            free(r->pass);
            if (!(r->pass = decoded(q + 9, n - 9)))
                return -1;
        } else {
            return -1;
        }
        q += n + (end ? 1 : 0);
    }
    return 0;
}

static int parse_tcp(struct rds *r, const char *s)
{
    size_t alen = strcspn(s, "/?");
    const char *at = NULL;
    for (const char *p = s; p < s + alen; p++)
        if (*p == '@')
            at = p;
    if (at) { /* [user]:password, or password alone */
        const char *colon = memchr(s, ':', (size_t)(at - s));
        const char *pw = colon ? colon + 1 : s;
        if (colon && colon > s && !(r->user = decoded(s, (size_t)(colon - s))))
            return -1;
        if (!(r->pass = decoded(pw, (size_t)(at - pw))))
            return -1;
        alen -= (size_t)(at + 1 - s);
        s = at + 1;
    }
    const char *hs = s, *he, *rest;
    if (*s == '[') {
        hs = s + 1;
        he = memchr(hs, ']', alen);
        if (!he)
            return -1;
        rest = he + 1;
    } else {
        he = memchr(s, ':', alen);
        if (!he)
            he = s + alen;
        rest = he;
    }
    size_t hl = (size_t)(he - hs);
    if (hl == 0 || hl >= INET6_ADDRSTRLEN)
        return -1;
    char host[INET6_ADDRSTRLEN];
    memcpy(host, hs, hl);
    host[hl] = 0;
    if (strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    unsigned char a[16];
    if (inet_pton(AF_INET, host, a) != 1 && inet_pton(AF_INET6, host, a) != 1)
        return -1; /* a name would need a blocking resolver */
    if (!(r->host = strdup(host)))
        return -1;
    r->port = 6379;
    if (*rest == ':') {
        const char *pe = s + alen;
        long p = number(rest + 1, (size_t)(pe - rest - 1), 65535);
        if (p < 1)
            return -1;
        r->port = (int)p;
        rest = pe;
    } else if (rest != s + alen) {
        return -1;
    }
    if (*rest == '/') {
        size_t dl = strcspn(rest + 1, "?");
        if (dl && (r->db = number(rest + 1, dl, 1000000)) < 0)
            return -1;
        rest += 1 + dl;
    }
    if (*rest == '?')
        return parse_query(r, rest + 1);
    return *rest ? -1 : 0;
}

static int parse_unix(struct rds *r, const char *s)
{
    size_t n = strcspn(s, "?");
    if (n == 0 || s[0] != '/' || n >= sizeof(((struct sockaddr_un *)0)->sun_path))
        return -1;
    if (!(r->path = strndup(s, n)))
        return -1;
    return s[n] == '?' ? parse_query(r, s + n + 1) : 0;
}

static void free_server(struct rds *r)
{
    free(r->url);
    free(r->host);
    free(r->path);
    free(r->user);
    free(r->pass);
    free(r);
}

struct rds *rds_get(const char *url, const char **err)
{
    for (struct rds *r = servers; r; r = r->next)
        if (strcmp(r->url, url) == 0)
            return r;
    if (nservers >= RDS_MAX_URLS) {
        *err = "too many Redis URLs in one process";
        return NULL;
    }
    struct rds *r = calloc(1, sizeof *r);
    if (!r || !(r->url = strdup(url))) {
        free(r);
        *err = "out of memory";
        return NULL;
    }
    int rc = -1;
    if (strncmp(url, "redis://", 8) == 0)
        rc = parse_tcp(r, url + 8);
    else if (strncmp(url, "unix:", 5) == 0)
        rc = parse_unix(r, url + 5);
    if (rc < 0) {
        free_server(r);
        *err = "bad Redis URL (expected redis://[:password@]host[:port][/db] "
               "or unix:/path[?db=N])";
        return NULL;
    }
    r->next = servers;
    servers = r;
    nservers++;
    return r;
}

void rds_shutdown(void)
{
    while (servers) {
        struct rds *r = servers;
        servers = r->next;
        drop(r); /* what is still queued or sent fails with "closed" */
        free_server(r);
    }
    nservers = 0;
}
