/* metrics_http: see metrics_http.h. */
#define _GNU_SOURCE
#include "metrics_http.h"

#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "listen.h"
#include "log.h"

static struct listener bound = {.io = {.fd = -1}}; /* the socket, its path */
static int listen_fd = -1;
static struct MHD_Daemon *mhd;
static const struct metrics_http_ops *ops;
static ev_io io;       /* MHD's epoll fd */
static ev_timer timer; /* MHD's next timeout */

int metrics_http_bind(const char *spec, char *err, size_t errlen)
{
    memset(&bound, 0, sizeof bound);
    listen_fd = listen_bind(&bound, spec, 0660, err, errlen);
    return listen_fd < 0 ? -1 : 0;
}

static enum MHD_Result reply(struct MHD_Connection *con, unsigned status,
                             const char *type, char *body, size_t len,
                             int owned)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(
        len, body, owned ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_MUST_COPY);
    if (!r) {
        if (owned)
            free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    enum MHD_Result rc = MHD_queue_response(con, status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *con,
                                  const char *url, const char *method,
                                  const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    (void)cls;
    (void)version;
    (void)upload;
    (void)con_cls;
    static const char text[] = "text/plain; charset=utf-8";
    if (*upload_size) { /* a body we do not want: drop it */
        *upload_size = 0;
        return MHD_YES;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        char m[] = "only GET and HEAD\n";
        return reply(con, MHD_HTTP_METHOD_NOT_ALLOWED, text, m, strlen(m), 0);
    }
    if (strcmp(url, "/metrics") == 0) {
        char *body;
        size_t len;
        if (ops->render(&body, &len) < 0) {
            char m[] = "out of memory\n";
            return reply(con, MHD_HTTP_INTERNAL_SERVER_ERROR, text, m,
                         strlen(m), 0);
        }
        return reply(con, MHD_HTTP_OK, "text/plain; version=0.0.4; "
                     "charset=utf-8", body, len, 1);
    }
    if (strcmp(url, "/health") == 0) {
        char why[256] = "", m[300];
        int ok = ops->healthy(why, sizeof why);
        snprintf(m, sizeof m, "%s\n", ok ? "ok" : why);
        return reply(con, ok ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE,
                     text, m, strlen(m), 0);
    }
    char m[] = "not found: try /metrics or /health\n";
    return reply(con, MHD_HTTP_NOT_FOUND, text, m, strlen(m), 0);
}

/* After MHD ran: its next deadline (0: more to do at once), or none. */
static void rearm(struct ev_loop *loop)
{
    MHD_UNSIGNED_LONG_LONG ms;
    ev_timer_stop(loop, &timer);
    if (MHD_get_timeout(mhd, &ms) == MHD_YES) {
        ev_timer_set(&timer, (double)ms / 1000.0, 0);
        ev_timer_start(loop, &timer);
    }
}

static void on_ready(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)w;
    (void)revents;
    MHD_run(mhd);
    rearm(loop);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)w;
    (void)revents;
    MHD_run(mhd);
    rearm(loop);
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && msg[n - 1] == '\n')
        msg[--n] = '\0';
    log_msg(LL_WARN, 0, NULL, "metrics HTTP: %s", msg);
}

int metrics_http_start(struct ev_loop *loop, const struct metrics_http_ops *o,
                       char *err, size_t errlen)
{
    ops = o;
    /* No thread of MHD's own and its epoll set under our loop: every
     * callback runs on the supervisor's thread, between our others. */
    mhd = MHD_start_daemon(MHD_USE_EPOLL | MHD_USE_ERROR_LOG, 0, NULL, NULL,
                           on_request, NULL, MHD_OPTION_EXTERNAL_LOGGER,
                           mhd_log, NULL, MHD_OPTION_LISTEN_SOCKET, listen_fd,
                           MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,
                           MHD_OPTION_CONNECTION_LIMIT, (unsigned)64,
                           MHD_OPTION_END);
    const union MHD_DaemonInfo *info =
        mhd ? MHD_get_daemon_info(mhd, MHD_DAEMON_INFO_EPOLL_FD) : NULL;
    if (!info) {
        snprintf(err, errlen, "--metrics: cannot start the HTTP server");
        if (mhd)
            MHD_stop_daemon(mhd);
        mhd = NULL;
        return -1;
    }
    ev_io_init(&io, on_ready, info->epoll_fd, EV_READ);
    ev_io_start(loop, &io);
    ev_init(&timer, on_timer);
    rearm(loop);
    return 0;
}

void metrics_http_forget(struct ev_loop *loop)
{
    if (!mhd)
        return;
    ev_io_stop(loop, &io);
    ev_timer_stop(loop, &timer);
    close(io.fd);   /* our copy of MHD's epoll set */
    close(listen_fd); /* and of the socket: the supervisor keeps it */
    mhd = NULL;     /* never stopped here: that would shut the socket */
    bound.path[0] = '\0';
}

void metrics_http_stop(struct ev_loop *loop)
{
    if (mhd) {
        ev_io_stop(loop, &io);
        ev_timer_stop(loop, &timer);
        MHD_stop_daemon(mhd);
        mhd = NULL;
    } else if (listen_fd >= 0) {
        close(listen_fd);
    }
    listen_fd = -1;
    if (bound.path[0])
        unlink(bound.path);
    bound.path[0] = '\0';
}
