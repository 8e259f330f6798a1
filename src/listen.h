/*
 * listen: parses a listen spec (libmilter and Postfix spellings), binds the
 * socket and accepts connections into conn_new(). No Lua.
 *
 *   unix:/path  local:/path  /path          a unix socket (stale file replaced)
 *   inet:PORT@HOST  inet:PORT  inet:HOST:PORT  inet:[ADDR]:PORT
 *   inet6:PORT@HOST  inet6:[ADDR]:PORT
 *
 * inet:PORT binds every IPv4 interface; an IPv6 host under inet: binds IPv6.
 */
#ifndef LUAMILTER_LISTEN_H
#define LUAMILTER_LISTEN_H

#include <ev.h>

#include "conn.h"

struct listener {
    ev_io io;
    ev_timer pause;      /* accept failed (EMFILE...): resume when it fires */
    struct server *srv;  /* borrowed */
    void (*before_accept)(void); /* e.g. apply a pending reload first */
    int is_tcp;
    double backoff;      /* current pause, doubled while accept keeps failing */
    double warned_at;    /* when accept failures were last logged */
    unsigned long refused; /* failed accepts since that line */
    char path[108];      /* unix socket path, removed at exit; "" for TCP */
};

/*
 * Binds spec and starts listening (mode: permissions of a unix socket).
 * Also makes room for srv->max_conns descriptors: raises the soft
 * RLIMIT_NOFILE up to the hard limit and warns when that is not enough.
 * Returns 0, or -1 with a one-line reason in err.
 */
int listen_open(struct listener *l, struct server *srv, const char *spec,
                unsigned mode, char *err, size_t errlen);
/*
 * Only binds spec and listens (non-blocking, close-on-exec): the socket's
 * fd, or -1 with a reason in err. A unix socket's path goes to l->path
 * (the rest of l is not touched); listen_close works on such an l too
 * once l->io.fd is set.
 */
int listen_bind(struct listener *l, const char *spec, unsigned mode,
                char *err, size_t errlen);
/*
 * Starts / stops accepting. When accept fails for want of resources (out
 * of descriptors or memory) the listener stops for a moment (0.1 s,
 * doubling to 1 s) instead of retrying at once, and logs at most one warn
 * line per 10 s with the number of refused attempts.
 */
void listen_start(struct listener *l);
void listen_stop(struct listener *l);
/* Closes the socket and removes a unix socket file. */
void listen_close(struct listener *l);

#endif
