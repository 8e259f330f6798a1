/*
 * benchref: the reference responder of scripts/bench. A minimal milter
 * server in C with no scripting: the bar for how fast a milter can answer
 * on this machine. It answers every event exactly as luamilter answers for
 * scripts/bench_policy.lua: it negotiates the protocol flags it is given
 * (scripts/bench passes the ones luamilter's own OPTNEG reply carries),
 * replies 'c' to every event that was not negotiated reply-free, and at
 * BODYEOB sends ADDHEADER "X-Bench: rcpts=N headers=M[ bytes=B]" (the
 * value the bench policy computes) and ACCEPT.
 *
 * Single-threaded libev loop, one process, like luamilter: read up to
 * 64 KiB, handle every complete frame, queue the replies, write them at
 * once. Reads go to one shared buffer; a connection keeps only the bytes
 * of an incomplete frame.
 *
 * --fault makes it deliberately wrong, for the bench tool's own specs:
 *   reject-rcpt[:N]  answer 'r' to every Nth RCPT (default 3)
 *   drop-reply[:N]   do not answer every Nth RCPT
 *   no-header        do not add the header at BODYEOB
 */
#define _GNU_SOURCE
#include <errno.h>
#include <ev.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define P_NOBODY 0x000010u
#define P_NR_HDR 0x000080u
#define P_NR_CONN 0x001000u
#define P_NR_HELO 0x002000u
#define P_NR_MAIL 0x004000u
#define P_NR_RCPT 0x008000u
#define P_NR_DATA 0x010000u
#define P_NR_UNKN 0x020000u
#define P_NR_EOH 0x040000u
#define P_NR_BODY 0x080000u

#define READ_CHUNK (64 * 1024)
#define MAX_FRAME (2u << 20)

enum fault { F_NONE, F_REJECT_RCPT, F_DROP_REPLY, F_NO_HEADER };

static struct {
    const char *listen;
    uint32_t protocol, actions;
    int fault, fault_every;
    const char *header;
} O = {NULL, 0x3350, 0xff, F_NONE, 3, "X-Bench"};

static unsigned long rcpt_count; /* every RCPT seen, for the faults */
static char *unix_path;

struct rconn {
    ev_io io; /* first member: the callback casts back */
    int fd, quit;
    int release; /* ABORT seen: free rbuf once it is empty */
    uint32_t protocol, actions;
    int rcpts, headers;
    unsigned long bytes;
    char *rbuf, *wbuf;
    size_t rlen, rcap, wlen, woff, wcap;
};

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n);
    if (!p) {
        fputs("benchref: out of memory\n", stderr);
        exit(1);
    }
    return p;
}

static void put(struct rconn *c, const void *p, size_t n)
{
    if (c->wlen + n > c->wcap) {
        c->wcap = (c->wlen + n) * 2;
        c->wbuf = xrealloc(c->wbuf, c->wcap);
    }
    memcpy(c->wbuf + c->wlen, p, n);
    c->wlen += n;
}

static void put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           p[3];
}

static void reply(struct rconn *c, char r)
{
    unsigned char f[5] = {0, 0, 0, 1, (unsigned char)r};
    put(c, f, 5);
}

static void conn_free(struct ev_loop *loop, struct rconn *c)
{
    ev_io_stop(loop, &c->io);
    close(c->fd);
    free(c->rbuf);
    free(c->wbuf);
    free(c);
}

/* A string payload must hold its NUL terminators (as luamilter checks). */
static int strings_ok(const unsigned char *p, size_t n, int count)
{
    const unsigned char *end = p + n;
    for (int i = 0; i < count; i++) {
        const unsigned char *z = memchr(p, 0, (size_t)(end - p));
        if (!z)
            return 0;
        p = z + 1;
    }
    return 1;
}

static void eom(struct rconn *c)
{
    if (O.fault != F_NO_HEADER) {
        char v[96];
        int vn =
            snprintf(v, sizeof v, "rcpts=%d headers=%d", c->rcpts, c->headers);
        if (!(c->protocol & P_NOBODY))
            vn +=
                snprintf(v + vn, sizeof v - (size_t)vn, " bytes=%lu", c->bytes);
        size_t hn = strlen(O.header);
        unsigned char f[5];
        put_u32(f, (uint32_t)(1 + hn + 1 + (size_t)vn + 1));
        f[4] = 'h';
        put(c, f, 5);
        put(c, O.header, hn + 1);
        put(c, v, (size_t)vn + 1);
    }
    reply(c, 'a');
}

