/* tcpc: see tcpc.h. */
#define _GNU_SOURCE
#include "tcpc.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "aio.h"
#include "buf.h"

/* Most a receive buffers: a peer cannot make us hold more. */
#define TCPC_MAX_BUF (64u << 20)

enum { OP_NONE, OP_CONNECT, OP_SEND, OP_RECV };

struct tcpc {
    ev_io io; /* first member: the callback casts back */
    int fd;
    int op, mode;
    size_t want;       /* TCPC_BYTES: how many */
    struct buf in;     /* received, not yet handed over */
    struct buf out;    /* to send */
    size_t handed;     /* bytes of in handed over by the last receive */
    int eof;
    struct tmr *deadline;
    tcpc_cb cb;
    void *ud;
    struct tmr *later; /* an operation done at once answers from the loop */
    const char *late_err;
};

static const char *errno_err(int e)
{
    switch (e) {
    case ECONNREFUSED: return "connection refused";
    case ECONNRESET: return "connection reset";
    case EPIPE: return "closed";
    case ETIMEDOUT: return "timeout";
    case ENETUNREACH:
    case EHOSTUNREACH: return "no route to host";
    case ENOENT: return "no such socket";
    case EACCES: return "permission denied";
    default: return "socket error";
    }
}

static void watch(struct tcpc *t, int events)
{
    ev_io_stop(aio_loop(), &t->io);
    if (events) {
        ev_io_set(&t->io, t->fd, events);
        ev_io_start(aio_loop(), &t->io);
    }
}

/* Ends the pending operation; hands data over for a receive. */
static void done(struct tcpc *t, const char *err)
{
    tcpc_cb cb = t->cb;
    void *ud = t->ud;
    int op = t->op;
    t->op = OP_NONE;
    t->cb = NULL;
    tmr_cancel(t->deadline);
    t->deadline = NULL;
    watch(t, 0);
    const char *data = NULL;
    size_t len = 0;
    if (op == OP_RECV) {
        data = (const char *)buf_head(&t->in);
        len = t->handed;
    }
    if (cb)
        cb(ud, err, data, len);
    if (op == OP_RECV) { /* a line's CR LF goes with it */
        buf_consume(&t->in, t->mode == TCPC_LINE && !err
                                ? t->handed + 1 +
                                      (t->handed < buf_len(&t->in) &&
                                       buf_head(&t->in)[t->handed] == '\r')
                                : t->handed);
    }
}

/* Whether the buffered bytes complete the receive (sets handed). */
static int recv_ready(struct tcpc *t)
{
    const char *p = (const char *)buf_head(&t->in);
    size_t n = buf_len(&t->in);
    switch (t->mode) {
    case TCPC_LINE: {
        const char *nl = memchr(p, '\n', n);
        if (!nl)
            return 0;
        size_t k = (size_t)(nl - p);
        t->handed = k && p[k - 1] == '\r' ? k - 1 : k;
        return 1;
    }
    case TCPC_BYTES:
        if (n < t->want)
            return 0;
        t->handed = t->want;
        return 1;
    default:
        return 0; /* everything: only at EOF */
    }
}

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct tcpc *t = (struct tcpc *)w;
    if (t->op == OP_CONNECT) {
        int e = 0;
        socklen_t l = sizeof e;
        getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &e, &l);
        done(t, e ? errno_err(e) : NULL);
        return;
    }
    if (t->op == OP_SEND) {
        while (buf_len(&t->out)) {
            ssize_t k = send(t->fd, buf_head(&t->out), buf_len(&t->out),
                             MSG_NOSIGNAL);
            if (k > 0) {
                buf_consume(&t->out, (size_t)k);
                continue;
            }
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                return;
            done(t, errno_err(errno));
            return;
        }
        done(t, NULL);
        return;
    }
    if (t->op != OP_RECV)
        return;
    for (;;) {
        uint8_t *dst = buf_reserve(&t->in, 16384);
        if (!dst) {
            t->handed = buf_len(&t->in);
            done(t, "too much data");
            return;
        }
        ssize_t k = read(t->fd, dst, 16384);
        if (k > 0) {
            buf_commit(&t->in, (size_t)k);
            if (recv_ready(t)) {
                done(t, NULL);
                return;
            }
            continue;
        }
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        t->eof = 1;
        t->handed = buf_len(&t->in);
        done(t, k == 0 && t->mode == TCPC_ALL ? NULL
                : k == 0                       ? "closed"
                                               : errno_err(errno));
        return;
    }
}

