/*
 * lb_int: what the bridge's files (lb.c, lctx.c, lverdict.c) share.
 * Only these files include Lua headers.
 */
#ifndef LUAMILTER_LB_INT_H
#define LUAMILTER_LB_INT_H

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "lb.h"

#define LB_NAMES 128   /* header name slots */
#define LB_VKEYS 24    /* lverdict's interned keys (lverdict.c) */
#define LB_NAME_MAX 32 /* longest name kept */

#define LB_SPARE_CO 64 /* coroutines kept for new connections */

struct lb_state {
    lua_State *L;
    struct lb_conn *running; /* whose handler runs now, NULL otherwise */
    size_t mem;             /* bytes allocated by this state */
    size_t gc_at;           /* mem that has alloc() ask for a collection */
    int gc_forced;          /* it did: LuaJIT's step multiplier is 0 */
    int gc_stepmul;         /* the multiplier to restore after the call */
    lua_Alloc base_alloc;   /* LuaJIT's allocator, which alloc() wraps */
    void *base_ud;
    double deadline;        /* of the running handler call */
    int in_call;            /* a handler runs: the memory cap binds */
    int overdue;            /* past the deadline: the hook runs every
                               instruction until the call ends */
    int loading;            /* the top level runs (for the hook's message) */
    int refs;
    int handler[SE__COUNT]; /* registry refs, LUA_NOREF when undefined */
    /* arguments each handler can see after ctx: its declared parameters
     * (LB_ALL_ARGS when it takes `...` or is a C function); those it
     * cannot see are not made (a table of ESMTP args, a string) */
    unsigned char nargs[SE__COUNT];
    unsigned handlers;      /* SE_BIT()s */
    struct mod *mods;       /* verdict scratch, reused by every call */
    int reader_ref;         /* lverdict's reader function, 0 until made */
    /* lverdict's keys and action names as the state's (interned) strings,
     * made with the reader: a key from a verdict table is one of them
     * when its pointer is */
    int vkey_ref[LB_VKEYS];
    const char *vkey[LB_VKEYS];
    int held_ref;           /* lheld's batch runner, 0 until made */
    size_t mods_cap;
    char sites[SE__COUNT][160]; /* lb_handler_site's answers, once made */
    unsigned sites_made;        /* SE_BIT()s of those */
    /* header names handed to handlers, kept as Lua strings: the same
     * names come with every message. Slot i's string is [i + 1] of the
     * table names_ref (0 until made), its bytes here once kept. */
    struct lb_name {
        uint8_t len, kept;
        char p[LB_NAME_MAX];
    } names[LB_NAMES];
    int names_ref;
    /* coroutines of connections that ended with their last call over
     * (registry refs), for the next connections: a lua_newthread, its
     * registry ref and its collection cost about 1,330 instructions a
     * connection */
    int spare_co[LB_SPARE_CO];
    int nspare_co;
};

/* The C block of a ctx userdata; s is NULL once the session is over. */
struct lctx {
    struct sess *s;
    uint32_t conn_seq;  /* milter session (QUIT_NC starts a new one) */
    uint32_t msg_seq;   /* message the cached tables belong to */
    uint32_t nrcpts, nhdrs; /* entries already in the cached tables */
    uint32_t rcpts_dropped; /* sess->rcpts_dropped when rcpts was built */
    int has_env;        /* the userdata's environment holds the views */
    int msg_key;        /* registry ref of the string "msg" (lctx_sync) */
};

/* Standard functions as they were before the script ran (a script may
 * remove or replace the globals): pushes LB_TOSTRING, LB_SORT... */
enum {
    LB_TOSTRING = 1,
    LB_SORT,
    LB_TYPE,
    LB_RAWGET,
    LB_NEXT,
    LB_FFI,
    LB_GETINFO,
    LB_RAWSET
};
#define LB_ALL_ARGS 255
void lb_push_std(lua_State *L, int which);

/* A CONNECT family ('4', '6', 'L', 'U') as the API names it: "inet"... */
const char *lb_family_name(char f);

/* lb.c, for lheld.c: the coroutine and ctx made ready for a call; a
 * call run until it returns, fails or waits (nargs values on co); a
 * header name pushed from the names' cache; --script-timeout. */
int lb_prepare(struct lb_conn *lc, struct sess *s);
int lb_run_slice(struct lb_conn *lc, struct sess *s, int nargs,
                 struct verdict *v);
void lb_push_name(struct lb_state *st, lua_State *co, const char *p,
                  size_t n);
/* The name cache of lb_push_name, for lheld's runner, which fills it from
 * compiled code. lb_name_slot: k > 0, [k] of the table is this name; k <
 * 0, make the string, put it at [-k], then lb_name_kept(-k) (a slot counts
 * only once its string is in, so a caller stopped between the two leaves
 * one that is filled again, never another name's string); 0, a name too
 * long to keep. lb_push_names pushes the table onto co. */
int lb_name_slot(struct lb_state *st, const char *p, size_t n);
void lb_name_kept(struct lb_state *st, int k);
void lb_push_names(struct lb_state *st, lua_State *co);
double lb_script_timeout(void);
/* The connection whose handler runs now (st->running of its state). */
extern struct lb_conn *lb_running;

