/* httpc: see httpc.h. */
#include "httpc.h"

#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <ev.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "aio.h"

#define HEADER_CAP (1 << 20) /* response header bytes (of the last block) */

struct httpc_req {
    CURL *e;
    httpc_cb cb;
    void *ud;
    struct curl_slist *hdrs;
    char *body, *hb;          /* the response body; its header lines */
    size_t blen, bcap, hlen, hcap;
    size_t max_body;
    int too_large;
    char msg[96];             /* a lower-cased curl_easy_strerror */
};

/* A socket libcurl asked us to watch (curl_multi_assign'ed to it). */
struct sock {
    ev_io w;
};

static struct {
    CURLM *m;
    pid_t pid; /* the process that made m (workers make their own) */
    ev_timer timer;
} M;

static void drain(void);

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    int fd = w->fd, running; /* w may be freed during the action */
    int act = (revents & EV_READ ? CURL_CSELECT_IN : 0) |
              (revents & EV_WRITE ? CURL_CSELECT_OUT : 0);
    curl_multi_socket_action(M.m, fd, act, &running);
    drain();
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    int running;
    curl_multi_socket_action(M.m, CURL_SOCKET_TIMEOUT, 0, &running);
    drain();
}

/* CURLMOPT_TIMERFUNCTION: one timer for every transfer's next deadline. */
static int set_timer(CURLM *m, long ms, void *ud)
{
    (void)m;
    (void)ud;
    ev_timer_stop(aio_loop(), &M.timer);
    if (ms >= 0) {
        ev_timer_set(&M.timer, ms / 1000.0, 0);
        ev_timer_start(aio_loop(), &M.timer);
    }
    return 0;
}

/* CURLMOPT_SOCKETFUNCTION: start, change or stop watching s. */
static int set_sock(CURL *e, curl_socket_t s, int what, void *ud, void *sp)
{
    (void)e;
    (void)ud;
    struct sock *k = sp;
    if (what == CURL_POLL_REMOVE) {
        if (k) {
            ev_io_stop(aio_loop(), &k->w);
            free(k);
        }
        return 0;
    }
    int ev = (what & CURL_POLL_IN ? EV_READ : 0) |
             (what & CURL_POLL_OUT ? EV_WRITE : 0);
    if (!k) {
        if (!(k = malloc(sizeof *k)))
            return -1;
        ev_io_init(&k->w, on_io, s, ev);
        curl_multi_assign(M.m, s, k);
    } else {
        ev_io_stop(aio_loop(), &k->w);
        ev_io_set(&k->w, s, ev);
    }
    ev_io_start(aio_loop(), &k->w);
    return 0;
}

static int lib_init(void)
{
    static int done;
    if (!done && curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return -1;
    done = 1;
    return 0;
}

/* The multi handle of this process, made on first use. */
static const char *multi(void)
{
    if (M.m && M.pid == getpid())
        return NULL;
    M.m = NULL; /* a forked copy: libcurl state is not shared */
    if (lib_init() < 0 || !(M.m = curl_multi_init()))
        return "http: library init failed";
    M.pid = getpid();
    ev_init(&M.timer, on_timer);
    curl_multi_setopt(M.m, CURLMOPT_SOCKETFUNCTION, set_sock);
    curl_multi_setopt(M.m, CURLMOPT_TIMERFUNCTION, set_timer);
    return NULL;
}

/* Appends n bytes to *p (growing it, at most cap); -1 beyond cap. */
static int append(char **p, size_t *len, size_t *alloc, const char *s,
                  size_t n, size_t cap)
{
    if (n > cap - *len)
        return -1;
    if (*len + n > *alloc) {
        size_t a = *alloc ? *alloc : 1024;
        while (a < *len + n)
            a = a > cap / 2 ? cap : a * 2;
        char *q = realloc(*p, a);
        if (!q)
            return -1;
        *p = q;
        *alloc = a;
    }
    memcpy(*p + *len, s, n);
    *len += n;
    return 0;
}

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    struct httpc_req *r = ud;
    if (append(&r->body, &r->blen, &r->bcap, p, size * n, r->max_body) < 0) {
        r->too_large = 1;
        return 0; /* CURLE_WRITE_ERROR */
    }
    return size * n;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud)
{
    struct httpc_req *r = ud;
    if (size * n >= 5 && memcmp(p, "HTTP/", 5) == 0)
        r->hlen = 0; /* a new block: after a 1xx or a redirect */
    if (append(&r->hb, &r->hlen, &r->hcap, p, size * n, HEADER_CAP) < 0) {
        r->too_large = 1;
        return 0;
    }
    return size * n;
}

