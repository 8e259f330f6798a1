/*
 * lb: the Lua bridge. Loads a script into its own LuaJIT state, keeps the
 * handler references, runs a handler for a session event in the
 * connection's coroutine and turns what it returns into a struct verdict.
 *
 * C calls Lua only through lb_call(). A handler error or a bad verdict is
 * logged here, once, with file:line and a traceback; the caller only learns
 * that the verdict is unusable. Knows nothing of libev or sockets.
 */
#ifndef LUAMILTER_LB_H
#define LUAMILTER_LB_H

#include <stddef.h>
#include <stdint.h>

#include "sess.h"

struct lua_State;
struct lb_state; /* one loaded script; refcounted */

/* What a suspended handler waits on (lwait.c and the lookup bindings). */
struct lb_wait {
    void *op;                 /* the engine's operation, while active */
    void (*cancel)(void *op); /* stops it: its callback never runs */
    int nres;                 /* results its completion pushed onto co */
    int flags, mx;            /* the binding's notes about the operation */
    int kind;                 /* enum metrics_kind, for --metrics */
    double since;             /* when it began (msglog_clock) */
    size_t count;
    unsigned active : 1;      /* op is pending */
};

/* Per-connection Lua data, embedded in the connection. */
struct lb_conn {
    struct lb_state *st;   /* holds a reference */
    struct lua_State *co;  /* the connection's coroutine, or NULL */
    int co_ref;            /* registry anchor of co */
    int ctx_ref;           /* registry anchor of the ctx userdata */
    struct lctx *ctx;      /* its C block; detached when the session ends */
    /* The handler call in progress, which may be suspended on a lookup. */
    int ev;                /* its event */
    double started, deadline; /* lb_now() at its start, and its budget */
    int suspended;         /* yielded on a lookup, not yet resumed */
    /* A batch of held headers (lb_call_headers): its session and range,
     * and how many of its handlers have started; held_s is NULL outside. */
    struct sess *held_s;
    uint32_t held_first, held_n, held_i;
    struct lb_wait wait;
    struct lsock *socks;   /* sockets it opened: closed when it ends */
    /* Set by the glue: resume me (lb_resume) from the loop, soon. */
    void (*wake)(void *ud);
    void *wake_ud;
};

enum { LB_WAIT = 1 }; /* lb_call/lb_resume: the handler waits (SESS_CALL_WAIT) */

/*
 * Loads and checks a script: syntax, top-level errors, the returned table
 * and its handler keys. math.random is seeded first (pid, time, a counter),
 * and the top level runs under the handlers' --script-timeout. Returns an
 * owned state (refcount 1), or NULL with "file:line: message" (the whole
 * message, without a traceback).
 */
struct lb_state *lb_load(const char *path, char *err, size_t errlen);
/* The same from bytes already read (path names the chunk in messages). */
struct lb_state *lb_load_buffer(const char *path, const char *src, size_t len,
                                char *err, size_t errlen);
/* Reads a whole file; returns owned bytes, or NULL with a reason in err. */
char *lb_read_file(const char *path, size_t *len, char *err, size_t errlen);
void lb_state_hold(struct lb_state *st);
/* Drops a reference; the Lua state is closed with the last one. */
void lb_state_release(struct lb_state *st);
/* SE_BIT()s of the handlers the script defines. */
unsigned lb_handlers(const struct lb_state *st);

/* Binds a connection to st (takes a reference). */
void lb_conn_init(struct lb_conn *lc, struct lb_state *st);
/* Detaches the ctx and releases the coroutine and the state reference. */
void lb_conn_free(struct lb_conn *lc);

/*
 * Runs the handler of ev with the arguments from cmd, reading session data
 * from s; fills *v (borrowing strings from the Lua state until the next
 * call). Returns 0, -1 after logging a handler error or a bad verdict, or
 * LB_WAIT when the handler waits on a lookup: lc->wake is called once the
 * answer is there, and lb_resume() then runs it on. After SE_CLOSE the ctx
 * is detached: using it raises an error.
 */
int lb_call(struct lb_conn *lc, struct sess *s, int ev,
            const struct wire_cmd *cmd, struct verdict *v);
/*
 * Runs the header handler for the n held headers s->hdrs[first..] in one
 * resume, in order, until one returns a verdict that is not continue
 * (sess.h, ops.headers): that verdict fills *v, and s->hdrs_run - 1 is
 * its header. Each handler has a --script-timeout of its own, and ends
 * like a call of its own (its sockets closed). Returns as lb_call does.
 */
int lb_call_headers(struct lb_conn *lc, struct sess *s, uint32_t first,
                    uint32_t n, struct verdict *v);
/* Runs a handler on after lc->wake; returns as lb_call does. */
int lb_resume(struct lb_conn *lc, struct sess *s, struct verdict *v);
/*
 * The MTA gave up on the waiting handler: its lookup is cancelled, its
 * sockets closed, its coroutine dropped, never resumed.
 */
void lb_abandon(struct lb_conn *lc);

/*
 * Limits for every handler call from now on: wall-clock seconds (checked by
 * a count hook, which LuaJIT runs only in interpreted code) and bytes per
 * Lua state (allocation beyond fails with "not enough memory").
 */
void lb_set_limits(double script_timeout, size_t max_memory);
/* Monotonic start of the handler call (or script top level) in progress,
 * 0 when none (read by the watchdog in a signal handler). */
extern volatile double lb_busy_since;
/* Nonzero from the moment the running call was refused memory at
 * --script-memory until that call ends (for a crash report). */
extern volatile int lb_refused_memory;
/* A coarse monotonic clock in seconds (no system call). */
double lb_now(void);

/*
 * --set NAME=VALUE: milter.settings.NAME = "VALUE" in every script loaded
 * from now on (borrows spec, which must live as long; a later NAME wins).
 * --preload FILE: reads FILE now; every script loaded from now on runs it
 * first, in its own state. Both return 0, or -1 with a reason in err.
 */
int lb_add_setting(const char *spec, char *err, size_t errlen);
int lb_set_preload(const char *path, char *err, size_t errlen);

/*
 * Where the handler of ev is defined ("policy.lua:12"), for the message
 * log line; "" when the script has no such handler. Borrowed, valid as
 * long as lc's state; made once per state. (The line it returned at is
 * gone once it returned: `return milter.reject{}` is a tail call.)
 */
const char *lb_handler_site(struct lb_conn *lc, int ev);

/* Parses "tempfail", "accept", "continue", "reject" into VA_*; -1 if bad. */
int lb_parse_action(const char *name);

#endif
