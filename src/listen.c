/* listen: see listen.h. */
#define _GNU_SOURCE
#include "listen.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"

#define BACKLOG 1024

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

static void on_accept(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct listener *l = (struct listener *)w;
    if (l->before_accept)
        l->before_accept();
    for (int i = 0; i < 64; i++) { /* bounded: let connections run too */
        int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                errno != ECONNABORTED)
                log_msg(LL_WARN, 0, NULL, "accept: %s", strerror(errno));
            return;
        }
        conn_new(l->srv, fd, l->is_tcp);
    }
}

int listen_open(struct listener *l, struct server *srv, const char *spec,
                unsigned mode, char *err, size_t errlen)
{
    memset(l, 0, sizeof *l);
    l->srv = srv;
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
    if (fd < 0)
        return -1;
    l->is_tcp = !l->path[0];
    ev_io_init(&l->io, on_accept, fd, EV_READ);
    return 0;
}

void listen_start(struct listener *l) { ev_io_start(l->srv->loop, &l->io); }
void listen_stop(struct listener *l) { ev_io_stop(l->srv->loop, &l->io); }

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
