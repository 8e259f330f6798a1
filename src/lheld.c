/*
 * lheld: the bridge's side of the held headers (sess.h, ops.headers): one
 * resume runs the header handler for a whole batch of headers. A small
 * Lua function, made once per state, calls the handler for each header
 * in turn and returns the first verdict that is not continue. Before each
 * call it has C note which header's handler starts: ctx.headers shows the
 * headers up to it, and each handler gets what a call of its own gets (a
 * --script-timeout, the watchdog's start, its own sockets).
 */
#include "lb_int.h"

#include <string.h>

#include "log.h"

#define RUNNER "milter.held"

/*
 * The handler of header i (1-based in the batch) starts. Only the batch
 * runner calls it, once per header in order; anything else is ignored.
 * Called through the ffi (the JIT compiles the call into the runner's
 * trace, where a Lua C function would end the trace at each header), so
 * it uses no Lua API.
 */
static int mark(int i)
{
    struct lb_conn *lc = lb_running;
    if (!lc || !lc->held_s || i != (int)lc->held_i + 1 ||
        i > (int)lc->held_n)
        return 0;
    lc->held_i = (uint32_t)i;
    if (i > 1)
        ltcp_close_all(lc); /* the last header's handler is over */
    lc->held_s->hdrs_run = lc->held_first + lc->held_i;
    lc->started = lb_now();
    lc->deadline = lc->started + lb_script_timeout();
    lc->st->deadline = lc->deadline;
    lb_busy_since = lc->started;
    return 0;
}

/* The same as a Lua C function, where there is no ffi. */
static int l_mark(lua_State *L)
{
    mark((int)lua_tointeger(L, 1));
    return 0;
}

/* (handler, ctx, {name1, value1, ...}, n): a verdict table that is just
 * {action = "continue"} is continue, as nil is; anything else is for C to
 * read (and to report, when it is not a verdict). The connection keeps t:
 * each header's strings leave it as its handler is called, the rest when
 * a verdict ends the batch, so that it holds no message's headers after. */
static const char runner_src[] =
    "local ffi, mark, type, rawget, next = ...\n"
    "if ffi then mark = ffi.cast('int (*)(int)', mark) end\n"
    "return function(header, ctx, t, n)\n"
    "  for i = 1, n do\n"
    "    mark(i)\n"
    "    local name, value = t[2 * i - 1], t[2 * i]\n"
    "    t[2 * i - 1], t[2 * i] = nil, nil\n"
    "    local v = header(ctx, name, value)\n"
    "    if v ~= nil and (type(v) ~= 'table' or\n"
    "        rawget(v, 'action') ~= 'continue' or next(v, next(v)) ~= nil) then\n"
    "      for j = 2 * i + 1, 2 * n do t[j] = nil end\n"
    "      return v\n"
    "    end\n"
    "  end\n"
    "end\n";

/* Pushes the runner onto co; 0, or -1 when it cannot be made (memory). */
static int push_runner(struct lb_state *st, lua_State *co)
{
    if (st->held_ref == 0) {
        lua_State *L = st->L;
        if (luaL_loadbuffer(L, runner_src, sizeof runner_src - 1,
                            "=" RUNNER) != 0) {
            lua_pop(L, 1);
            return -1;
        }
        lb_push_std(L, LB_FFI);
        if (lua_isnil(L, -1)) {
            lua_pushcfunction(L, l_mark);
        } else {
            int (*fn)(int) = mark;
            void *p;
            memcpy(&p, &fn, sizeof p); /* a function's address, for ffi.cast */
            lua_pushlightuserdata(L, p);
        }
        lb_push_std(L, LB_TYPE);
        lb_push_std(L, LB_RAWGET);
        lb_push_std(L, LB_NEXT);
        if (lua_pcall(L, 5, 1, 0) != 0) {
            lua_pop(L, 1);
            return -1;
        }
        st->held_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_rawgeti(co, LUA_REGISTRYINDEX, st->held_ref);
    return 0;
}

int lb_call_headers(struct lb_conn *lc, struct sess *s, uint32_t first,
                    uint32_t n, struct verdict *v)
{
    struct lb_state *st = lc->st;
    lb_prepare(lc, s);
    lua_State *co = lc->co;
    lua_settop(co, 0);
    verdict_clear(v);
    if (!lua_checkstack(co, 8) || push_runner(st, co) < 0) {
        log_msg(LL_ERR, s->id, sess_qid(s),
                "handler header not run: out of memory");
        return -1;
    }
    lua_rawgeti(co, LUA_REGISTRYINDEX, st->handler[SE_HEADER]);
    lua_rawgeti(co, LUA_REGISTRYINDEX, lc->ctx_ref);
    lctx_sync(co, 3, lc->ctx);
    /* the connection's own table (one batch at a time uses it), emptied
     * by the runner as it goes */
    if (lc->held_tref == LUA_NOREF) {
        lua_createtable(co, 2 * 16, 0);
        lua_pushvalue(co, -1);
        lc->held_tref = luaL_ref(co, LUA_REGISTRYINDEX);
    } else {
        lua_rawgeti(co, LUA_REGISTRYINDEX, lc->held_tref);
    }
    unsigned want = st->nargs[SE_HEADER]; /* header(ctx, name) gets no value */
    for (uint32_t k = 0; want && k < n; k++) {
        const struct sess_hdr *h = &s->hdrs[first + k];
        lb_push_name(st, co, sess_cstr(s, h->name, 1), h->name.len);
        lua_rawseti(co, -2, (int)(2 * k + 1));
        if (want < 2)
            continue;
        lua_pushlstring(co, sess_cstr(s, h->value, 1), h->value.len);
        lua_rawseti(co, -2, (int)(2 * k + 2));
    }
    lua_pushinteger(co, (lua_Integer)n);
    lc->ev = SE_HEADER;
    lc->held_s = s;
    lc->held_first = first;
    lc->held_n = n;
    lc->held_i = 0;
    lc->started = lb_now();
    lc->deadline = lc->started + lb_script_timeout();
    return lb_run_slice(lc, s, 4, v);
}

const char *lheld_unblame(const char *msg)
{
    static const char pre[] = RUNNER ":";
    if (!msg || strncmp(msg, pre, sizeof pre - 1) != 0)
        return msg;
    const char *p = msg + sizeof pre - 1;
    while (*p >= '0' && *p <= '9')
        p++;
    return p[0] == ':' && p[1] == ' ' ? p + 2 : msg;
}

void lheld_forget(struct lb_conn *lc)
{
    if (lc->held_tref == LUA_NOREF)
        return;
    luaL_unref(lc->st->L, LUA_REGISTRYINDEX, lc->held_tref);
    lc->held_tref = LUA_NOREF;
}

void lheld_trim(lua_State *L)
{
    size_t len;
    const char *t = lua_tolstring(L, -1, &len);
    const char *cut = t ? strstr(t, "\n\t" RUNNER ":") : NULL;
    if (!cut)
        return;
    lua_pushlstring(L, t, (size_t)(cut - t));
    lua_replace(L, -2);
}
