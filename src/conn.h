/*
 * conn: one MTA connection on the event loop: socket I/O, the idle timer,
 * the read and write buffers, and the glue that feeds decoded frames to the
 * session and runs handlers through the Lua bridge.
 *
 * Ownership: the server owns every conn (a list); only conn_free() frees
 * one, and it runs only after the callback that closed it has unwound.
 */
#ifndef LUAMILTER_CONN_H
#define LUAMILTER_CONN_H

#include <ev.h>
#include <stdint.h>

#include "buf.h"
#include "lb.h"
#include "msglog.h"
#include "sess.h"
#include "watchdog.h"

struct server;

struct conn {
    ev_io io;           /* first member: the callbacks cast back */
    ev_timer timer;     /* idle timeout, restarted with ev_timer_again */
    int fd;
    struct server *srv; /* borrowed */
    struct buf rbuf;    /* bytes read, not yet decoded */
    struct buf wbuf;    /* replies not yet written */
    struct sess sess;
    struct sess_cfg cfg; /* this connection's copy: reloads don't touch it */
    struct lb_conn lua;
    uint64_t id;
    unsigned gen;       /* script generation serving this connection */
    ev_tstamp started;
    ev_tstamp partial_since; /* when the pending partial frame began */
    ev_tstamp last_read;     /* the last read: the idle timer's reference */
    uint32_t msgs;      /* end-of-message packets seen, for the close line */
    struct conn *prev, *next;
    ev_timer resume;     /* a waiting handler's answer came: resume it */
    ev_timer progress;   /* while an eom handler waits: keep the MTA patient */
    double progress_mark; /* last progress packet, or when the MTA's wait
                           * was first seen; 0 once the eom reply is out */
    struct msglog mlog;  /* the open message's log line, in the making */
    double call_started; /* msglog_clock() at the handler call's start */
    double wait_since;   /* and when its current lookup wait began */
    /* A batch of held headers in progress (sess.h, ops.headers): its
     * first header, and how many of its handlers metrics has counted. */
    uint32_t held_first, held_counted;
    unsigned held_batch : 1;
    unsigned closing : 1;     /* close when wbuf is flushed */
    unsigned in_callback : 1; /* free after the callback unwinds */
    unsigned finishing : 1;   /* closed; abort/close handlers still wait */
};

/* Server-wide settings and state every connection reads. */
struct server {
    struct ev_loop *loop;
    struct lb_state *script;   /* current generation, owned */
    unsigned gen;
    struct sess_cfg cfg;       /* template for new connections */
    double idle_timeout;
    size_t max_frame;          /* largest inbound payload accepted */
    size_t max_wqueue;         /* replies queued before a new command is
                                  refused (--max-write-queue) */
    unsigned max_conns;
    unsigned nconns;
    uint64_t *next_id;         /* shared by the workers (MAP_SHARED) */
    struct conn *conns;        /* list of open connections */
    int stopping;              /* no new connections; exit when idle */
};

/* Takes ownership of fd (nonblocking) and starts serving it. */
void conn_new(struct server *srv, int fd, int is_tcp);
/* Ends a connection now: runs abort/close handlers, frees it. */
void conn_drop(struct conn *c, const char *why);

#endif
