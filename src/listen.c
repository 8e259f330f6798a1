/* listen: see listen.h. */
#define _GNU_SOURCE
#include "listen.h"

#include <errno.h>
#include <netdb.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"

#define BACKLOG 1024
/* descriptors a worker needs besides its connections: stdio, the listener,
 * the loop, the supervisor channel, syslog, lookups, files a script opens */
#define SPARE_FDS 32
#define PAUSE_MIN 0.1
#define PAUSE_MAX 1.0
#define WARN_EVERY 10.0

/* Replaces a unix socket file nobody listens on; refuses anything else. */
static int clear_stale(const struct sockaddr_un *sa, char *err, size_t errlen)
{
    struct stat st;
    if (lstat(sa->sun_path, &st) < 0)
        return 0;
    if (!S_ISSOCK(st.st_mode)) {
        snprintf(err, errlen, "%s exists and is not a socket", sa->sun_path);
        return -1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, (const struct sockaddr *)sa, sizeof *sa) == 0) {
        close(fd);
        snprintf(err, errlen, "%s: another process is listening there",
                 sa->sun_path);
        return -1;
    }
    if (fd >= 0)
        close(fd);
    if (unlink(sa->sun_path) < 0) {
        snprintf(err, errlen, "cannot remove stale %s: %s", sa->sun_path,
                 strerror(errno));
        return -1;
    }
    return 0;
}

static int open_unix(struct listener *l, const char *path, unsigned mode,
                     char *err, size_t errlen)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (!*path || strlen(path) >= sizeof sa.sun_path) {
        snprintf(err, errlen, "unix socket path is empty or too long");
        return -1;
    }
    strcpy(sa.sun_path, path);
    if (clear_stale(&sa, err, errlen) < 0)
        return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        chmod(path, mode) < 0 || listen(fd, BACKLOG) < 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    snprintf(l->path, sizeof l->path, "%s", path);
    return fd;
}

/* Splits "PORT@HOST", "HOST:PORT", "[ADDR]:PORT" or "PORT". */
static int split_inet(char *s, char **host, char **port)
{
    char *at = strchr(s, '@');
    if (at) {
        *at = '\0';
        *port = s;
        *host = at + 1;
    } else if (*s == '[') {
        char *close = strchr(s, ']');
        if (!close || close[1] != ':')
            return -1;
        *close = '\0';
        *host = s + 1;
        *port = close + 2;
        return **port ? 0 : -1;
    } else {
        char *colon = strrchr(s, ':');
        if (colon) {
            *colon = '\0';
            *host = s;
            *port = colon + 1;
        } else {
            *host = NULL;
            *port = s;
        }
    }
    if (*host) { /* libmilter allows inet:PORT@[1.2.3.4] */
        size_t n = strlen(*host);
        if (n >= 2 && (*host)[0] == '[' && (*host)[n - 1] == ']') {
            (*host)[n - 1] = '\0';
            (*host)++;
        }
        if (!**host)
            *host = NULL;
    }
    return **port ? 0 : -1;
}

/*
 * inet6: is IPv6 only. inet: is IPv4 as libmilter has it, but a host that
 * is an IPv6 literal or a name with only IPv6 addresses binds IPv6 (the
 * "inet:[::1]:PORT" Postfix spelling); with no host it binds every IPv4
 * interface (0.0.0.0).
 */
static int open_inet(const char *rest, int inet6, char *err, size_t errlen)
{
    char buf[300];
    char *host, *port;
    snprintf(buf, sizeof buf, "%s", rest);
    if (split_inet(buf, &host, &port) < 0) {
        snprintf(err, errlen, "cannot parse address '%s'", rest);
        return -1;
    }
    int family = inet6 ? AF_INET6 : host ? AF_UNSPEC : AF_INET;
    struct addrinfo hints = {.ai_family = family,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE}, *res;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc) {
        snprintf(err, errlen, "%s: %s", rest, gai_strerror(rc));
        return -1;
    }
    const struct addrinfo *ai = res; /* an IPv4 address first, as before */
    for (const struct addrinfo *a = res; a; a = a->ai_next)
        if (a->ai_family == AF_INET) {
            ai = a;
            break;
        }
    int fd = socket(ai->ai_family,
                    ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 ||
        listen(fd, BACKLOG) < 0) {
        snprintf(err, errlen, "%s: %s", rest, strerror(errno));
        if (fd >= 0)
            close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

/*
 * Makes room for max_conns connections: raises the soft descriptor limit
 * (never above the hard one) and warns when that is still too low, since
 * accept would then fail long before --max-connections is reached.
 */
static void fit_nofile(unsigned max_conns)
{
    struct rlimit rl;
    rlim_t need = (rlim_t)max_conns + SPARE_FDS;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= need)
        return;
    struct rlimit want = rl;
    want.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= need
                        ? need
                        : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &want) == 0)
        rl = want;
    if (rl.rlim_cur >= need)
        return;
    log_msg(LL_WARN, 0, NULL,
            "--max-connections %u needs about %llu file descriptors per "
            "worker, but RLIMIT_NOFILE allows %llu (hard limit %llu): "
            "connections beyond about %llu wait until others close; raise "
            "ulimit -n (LimitNOFILE= under systemd) or lower "
            "--max-connections",
            max_conns, (unsigned long long)need,
            (unsigned long long)rl.rlim_cur,
            (unsigned long long)rl.rlim_max,
            rl.rlim_cur > SPARE_FDS
                ? (unsigned long long)(rl.rlim_cur - SPARE_FDS)
                : 0ULL);
}