static void free_req(struct httpc_req *r)
{
    curl_easy_cleanup(r->e);
    curl_slist_free_all(r->hdrs);
    free(r->body);
    free(r->hb);
    free(r);
}

static const char *error_of(struct httpc_req *r, CURLcode rc)
{
    long os = 0;
    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT: return "timeout";
    case CURLE_COULDNT_CONNECT:
        curl_easy_getinfo(r->e, CURLINFO_OS_ERRNO, &os);
        return os == ECONNREFUSED   ? "connection refused"
               : os == ENETUNREACH  ? "network unreachable"
               : os == EHOSTUNREACH ? "host unreachable"
                                    : "couldn't connect";
    case CURLE_COULDNT_RESOLVE_HOST: return "couldn't resolve host";
    case CURLE_COULDNT_RESOLVE_PROXY: return "couldn't resolve proxy";
    case CURLE_PEER_FAILED_VERIFICATION: return "ssl certificate problem";
    case CURLE_SSL_CACERT_BADFILE: return "ssl ca file problem";
    case CURLE_SSL_CONNECT_ERROR: return "ssl connect error";
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE: return "closed";
    case CURLE_RECV_ERROR: return "receive failed";
    case CURLE_SEND_ERROR: return "send failed";
    case CURLE_FILESIZE_EXCEEDED: return "response too large";
    case CURLE_WRITE_ERROR:
        return r->too_large ? "response too large" : "write error";
    case CURLE_TOO_MANY_REDIRECTS: return "too many redirects";
    case CURLE_OUT_OF_MEMORY: return "out of memory";
    case CURLE_WEIRD_SERVER_REPLY: return "bad response";
    case CURLE_UNSUPPORTED_PROTOCOL: return "unsupported protocol";
    default: break;
    }
    const char *s = curl_easy_strerror(rc);
    size_t i = 0;
    for (; s[i] && i < sizeof r->msg - 1; i++)
        r->msg[i] = (char)tolower((unsigned char)s[i]);
    r->msg[i] = '\0';
    return r->msg;
}

/* The header lines of the last block as name/value pairs (owned array;
 * names lower-cased in place, values trimmed). */
static struct httpc_header *parse_headers(struct httpc_req *r, size_t *nh)
{
    size_t k = 0, cap = 0;
    struct httpc_header *h = NULL;
    char *p = r->hb, *end = r->hb + r->hlen;
    *nh = 0;
    while (p && p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *eol = nl ? nl : end, *next = nl ? nl + 1 : end;
        char *line = p;
        p = next;
        while (eol > line && (eol[-1] == '\r' || eol[-1] == '\n'))
            eol--;
        char *colon = memchr(line, ':', (size_t)(eol - line));
        if (!colon || colon == line || memcmp(line, "HTTP/", 5) == 0)
            continue; /* the status line, the blank line, junk */
        char *v = colon + 1;
        while (v < eol && (*v == ' ' || *v == '\t'))
            v++;
        char *ve = eol;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
            ve--;
        if (k == cap) {
            cap = cap ? cap * 2 : 16;
            struct httpc_header *q = realloc(h, cap * sizeof *h);
            if (!q)
                break;
            h = q;
        }
        for (char *c = line; c < colon; c++)
            *c = (char)tolower((unsigned char)*c);
        h[k++] = (struct httpc_header){line, v, (size_t)(colon - line),
                                       (size_t)(ve - v)};
    }
    *nh = k;
    return h;
}

static void finish(struct httpc_req *r, CURLcode rc)
{
    struct httpc_resp res = {NULL, 0, NULL, 0, NULL, 0};
    struct httpc_header *h = NULL;
    if (rc != CURLE_OK) {
        res.err = error_of(r, rc);
    } else {
        curl_easy_getinfo(r->e, CURLINFO_RESPONSE_CODE, &res.status);
        h = parse_headers(r, &res.nh);
        res.h = h;
        res.body = r->body ? r->body : "";
        res.len = r->blen;
    }
    httpc_cb cb = r->cb;
    r->cb = NULL;
    curl_multi_remove_handle(M.m, r->e);
    if (cb)
        cb(r->ud, &res);
    free(h);
    free_req(r);
}