static void timed_out(void *ud)
{
    struct tcpc *t = ud;
    t->deadline = NULL;
    t->handed = t->op == OP_RECV ? buf_len(&t->in) : 0;
    done(t, "timeout");
}

static void late(void *ud)
{
    struct tcpc *t = ud;
    t->later = NULL;
    done(t, t->late_err);
}

/* Arms the operation: from the loop always, even when already done. */
static int begin(struct tcpc *t, int op, double timeout, tcpc_cb cb,
                 void *ud, int events, int ready, const char *err)
{
    if (t->op != OP_NONE)
        return -1;
    t->op = op;
    t->cb = cb;
    t->ud = ud;
    if (ready || err) {
        t->late_err = err;
        t->later = tmr_start(0, late, t);
        return 0;
    }
    t->deadline = tmr_start(timeout, timed_out, t);
    watch(t, events);
    return 0;
}

struct tcpc *tcpc_connect(const char *host, int port, double timeout,
                          tcpc_cb cb, void *ud, const char **err)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    memset(&ss, 0, sizeof ss);
    if (strncmp(host, "unix:", 5) == 0) {
        struct sockaddr_un *su = (struct sockaddr_un *)&ss;
        if (strlen(host + 5) >= sizeof su->sun_path || !host[5]) {
            *err = "bad unix socket path";
            return NULL;
        }
        su->sun_family = AF_UNIX;
        strcpy(su->sun_path, host + 5);
        sl = sizeof *su;
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        if (port < 1 || port > 65535) {
            *err = "bad port";
            return NULL;
        }
        if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
            s4->sin_family = AF_INET;
            s4->sin_port = htons((uint16_t)port);
            sl = sizeof *s4;
        } else if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
            s6->sin6_family = AF_INET6;
            s6->sin6_port = htons((uint16_t)port);
            sl = sizeof *s6;
        } else {
            *err = "not a numeric address";
            return NULL;
        }
    }
    struct tcpc *t = calloc(1, sizeof *t);
    int fd = t ? socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK |
                                          SOCK_CLOEXEC, 0)
               : -1;
    if (fd < 0) {
        *err = t ? "no socket (out of file descriptors?)" : "out of memory";
        free(t);
        return NULL;
    }
    if (ss.ss_family != AF_UNIX) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    t->fd = fd;
    buf_init(&t->in, TCPC_MAX_BUF);
    buf_init(&t->out, 0);
    ev_io_init(&t->io, on_io, fd, EV_WRITE);
    int rc = connect(fd, (struct sockaddr *)&ss, sl);
    int now = rc == 0, fail = rc < 0 && errno != EINPROGRESS;
    begin(t, OP_CONNECT, timeout, cb, ud, EV_WRITE, now,
          fail ? errno_err(errno) : NULL);
    return t;
}

int tcpc_send(struct tcpc *t, const char *data, size_t len, double timeout,
              tcpc_cb cb, void *ud)
{
    if (t->op != OP_NONE)
        return -1;
    if (buf_append(&t->out, data, len) < 0)
        return begin(t, OP_SEND, timeout, cb, ud, 0, 0, "out of memory");
    return begin(t, OP_SEND, timeout, cb, ud, EV_WRITE, 0, NULL);
}

int tcpc_receive(struct tcpc *t, int mode, size_t n, double timeout,
                 tcpc_cb cb, void *ud)
{
    if (t->op != OP_NONE)
        return -1;
    t->mode = mode;
    t->want = n;
    t->handed = 0;
    int ready = recv_ready(t);
    const char *err = NULL;
    if (!ready && t->eof) {
        t->handed = buf_len(&t->in);
        if (mode == TCPC_ALL)
            ready = 1;
        else
            err = "closed";
    }
    return begin(t, OP_RECV, timeout, cb, ud, EV_READ, ready, err);
}

void tcpc_cancel(struct tcpc *t)
{
    if (!t || t->op == OP_NONE)
        return;
    t->cb = NULL;
    tmr_cancel(t->later);
    t->later = NULL;
    tmr_cancel(t->deadline);
    t->deadline = NULL;
    watch(t, 0);
    t->op = OP_NONE;
}

void tcpc_close(struct tcpc *t)
{
    if (!t)
        return;
    tcpc_cancel(t);
    close(t->fd);
    buf_free(&t->in);
    buf_free(&t->out);
    free(t);
}