/* Handles one frame; returns -1 to close the connection. */
static int frame(struct rconn *c, int cmd, const unsigned char *p, size_t n)
{
    uint32_t nr = 0;
    switch (cmd) {
    case 'O': {
        if (n < 12)
            return -1;
        uint32_t v = get_u32(p);
        if (v < 2)
            return -1;
        c->actions = O.actions & get_u32(p + 4);
        c->protocol = O.protocol & get_u32(p + 8);
        unsigned char f[17];
        put_u32(f, 13);
        f[4] = 'O';
        put_u32(f + 5, v < 6 ? v : 6);
        put_u32(f + 9, c->actions);
        put_u32(f + 13, c->protocol);
        put(c, f, 17);
        return 0;
    }
    case 'D': return n >= 1 ? 0 : -1;
    case 'A':
        c->rcpts = c->headers = 0;
        c->bytes = 0;
        c->release = 1;
        return 0;
    case 'Q': c->quit = 1; return 0;
    case 'K': return 0;
    case 'E': eom(c); return 0;
    case 'C': nr = P_NR_CONN; break;
    case 'H': nr = P_NR_HELO; break;
    case 'M':
        if (!strings_ok(p, n, 1))
            return -1;
        c->rcpts = c->headers = 0;
        c->bytes = 0;
        nr = P_NR_MAIL;
        break;
    case 'R':
        if (!strings_ok(p, n, 1))
            return -1;
        nr = P_NR_RCPT;
        rcpt_count++;
        if (!(c->protocol & nr) && O.fault_every > 0 &&
            rcpt_count % (unsigned long)O.fault_every == 0) {
            if (O.fault == F_REJECT_RCPT) {
                reply(c, 'r');
                return 0;
            }
            if (O.fault == F_DROP_REPLY)
                return 0;
        }
        c->rcpts++;
        break;
    case 'T': nr = P_NR_DATA; break;
    case 'L':
        if (!strings_ok(p, n, 2))
            return -1;
        c->headers++;
        nr = P_NR_HDR;
        break;
    case 'N': nr = P_NR_EOH; break;
    case 'B':
        c->bytes += n;
        nr = P_NR_BODY;
        break;
    case 'U': nr = P_NR_UNKN; break;
    default: return -1;
    }
    if (!(c->protocol & nr))
        reply(c, 'c');
    return 0;
}

static int flush(struct ev_loop *loop, struct rconn *c)
{
    while (c->woff < c->wlen) {
        ssize_t k =
            send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (k > 0) {
            c->woff += (size_t)k;
            continue;
        }
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        return -1;
    }
    if (c->woff == c->wlen)
        c->woff = c->wlen = 0;
    int want = c->wlen ? EV_WRITE : EV_READ;
    if (want != (c->io.events & (EV_READ | EV_WRITE))) {
        ev_io_stop(loop, &c->io);
        ev_io_set(&c->io, c->fd, want);
        ev_io_start(loop, &c->io);
    }
    return 0;
}

/* Handles the complete frames in p[0..n); returns the bytes used or -1. */
static long frames(struct rconn *c, const unsigned char *p, size_t n)
{
    size_t pos = 0;
    while (!c->quit && n - pos >= 4) {
        uint32_t len = get_u32(p + pos);
        if (len == 0 || len > MAX_FRAME)
            return -1;
        if (n - pos < 4 + (size_t)len)
            break;
        if (frame(c, p[pos + 4], p + pos + 5, len - 1) < 0)
            return -1;
        pos += 4 + (size_t)len;
    }
    return (long)pos;
}

/*
 * Reads into a shared buffer while the connection has no buffer of its
 * own; the first incomplete frame gets it one (room for the whole frame),
 * which then takes the reads until the message ends (ABORT), so big BODY
 * frames are read in place. An idle connection holds no read buffer.
 */
static int on_read(struct rconn *c)
{
    static unsigned char shared[READ_CHUNK];
    if (!c->rbuf) {
        ssize_t k = read(c->fd, shared, sizeof shared);
        if (k < 0 && (errno == EAGAIN || errno == EINTR))
            return 0;
        if (k <= 0)
            return -1;
        long used = frames(c, shared, (size_t)k);
        if (used < 0)
            return -1;
        size_t left = (size_t)k - (size_t)used;
        if (left) {
            c->rcap = left + READ_CHUNK;
            if (left >= 4)
                c->rcap += get_u32(shared + used);
            c->rbuf = xrealloc(NULL, c->rcap);
            memcpy(c->rbuf, shared + used, left);
            c->rlen = left;
        }
        c->release = 0;
        return 0;
    }
    size_t want = READ_CHUNK;
    if (c->rlen >= 4) { /* room for the whole frame being read */
        size_t flen = 4 + (size_t)get_u32((unsigned char *)c->rbuf);
        if (flen > c->rlen && flen - c->rlen > want)
            want = flen - c->rlen;
    }
    if (c->rcap - c->rlen < want) {
        c->rcap = c->rlen + want;
        c->rbuf = xrealloc(c->rbuf, c->rcap);
    }
    ssize_t k = read(c->fd, c->rbuf + c->rlen, want);
    if (k < 0 && (errno == EAGAIN || errno == EINTR))
        return 0;
    if (k <= 0)
        return -1;
    c->rlen += (size_t)k;
    long used = frames(c, (unsigned char *)c->rbuf, c->rlen);
    if (used < 0)
        return -1;
    memmove(c->rbuf, c->rbuf + used, c->rlen - (size_t)used);
    c->rlen -= (size_t)used;
    if (c->rlen == 0 && c->release) { /* the message is over */
        free(c->rbuf);
        c->rbuf = NULL;
        c->rcap = 0;
    }
    c->release = 0;
    return 0;
}

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    struct rconn *c = (struct rconn *)w;
    if ((revents & EV_READ) && on_read(c) < 0) {
        conn_free(loop, c);
        return;
    }
    if (flush(loop, c) < 0 || (c->quit && !c->wlen))
        conn_free(loop, c);
}

