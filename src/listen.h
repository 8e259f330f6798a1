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
    struct server *srv;  /* borrowed */
    void (*before_accept)(void); /* e.g. apply a pending reload first */
    int is_tcp;
    char path[108];      /* unix socket path, removed at exit; "" for TCP */
};

/*
 * Binds spec and starts listening (mode: permissions of a unix socket).
 * Returns 0, or -1 with a one-line reason in err.
 */
int listen_open(struct listener *l, struct server *srv, const char *spec,
                unsigned mode, char *err, size_t errlen);
/* Starts / stops accepting. */
void listen_start(struct listener *l);
void listen_stop(struct listener *l);
/* Closes the socket and removes a unix socket file. */
void listen_close(struct listener *l);

#endif