/* Completed transfers: each one's callback, then its handle freed. */
static void drain(void)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(M.m, &left))) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURLcode rc = msg->data.result;
        struct httpc_req *r = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        if (r)
            finish(r, rc);
    }
}

const char *httpc_check_url(const char *url)
{
    if (lib_init() < 0)
        return "http: library init failed";
    CURLU *u = curl_url();
    if (!u)
        return "out of memory";
    char *scheme = NULL;
    const char *why = NULL;
    if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK)
        why = "bad url";
    else if (strcasecmp(scheme, "http") != 0 &&
             strcasecmp(scheme, "https") != 0)
        why = "url must be http:// or https://";
    curl_free(scheme);
    curl_url_cleanup(u);
    return why;
}

static int has_header(const struct httpc_opts *o, const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 0; i < o->nheaders; i++)
        if (strncasecmp(o->headers[i], name, n) == 0 &&
            o->headers[i][n] == ':')
            return 1;
    return 0;
}

static int add_header(struct httpc_req *r, const char *line)
{
    struct curl_slist *l = curl_slist_append(r->hdrs, line);
    if (!l)
        return -1;
    r->hdrs = l;
    return 0;
}

/* The request's options on r->e; -1 when out of memory. */
static int configure(struct httpc_req *r, const struct httpc_opts *o)
{
    CURL *e = r->e;
    long ms = (long)ceil(o->timeout * 1000);
    if (ms < 1)
        ms = 1;
    curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)r);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, ms);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, ms);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "luamilter");
    /* proxies only when the script names one: http_proxy and friends in
     * the daemon's environment are ignored */
    curl_easy_setopt(e, CURLOPT_PROXY, o->proxy ? o->proxy : "");
    curl_easy_setopt(e, CURLOPT_NOPROXY, o->proxy ? "" : "*");
    if (o->cafile)
        curl_easy_setopt(e, CURLOPT_CAINFO, o->cafile);
    if (!o->verify) {
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
    }
    if (o->follow > 0) {
        curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
        curl_easy_setopt(e, CURLOPT_MAXREDIRS, o->follow);
    }
    if (o->max_body > 0) /* 0 would mean no limit to libcurl */
        curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE,
                         (curl_off_t)o->max_body);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    if (curl_easy_setopt(e, CURLOPT_URL, o->url) != CURLE_OK)
        return -1;

    int head = strcmp(o->method, "HEAD") == 0;
    if (o->body || strcmp(o->method, "POST") == 0) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE,
                         (curl_off_t)(o->body ? o->body_len : 0));
        if (curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS,
                             o->body ? o->body : "") != CURLE_OK)
            return -1;
        if (!has_header(o, "Content-Type") &&
            add_header(r, "Content-Type: application/octet-stream") < 0)
            return -1;
    }
    if (head)
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    else if (strcmp(o->method, o->body ? "POST" : "GET") != 0 &&
             curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, o->method) !=
                 CURLE_OK)
        return -1;
    for (size_t i = 0; i < o->nheaders; i++)
        if (add_header(r, o->headers[i]) < 0)
            return -1;
    /* no "Expect: 100-continue" round trip before a large body */
    if (!has_header(o, "Expect") && add_header(r, "Expect:") < 0)
        return -1;
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->hdrs);
    return 0;
}

struct httpc_req *httpc_request(const struct httpc_opts *o, httpc_cb cb,
                                void *ud, const char **err)
{
    *err = multi();
    if (*err)
        return NULL;
    struct httpc_req *r = calloc(1, sizeof *r);
    if (!r || !(r->e = curl_easy_init())) {
        free(r);
        *err = "out of memory";
        return NULL;
    }
    r->cb = cb;
    r->ud = ud;
    r->max_body = o->max_body;
    if (configure(r, o) < 0) {
        free_req(r);
        *err = "out of memory";
        return NULL;
    }
    /* libcurl only arms the timer here: the transfer starts from the loop,
     * so cb cannot run inside this call */
    if (curl_multi_add_handle(M.m, r->e) != CURLM_OK) {
        free_req(r);
        *err = "http: cannot start the request";
        return NULL;
    }
    return r;
}

void httpc_cancel(struct httpc_req *r)
{
    if (!r)
        return;
    r->cb = NULL;
    curl_multi_remove_handle(M.m, r->e);
    free_req(r);
}
