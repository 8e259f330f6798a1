/*
 * lwait: how a handler waits (part of the Lua bridge). A lookup's C
 * function starts an engine operation, records it on the connection's
 * lb_conn and yields the handler's coroutine; the engine's callback pushes
 * the results onto that coroutine and asks the glue to resume it, which it
 * does from the loop through lb_resume(), the same path as lb_call(). Also
 * milter.sleep, the simplest such call.
 */
#include "lb_int.h"

#include <string.h>

#include "aio.h"
#include "metrics.h"

struct lb_conn *lwait_current(lua_State *L, const char *what)
{
    struct lb_state *st;
    lua_getallocf(L, (void **)&st);
    struct lb_conn *lc = st->running;
    if (!lc || lc->co != L)
        luaL_error(L, "%s: only inside a handler (not at the script's top "
                      "level, nor in a coroutine of its own)",
                   what);
    return lc;
}

double lwait_opt_timeout(lua_State *L, int idx, double dflt)
{
    double t = dflt;
    if (lua_type(L, idx) == LUA_TNUMBER) {
        t = lua_tonumber(L, idx);
    } else if (lua_istable(L, idx)) {
        lua_getfield(L, idx, "timeout");
        if (!lua_isnil(L, -1)) {
            if (lua_type(L, -1) != LUA_TNUMBER)
                luaL_argerror(L, idx, "timeout must be a number of seconds");
            t = lua_tonumber(L, -1);
        }
        lua_pop(L, 1);
    } else if (!lua_isnoneornil(L, idx)) {
        luaL_argerror(L, idx, "expected a timeout or {timeout = seconds}");
    }
    if (!(t >= 0) || t > 1e9)
        luaL_argerror(L, idx, "timeout must be a number of seconds >= 0");
    return t;
}

/*
 * What is left of the handler's budget for a wait: it counts waiting, and
 * keeps a little back (a tenth, at most 0.25 s) so that a handler whose
 * lookup timed out at the end of it can still act on "timeout".
 */
static double budget_left(const struct lb_conn *lc)
{
    double margin = (lc->deadline - lc->started) / 10;
    if (margin > 0.25)
        margin = 0.25;
    return lc->deadline - margin - lb_now();
}

double lwait_cap(const struct lb_conn *lc, double t)
{
    double left = budget_left(lc);
    return t < left ? t : left;
}

double lwait_timeout(lua_State *L, struct lb_conn *lc, int idx, double dflt)
{
    return lwait_cap(lc, lwait_opt_timeout(L, idx, dflt));
}

int lwait_suspend(lua_State *L, struct lb_conn *lc, int kind, void *op,
                  void (*cancel)(void *op))
{
    lc->wait.kind = kind;
    lc->wait.since = msglog_clock();
    lc->wait.op = op;
    lc->wait.cancel = cancel;
    lc->wait.active = 1;
    lc->wait.nres = 0;
    return lua_yield(L, 0);
}

/* The lookup's result for --metrics, from what its completion pushed:
 * nil, "timeout"; nil, err; or a value. */
static int result_of(lua_State *co, int nres)
{
    if (nres < 1 || !lua_isnil(co, -nres))
        return MR_OK;
    if (nres >= 2 && lua_type(co, -nres + 1) == LUA_TSTRING) {
        size_t n;
        const char *e = lua_tolstring(co, -nres + 1, &n);
        if (n == 7 && memcmp(e, "timeout", 7) == 0)
            return MR_TIMEOUT;
    }
    return MR_ERROR;
}

void lwait_complete(struct lb_conn *lc, int nres)
{
    int r = result_of(lc->co, nres);
    metrics_lookup(lc->wait.kind, r, msglog_clock() - lc->wait.since);
    if (lc->wait.kind == MK_STORE)
        metrics_store(lc->wait.flags, /* lstore_rds: the op */ r != MR_OK);
    lc->wait.active = 0;
    lc->wait.op = NULL;
    lc->wait.nres = nres;
    if (lc->wake)
        lc->wake(lc->wake_ud);
}

int lwait_fail(lua_State *L, const char *err)
{
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
}

/* ---- milter.sleep(seconds) -------------------------------------------- */

static void slept(void *ud)
{
    struct lb_conn *lc = ud;
    lua_pushboolean(lc->co, 1);
    lwait_complete(lc, 1);
}

static void sleep_cut(void *ud)
{
    struct lb_conn *lc = ud;
    lua_pushnil(lc->co);
    lua_pushliteral(lc->co, "timeout");
    lwait_complete(lc, 2);
}

static void sleep_cancel(void *op) { tmr_cancel(op); }

/* true after the pause; nil, "timeout" when the budget ends it first */
static int l_sleep(lua_State *L)
{
    struct lb_conn *lc = lwait_current(L, "milter.sleep");
    double want = luaL_checknumber(L, 1);
    if (!(want >= 0) || want > 1e9)
        return luaL_argerror(L, 1, "seconds must be >= 0");
    double left = budget_left(lc);
    int cut = want > left;
    struct tmr *t = tmr_start(cut ? (left > 0 ? left : 0) : want,
                              cut ? sleep_cut : slept, lc);
    if (!t)
        return lwait_fail(L, "out of memory");
    return lwait_suspend(L, lc, MK_SLEEP, t, sleep_cancel);
}

void lwait_open(lua_State *L)
{
    lua_pushcfunction(L, l_sleep);
    lua_setfield(L, -2, "sleep");
}