static void on_accept(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    for (int i = 0; i < 64; i++) {
        int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        struct rconn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            return;
        }
        c->fd = fd;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        ev_io_init(&c->io, on_io, fd, EV_READ);
        ev_io_start(loop, &c->io);
    }
}

static void on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)w;
    (void)revents;
    ev_break(loop, EVBREAK_ALL);
}

static int open_listener(const char *spec)
{
    const char *path = NULL;
    if (strncmp(spec, "unix:", 5) == 0)
        path = spec + 5;
    else if (spec[0] == '/')
        path = spec;
    int fd;
    if (path) {
        struct sockaddr_un un = {.sun_family = AF_UNIX};
        if (strlen(path) >= sizeof un.sun_path)
            return -1;
        strcpy(un.sun_path, path);
        unlink(path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&un, sizeof un) < 0)
            return -1;
        unix_path = strdup(path);
    } else if (strncmp(spec, "inet:", 5) == 0) {
        char port[16], host[256] = "127.0.0.1";
        const char *at = strchr(spec + 5, '@');
        size_t pl = at ? (size_t)(at - spec - 5) : strlen(spec + 5);
        if (pl == 0 || pl >= sizeof port)
            return -1;
        memcpy(port, spec + 5, pl);
        port[pl] = 0;
        if (at)
            snprintf(host, sizeof host, "%s", at + 1);
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
        if (getaddrinfo(host, port, &hints, &ai) != 0)
            return -1;
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    0);
        int one = 1;
        if (fd >= 0)
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
            freeaddrinfo(ai);
            return -1;
        }
        freeaddrinfo(ai);
    } else {
        return -1;
    }
    return listen(fd, 1024) < 0 ? -1 : fd;
}

static void usage(void)
{
    fputs("usage: benchref -l unix:/path|inet:PORT@HOST [--protocol HEX] "
          "[--actions HEX]\n"
          "                [--header NAME] [--fault reject-rcpt[:N]|"
          "drop-reply[:N]|no-header]\n",
          stderr);
    exit(2);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        i++;
        if (!strcmp(a, "-l") || !strcmp(a, "--listen")) {
            O.listen = v;
        } else if (!strcmp(a, "--protocol")) {
            O.protocol = (uint32_t)strtoul(v, NULL, 0);
        } else if (!strcmp(a, "--actions")) {
            O.actions = (uint32_t)strtoul(v, NULL, 0);
        } else if (!strcmp(a, "--header")) {
            O.header = v;
        } else if (!strcmp(a, "--fault")) {
            const char *colon = strchr(v, ':');
            size_t k = colon ? (size_t)(colon - v) : strlen(v);
            if (colon)
                O.fault_every = atoi(colon + 1);
            if (k == 11 && !strncmp(v, "reject-rcpt", k))
                O.fault = F_REJECT_RCPT;
            else if (k == 10 && !strncmp(v, "drop-reply", k))
                O.fault = F_DROP_REPLY;
            else if (k == 9 && !strncmp(v, "no-header", k))
                O.fault = F_NO_HEADER;
            else if (k == 4 && !strncmp(v, "none", k))
                O.fault = F_NONE;
            else
                usage();
        } else {
            usage();
        }
    }
    if (!O.listen)
        usage();
    signal(SIGPIPE, SIG_IGN);
    int fd = open_listener(O.listen);
    if (fd < 0) {
        fprintf(stderr, "benchref: cannot listen on %s: %s\n", O.listen,
                strerror(errno));
        return 1;
    }
    struct ev_loop *loop = EV_DEFAULT;
    ev_io lw;
    ev_io_init(&lw, on_accept, fd, EV_READ);
    ev_io_start(loop, &lw);
    ev_signal sterm, sint;
    ev_signal_init(&sterm, on_signal, SIGTERM);
    ev_signal_start(loop, &sterm);
    ev_signal_init(&sint, on_signal, SIGINT);
    ev_signal_start(loop, &sint);
    ev_run(loop, 0);
    if (unix_path)
        unlink(unix_path);
    return 0;
}