/* lheld.c: drops the batch runner's own frame from the traceback on top
 * of L (it is the bottom one on a coroutine that ran a batch). */
void lheld_trim(lua_State *L);
/* msg without the position error() gave it in the runner's frame
 * (`error(msg, 2)` in a handler, or a constructor's misuse in a tail
 * call), which is no line of the script: the bridge then finds one. */
const char *lheld_unblame(const char *msg);

/* lctx.c */
/* Pushes a new ctx table for s and returns its block (owned by the GC). */
struct lctx *lctx_push(lua_State *L, struct sess *s);
/* Before a call: a new message gets a fresh ctx.msg (ctx table at idx). */
void lctx_sync(lua_State *L, int idx, struct lctx *x);
/* The session is over: later uses of the ctx at idx raise. */
void lctx_detach(lua_State *L, int idx, struct lctx *x);
/* Implements ctx:log and milter.log; raises on a bad level. */
int lctx_log(lua_State *L, uint64_t cid, const char *qid, int first);

/* lwait.c: suspending a handler (see lb_wait in lb.h). */
/* The connection whose handler calls; raises "<what>: only inside a
 * handler" at the top level or from a coroutine of the script's own. */
struct lb_conn *lwait_current(lua_State *L, const char *what);
/* The timeout at idx: a number, {timeout = n} or nothing (dflt); raises
 * for anything else. */
double lwait_opt_timeout(lua_State *L, int idx, double dflt);
/* t capped by what is left of the handler's --script-timeout. */
double lwait_cap(const struct lb_conn *lc, double t);
double lwait_timeout(lua_State *L, struct lb_conn *lc, int idx, double dflt);
/* Records op (a lookup of kind, enum metrics_kind) and yields; the
 * completion pushes results, lwait_complete. */
int lwait_suspend(lua_State *L, struct lb_conn *lc, int kind, void *op,
                  void (*cancel)(void *op));
void lwait_complete(struct lb_conn *lc, int nres);
/* Returns nil, err from a lookup's C function. */
int lwait_fail(lua_State *L, const char *err);
/* Adds milter.sleep to the table on top. */
void lwait_open(lua_State *L);
/* ldns.c, ltcp.c: add milter.dns and milter.tcp to the table on top. */
void ldns_open(lua_State *L);
void ltcp_open(lua_State *L);
/* lredis.c: adds milter.redis to the milter table on top (reads its
 * milter.null). */
void lredis_open(lua_State *L);
/* x exactly into buf (LREDIS_NUMLEN bytes): an integer without ".0",
 * else the shortest %g that reads back the same; its length, or -1 for
 * inf and nan. */
#define LREDIS_NUMLEN 32
int lredis_fmt_num(lua_Number x, char *buf);
/* lstore.c: adds milter.store to the table on top. */
void lstore_open(lua_State *L);
/* lstore_rds.c: one milter.store call on the --store Redis server, its
 * arguments checked by lstore.c (v for LSTORE_SET, by for LSTORE_INCR;
 * ttl 0 for none). Suspends the handler; returns what the call returns. */
enum { LSTORE_GET, LSTORE_SET, LSTORE_DEL, LSTORE_INCR };
struct store_val;
int lstore_rds(lua_State *L, int op, const char *key, size_t klen,
               const struct store_val *v, double by, double ttl);
/* lhttp.c: adds milter.http to the table on top. */
void lhttp_open(lua_State *L);
/* Closes every socket lc's handler left open. */
void ltcp_close_all(struct lb_conn *lc);

/* lb.c: err = the error message on top of L, without its traceback. */
void lb_error_text(lua_State *L, char *err, size_t errlen);
/* Skips a #! first line (it stays an empty line 1). */
void lb_skip_hashbang(const char **src, size_t *len);

/* lsetup.c: before the script's top level: milter.script_dir for path
 * (first on package.path), milter.settings, the --preload file. Uses the
 * message handler at index tb; 0, or -1 with err ("file:line: ..."). */
int lsetup_run(lua_State *L, const char *path, int tb, char *err,
               size_t errlen);

/* lwhere.c: file:line for messages (borrowing the value at idx). */
/* Where the function at idx is defined: "file.lua:12". */
void lwhere_def(lua_State *L, int idx, char *out, size_t n);
/* Where the function at idx returns a value or (tails) only makes a tail
 * call: "file.lua:12", "file.lua:12 or 15"...; 0 and "" when unknown. */
int lwhere_sites(lua_State *L, int idx, int tails, char *out, size_t n);
/* The innermost line of a script file on co from level on; 0 if none. */
int lwhere_frame(lua_State *co, int level, char *out, size_t n);
/* Whether the function at idx of L has a frame on co: a handler that
 * failed in its own code, not in a function it tail-called. */
int lwhere_on_stack(lua_State *L, int idx, lua_State *co);
/* Pushes msg onto L, prefixed with lwhere_frame's line when it has no
 * position of its own (raised by require, a C function, error(m, 0)). */
void lwhere_push_error(lua_State *L, lua_State *co, int level,
                       const char *msg);

/* lverdict.c: reads the value at index idx of co; 0 or -1 with why set. */
int lverdict_read(struct lb_state *st, lua_State *co, int idx, int ev,
                  const struct sess *s, struct verdict *v, const char **why,
                  char *whybuf, size_t whylen);

#endif