static void on_resume(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct listener *l =
        (struct listener *)((char *)w - offsetof(struct listener, pause));
    ev_io_start(loop, &l->io);
}

/*
 * accept failed with err, which the next attempt would hit again at once
 * (no descriptors, no memory): stop the listener for a while rather than
 * spin, and log that rarely. The connections wait in the backlog.
 */
static void back_off(struct listener *l, int err)
{
    struct ev_loop *loop = l->srv->loop;
    ev_tstamp now = ev_now(loop);
    l->refused++;
    if (!l->warned_at || now - l->warned_at >= WARN_EVERY) {
        log_msg(LL_WARN, 0, NULL,
                "accept: %s: not accepting for up to %gs at a time (%lu "
                "attempt(s) refused since the last such line, logged at "
                "most every %gs)",
                strerror(err), PAUSE_MAX, l->refused, WARN_EVERY);
        l->warned_at = now;
        l->refused = 0;
    }
    l->backoff = l->backoff ? l->backoff * 2 : PAUSE_MIN;
    if (l->backoff > PAUSE_MAX)
        l->backoff = PAUSE_MAX;
    ev_io_stop(loop, &l->io);
    ev_timer_stop(loop, &l->pause);
    ev_timer_set(&l->pause, l->backoff, 0);
    ev_timer_start(loop, &l->pause);
}

static void on_accept(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct listener *l = (struct listener *)w;
    if (l->before_accept)
        l->before_accept();
    for (int i = 0; i < 64; i++) { /* bounded: let connections run too */
        int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            l->backoff = 0;
            conn_new(l->srv, fd, l->is_tcp);
            continue;
        }
        switch (errno) {
        case EAGAIN:
#if EWOULDBLOCK != EAGAIN
        case EWOULDBLOCK:
#endif
            return;
        /* the pending connection failed on its own; try the next one */
        case EINTR:
        case ECONNABORTED:
        case EPROTO:
        case EPERM:
        case ENETDOWN:
        case ENOPROTOOPT:
        case EHOSTDOWN:
        case ENONET:
        case EHOSTUNREACH:
        case EOPNOTSUPP:
        case ENETUNREACH:
            continue;
        default: /* EMFILE, ENFILE, ENOBUFS, ENOMEM...: it would repeat */
            back_off(l, errno);
            return;
        }
    }
}

int listen_bind(struct listener *l, const char *spec, unsigned mode,
                char *err, size_t errlen)
{
    int fd;
    if (strncmp(spec, "unix:", 5) == 0)
        fd = open_unix(l, spec + 5, mode, err, errlen);
    else if (strncmp(spec, "local:", 6) == 0)
        fd = open_unix(l, spec + 6, mode, err, errlen);
    else if (spec[0] == '/')
        fd = open_unix(l, spec, mode, err, errlen);
    else if (strncmp(spec, "inet:", 5) == 0)
        fd = open_inet(spec + 5, 0, err, errlen);
    else if (strncmp(spec, "inet6:", 6) == 0)
        fd = open_inet(spec + 6, 1, err, errlen);
    else {
        snprintf(err, errlen,
                 "unknown listen spec '%s' (use unix:/path, local:/path, "
                 "/path, inet:PORT@HOST, inet:PORT, inet:HOST:PORT, "
                 "inet:[ADDR]:PORT or inet6:PORT@HOST)",
                 spec);
        return -1;
    }
    return fd;
}

int listen_open(struct listener *l, struct server *srv, const char *spec,
                unsigned mode, char *err, size_t errlen)
{
    memset(l, 0, sizeof *l);
    l->srv = srv;
    int fd = listen_bind(l, spec, mode, err, errlen);
    if (fd < 0)
        return -1;
    l->is_tcp = !l->path[0];
    ev_io_init(&l->io, on_accept, fd, EV_READ);
    ev_init(&l->pause, on_resume);
    fit_nofile(srv->max_conns);
    return 0;
}

void listen_start(struct listener *l) { ev_io_start(l->srv->loop, &l->io); }

void listen_stop(struct listener *l)
{
    ev_io_stop(l->srv->loop, &l->io);
    ev_timer_stop(l->srv->loop, &l->pause); /* no resume after a stop */
}

void listen_close(struct listener *l)
{
    listen_stop(l);
    if (l->io.fd >= 0)
        close(l->io.fd);
    l->io.fd = -1;
    if (l->path[0])
        unlink(l->path);
    l->path[0] = '\0';
}
