/*
 * metrics_http: the supervisor's HTTP endpoint for --metrics, served by
 * libmicrohttpd on the supervisor's libev loop (MHD's epoll fd under one
 * ev_io, its timeout in one ev_timer; no thread, no parser of our own):
 * GET /metrics (the Prometheus text), GET /health (200 or 503). Part of
 * the glue (libev); no Lua.
 */
#ifndef LUAMILTER_METRICS_HTTP_H
#define LUAMILTER_METRICS_HTTP_H

#include <ev.h>
#include <stddef.h>

/* What the endpoint asks its owner, on every request. */
struct metrics_http_ops {
    /* The /metrics body: 0 with *out owned (malloc'd), or -1. */
    int (*render)(char **out, size_t *len);
    /* 1 when healthy; else 0 with a one-line reason in why. */
    int (*healthy)(char *why, size_t n);
};

/*
 * Binds spec (inet:PORT@HOST, inet:HOST:PORT, unix:/path... as -l has
 * them), before privileges are dropped. 0, or -1 with a reason in err.
 */
int metrics_http_bind(const char *spec, char *err, size_t errlen);
/* Serves what metrics_http_bind bound on loop. 0, or -1 with err. */
int metrics_http_start(struct ev_loop *loop, const struct metrics_http_ops *ops,
                       char *err, size_t errlen);
/* In a freshly forked child: lets go of the endpoint's descriptors and
 * watchers without touching the supervisor's (shared) socket. */
void metrics_http_forget(struct ev_loop *loop);
/* The supervisor is done: stops serving, removes a unix socket file. */
void metrics_http_stop(struct ev_loop *loop);

#endif
