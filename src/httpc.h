/*
 * httpc: HTTP and HTTPS requests through libcurl's multi-socket API on the
 * process's event loop (aio.h), without Lua. libcurl speaks the protocol;
 * this file drives its sockets with ev_io (CURLMOPT_SOCKETFUNCTION) and its
 * timeouts with one ev_timer (CURLMOPT_TIMERFUNCTION), as curl's own
 * evhiperfifo.c example does. One multi handle per process, made on first
 * use (a forked worker makes its own). Must not depend on Lua.
 */
#ifndef LUAMILTER_HTTPC_H
#define LUAMILTER_HTTPC_H

#include <stddef.h>

/* A request; every pointer is borrowed for the httpc_request() call only
 * (the engine copies what it keeps). */
struct httpc_opts {
    const char *url;          /* http:// or https:// */
    const char *method;       /* "GET", "POST", "HEAD", any token */
    const char *const *headers; /* "Name: value" lines */
    size_t nheaders;
    const char *body;         /* NULL: none */
    size_t body_len;
    double timeout;           /* seconds for the whole exchange, > 0 */
    const char *cafile;       /* NULL: the system CA store */
    int verify;               /* 0: no certificate or host name check */
    long follow;              /* redirects followed at most (0: none) */
    size_t max_body;          /* response body bytes beyond: an error */
    const char *proxy;        /* NULL: none (environment ignored) */
};

/* One response header; name lower-cased. Borrowed for the callback. */
struct httpc_header {
    const char *name, *value;
    size_t nlen, vlen;
};

/* err NULL: a response came (any status). Else "timeout", "connection
 * refused", "response too large"... (valid for the callback's duration). */
struct httpc_resp {
    const char *err;
    long status;
    const struct httpc_header *h;
    size_t nh;
    const char *body;
    size_t len;
};

typedef void (*httpc_cb)(void *ud, const struct httpc_resp *r);
struct httpc_req;

/* NULL when url is an http(s) URL libcurl accepts, else why not (static). */
const char *httpc_check_url(const char *url);
/*
 * Starts the request. cb runs once, from the loop (never from inside this
 * call), unless httpc_cancel() comes first. Returns a handle owned by the
 * engine until then, or NULL with *err set when it cannot start.
 */
struct httpc_req *httpc_request(const struct httpc_opts *o, httpc_cb cb,
                                void *ud, const char **err);
/* cb will not run; the transfer and everything it holds are freed. */
void httpc_cancel(struct httpc_req *r);

#endif
