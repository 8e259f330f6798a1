/*
 * lheld: the bridge's side of the held headers (sess.h, ops.headers): one
 * resume runs the header handler for a whole batch of headers. A small
 * Lua function, made once per state, calls the handler for each header
 * in turn and returns the first verdict that is not continue. Before each
 * call it has C note which header's handler starts, and gets that
 * header's strings from it: ctx.headers shows the headers up to it, and
 * each handler gets what a call of its own gets (a --script-timeout, the
 * watchdog's start, its own sockets).
 */
#include "lb_int.h"

#include <string.h>

#include "log.h"

#define RUNNER "milter.held"

/* Header i of the batch, as the runner reads it: pointers into the
 * session's own copy, valid until the runner's next call into C (it
 * makes its strings at once). */
struct held_hdr {
    const char *name;
    size_t nlen;
    const char *value;
    size_t vlen;
    /* the name's lb_name_slot: names repeat message after message, and a
     * string made anew is hashed and interned again */
    int slot;
};

/* The runner has put slot k's string in the names table. */
static void keep(int k)
{
    if (lb_running)
        lb_name_kept(lb_running->st, k);
}

/*
 * The handler of header i (1-based in the batch) starts: returns that
 * header, or NULL for anything but the batch runner's next header. Called
 * through the ffi (the JIT compiles the call into the runner's trace,
 * where a Lua C function would end the trace at each header), so it uses
 * no Lua API.
 */
static const struct held_hdr *mark(int i)
{
    static struct held_hdr h; /* one worker thread, one runner at a time */
    struct lb_conn *lc = lb_running;
    if (!lc || !lc->held_s || i != (int)lc->held_i + 1 ||
        i > (int)lc->held_n)
        return NULL;
    lc->held_i = (uint32_t)i;
    if (lc->socks) /* the last header's handler is over */
        ltcp_close_all(lc);
    struct sess *s = lc->held_s;
    s->hdrs_run = lc->held_first + lc->held_i;
    lc->started = lb_now();
    lc->deadline = lc->started + lb_script_timeout();
    lc->st->deadline = lc->deadline;
    lb_busy_since = lc->started;
    const struct sess_hdr *sh = &s->hdrs[s->hdrs_run - 1];
    const char *name = sess_cstr(s, sh->name, 1);
    h = (struct held_hdr){name, sh->name.len, sess_cstr(s, sh->value, 1),
                          sh->value.len,
                          lb_name_slot(lc->st, name, sh->name.len)};
    return &h;
}

/* The same as a Lua C function, where there is no ffi: true and the
 * header's name and value, or false. */
static int l_mark(lua_State *L)
{
    const struct held_hdr *h = mark((int)lua_tointeger(L, 1));
    lua_pushboolean(L, h != NULL);
    if (!h)
        return 1;
    lb_push_name(lb_running->st, L, h->name, h->nlen);
    lua_pushlstring(L, h->value, h->vlen);
    return 3;
}

/* (handler, ctx, n, want): a verdict table that is just {action =
 * "continue"} is continue, as nil is; anything else is for C to read (and
 * to report, when it is not a verdict). Each header's strings are made
 * as its handler starts, only those the handler declares (want: 0, 1 or
 * more), so that nothing keeps a message's headers after. */
static const char runner_src[] =
    "local ffi, mark, keep, names, type, rawget, next = ...\n"
    "local get = mark\n"
    "if ffi then\n"
    "  local hp = ffi.typeof('const struct { const char *name; size_t nlen;"
    " const char *value; size_t vlen; int slot; } *')\n"
    "  local mk, str = ffi.cast(ffi.typeof('$ (*)(int)', hp), mark), ffi.string\n"
    "  local kp = ffi.cast('void (*)(int)', keep)\n"

    "  get = function(i, want)\n"
    "    local h = mk(i)\n"
    "    if h == nil then return false end\n"
    "    local name, value\n"
    "    if want > 0 then\n"
    "      local k = h.slot\n"
    "      if k > 0 then\n"
    "        name = names[k]\n"
    "      else\n"
    "        name = str(h.name, h.nlen)\n"
    "        if k < 0 then names[-k] = name kp(-k) end\n"
    "      end\n"
    "    end\n"
    "    if want > 1 then value = str(h.value, h.vlen) end\n"
    "    return true, name, value\n"
    "  end\n"
    "end\n"
    "return function(header, ctx, n, want)\n"
    "  for i = 1, n do\n"
    "    local ok, name, value = get(i, want)\n"
    "    if not ok then return end\n"
    "    if want < 2 then value = nil end\n"
    "    if want < 1 then name = nil end\n"
    "    local v = header(ctx, name, value)\n"
    "    if v ~= nil and (type(v) ~= 'table' or\n"
    "        rawget(v, 'action') ~= 'continue' or next(v, next(v)) ~= nil) then\n"
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
            lua_pushnil(L);
        } else {
            const struct held_hdr *(*fn)(int) = mark;
            void (*kfn)(int) = keep;
            void *p;
            memcpy(&p, &fn, sizeof p); /* a function's address, for ffi.cast */
            lua_pushlightuserdata(L, p);
            memcpy(&p, &kfn, sizeof p);
            lua_pushlightuserdata(L, p);
        }
        lb_push_names(st, L);
        lb_push_std(L, LB_TYPE);
        lb_push_std(L, LB_RAWGET);
        lb_push_std(L, LB_NEXT);
        if (lua_pcall(L, 7, 1, 0) != 0) {
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
    lua_pushinteger(co, (lua_Integer)n);
    lua_pushinteger(co, (lua_Integer)st->nargs[SE_HEADER]);
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
