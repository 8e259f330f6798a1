/*
 * lredis: milter.redis.new and its object's call and pipeline (part of
 * the Lua bridge), on the rds engine. The object only names a server: the
 * connection is the engine's, one per process and URL, so the object may
 * be made at the top level and kept; calls wait, so they are made inside
 * handlers only. Replies: integers as numbers, status and bulk strings as
 * strings, arrays as lists, a nil reply as milter.null; an error reply is
 * nil, "its text" from call, {err = "its text"} inside a list.
 */
#include "lb_int.h"
#include "metrics.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rds.h"

#define REDIS_MT "milter.redis"
#define DEFAULT_TIMEOUT 5.0
#define MAX_PIPELINE 10000 /* commands in one pipeline */
#define NUMLEN LREDIS_NUMLEN

struct lrds {
    struct rds *r;  /* the engine's, process-wide */
    double timeout; /* default of its calls */
};

/* registry key of milter.null, the value a nil reply becomes */
static char null_key;

/* ---- replies -------------------------------------------------------- */

static void push_null(lua_State *co)
{
    lua_pushlightuserdata(co, &null_key);
    lua_rawget(co, LUA_REGISTRYINDEX);
}

/* x onto co; an error reply inside a list is {err = text}. The reader
 * nests replies a few levels deep at most. */
static void push_reply(lua_State *co, const struct rds_reply *x)
{
    lua_checkstack(co, 4);
    switch (x->type) {
    case RDS_INTEGER: lua_pushnumber(co, (lua_Number)x->integer); break;
    case RDS_STRING:
    case RDS_STATUS: lua_pushlstring(co, x->str, x->len); break;
    case RDS_ERROR:
        lua_createtable(co, 0, 1);
        lua_pushlstring(co, x->str, x->len);
        lua_setfield(co, -2, "err");
        break;
    case RDS_ARRAY:
        lua_createtable(co, x->n < 1u << 26 ? (int)x->n : 0, 0);
        for (size_t i = 0; i < x->n; i++) {
            push_reply(co, &x->elem[i]);
            lua_rawseti(co, -2, (int)i + 1);
        }
        break;
    default: push_null(co); break;
    }
}

/* The replies, pushed onto the waiting coroutine. wait.flags: 0 call,
 * 1 pipeline. */
static void replied(void *ud, const char *err, const struct rds_reply *rep,
                    size_t n)
{
    struct lb_conn *lc = ud;
    lua_State *co = lc->co;
    if (err) {
        lua_pushnil(co);
        lua_pushstring(co, err);
        lwait_complete(lc, 2);
        return;
    }
    if (lc->wait.flags == 0) {
        if (rep[0].type == RDS_ERROR) {
            lua_pushnil(co);
            lua_pushlstring(co, rep[0].str, rep[0].len);
            lwait_complete(lc, 2);
        } else {
            push_reply(co, &rep[0]);
            lwait_complete(lc, 1);
        }
        return;
    }
    /* pipeline: the list, and the first error reply's text if any */
    const struct rds_reply *first = NULL;
    lua_createtable(co, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        push_reply(co, &rep[i]);
        lua_rawseti(co, -2, (int)i + 1);
        if (!first && rep[i].type == RDS_ERROR)
            first = &rep[i];
    }
    if (first) {
        lua_pushlstring(co, first->str, first->len);
        lwait_complete(lc, 2);
    } else {
        lwait_complete(lc, 1);
    }
}

static void cancel(void *op) { rds_cancel(op); }

/* ---- arguments ------------------------------------------------------ */

int lredis_fmt_num(lua_Number x, char *buf)
{
    if (!isfinite(x))
        return -1;
    if (x == floor(x) && fabs(x) < 9e18)
        return snprintf(buf, NUMLEN, "%lld", (long long)x);
    int len = 0;
    for (int prec = 15; prec <= 17; prec++) {
        len = snprintf(buf, NUMLEN, "%.*g", prec, x);
        if (strtod(buf, NULL) == x)
            break;
    }
    return len;
}

/* The value on top is an argument: a string, or a finite number. */
static const char *bad_arg(lua_State *L)
{
    int t = lua_type(L, -1);
    if (t == LUA_TSTRING)
        return NULL;
    if (t == LUA_TNUMBER)
        return isfinite(lua_tonumber(L, -1)) ? NULL : "a finite number";
    return lua_typename(L, t);
}

/*
 * Adds one command to q: the values at stack indexes from..to (tidx 0), or
 * elements from..to of the table at tidx. Only after they were checked:
 * nothing here raises (the strings stay referenced where they are).
 */
static int add_cmd(struct rds_req *q, lua_State *L, int tidx, int from,
                   int to)
{
    int argc = to - from + 1;
    char *block = malloc((size_t)argc * (sizeof(char *) + sizeof(size_t) +
                                         NUMLEN));
    if (!block)
        return -1;
    const char **argv = (const char **)(void *)block;
    size_t *lens = (size_t *)(void *)(block + (size_t)argc * sizeof(char *));
    char *nums = block + (size_t)argc * (sizeof(char *) + sizeof(size_t));
    for (int i = 0; i < argc; i++) {
        if (tidx)
            lua_rawgeti(L, tidx, from + i);
        else
            lua_pushvalue(L, from + i);
        if (lua_type(L, -1) == LUA_TNUMBER) {
            char *b = nums + (size_t)i * NUMLEN;
            lens[i] = (size_t)lredis_fmt_num(lua_tonumber(L, -1), b);
            argv[i] = b;
        } else {
            argv[i] = lua_tolstring(L, -1, &lens[i]);
        }
        lua_pop(L, 1);
    }
    int rc = rds_req_add(q, argc, argv, lens);
    free(block);
    return rc;
}

static struct lrds *check_self(lua_State *L)
{
    return luaL_checkudata(L, 1, REDIS_MT);
}

static int start(lua_State *L, struct lb_conn *lc, struct lrds *o,
                 struct rds_req *q, double timeout, int pipeline)
{
    lc->wait.flags = pipeline;
    if (rds_start(o->r, q, timeout, replied, lc) < 0)
        return lwait_fail(L, "out of memory");
    return lwait_suspend(L, lc, MK_REDIS, q, cancel);
}

/* r:call(cmd, arg... [, {timeout = s}]) -> reply | nil, err */
static int l_call(lua_State *L)
{
    struct lrds *o = check_self(L);
    struct lb_conn *lc = lwait_current(L, "redis:call");
    int top = lua_gettop(L), last = top, oi = 0;
    if (top >= 2 && lua_istable(L, top)) { /* a number is an argument */
        oi = top;
        last = top - 1;
    }
    if (last < 2)
        return luaL_argerror(L, 2, "expected a command name");
    for (int i = 2; i <= last; i++) {
        lua_pushvalue(L, i);
        const char *bad = bad_arg(L);
        if (bad)
            return luaL_argerror(
                L, i, lua_pushfstring(L, "expected a string or a number, "
                                         "got %s", bad));
        lua_pop(L, 1);
    }
    double timeout = lwait_cap(lc, oi ? lwait_opt_timeout(L, oi, o->timeout)
                                      : o->timeout);
    if (timeout <= 0)
        return lwait_fail(L, "timeout");
    struct rds_req *q = rds_req_new(1);
    if (!q || add_cmd(q, L, 0, 2, last) < 0) {
        rds_req_free(q);
        return lwait_fail(L, "out of memory");
    }
    return start(L, lc, o, q, timeout, 0);
}

/* r:pipeline{ {cmd, arg...}, ... } [, timeout | {timeout = s}]
 * -> list of replies [, first error reply's text] | nil, err */
static int l_pipeline(lua_State *L)
{
    struct lrds *o = check_self(L);
    struct lb_conn *lc = lwait_current(L, "redis:pipeline");
    luaL_checktype(L, 2, LUA_TTABLE);
    size_t n = lua_objlen(L, 2);
    if (n == 0)
        return luaL_argerror(L, 2, "expected a list of commands");
    if (n > MAX_PIPELINE)
        return luaL_argerror(L, 2, "more than 10000 commands");
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, 2, (int)i);
        if (!lua_istable(L, -1) || lua_objlen(L, -1) == 0)
            return luaL_error(L, "redis:pipeline: command %d is not a list "
                                 "{name, arg...}", (int)i);
        int m = (int)lua_objlen(L, -1);
        for (int j = 1; j <= m; j++) {
            lua_rawgeti(L, -1, j);
            const char *bad = bad_arg(L);
            if (bad)
                return luaL_error(L, "redis:pipeline: command %d, argument "
                                     "%d: expected a string or a number, "
                                     "got %s", (int)i, j, bad);
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    double timeout = lwait_timeout(L, lc, 3, o->timeout);
    if (timeout <= 0)
        return lwait_fail(L, "timeout");
    struct rds_req *q = rds_req_new(n);
    if (!q)
        return lwait_fail(L, "out of memory");
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, 2, (int)i);
        int rc = add_cmd(q, L, lua_gettop(L), 1, (int)lua_objlen(L, -1));
        lua_pop(L, 1);
        if (rc < 0) {
            rds_req_free(q);
            return lwait_fail(L, "out of memory");
        }
    }
    return start(L, lc, o, q, timeout, 1);
}

/* milter.redis.new(url [, timeout | {timeout = s}]): anywhere, no I/O */
static int l_new(lua_State *L)
{
    const char *url = luaL_checkstring(L, 1);
    double timeout = lwait_opt_timeout(L, 2, DEFAULT_TIMEOUT);
    const char *err;
    struct rds *r = rds_get(url, &err);
    if (!r)
        return luaL_error(L, "milter.redis.new: %s: %s", err, url);
    struct lrds *o = lua_newuserdata(L, sizeof *o);
    o->r = r;
    o->timeout = timeout;
    luaL_getmetatable(L, REDIS_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static int l_tostring(lua_State *L)
{
    check_self(L);
    lua_pushliteral(L, "milter.redis");
    return 1;
}

void lredis_open(lua_State *L)
{
    if (luaL_newmetatable(L, REDIS_MT)) {
        static const luaL_Reg m[] = {
            {"call", l_call}, {"pipeline", l_pipeline}, {NULL, NULL}};
        lua_newtable(L);
        luaL_register(L, NULL, m);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    /* the module's milter.null (lua/milter.lua) is what C pushes too */
    lua_pushlightuserdata(L, &null_key);
    lua_getfield(L, -2, "null");
    if (lua_isnil(L, -1))
        return (void)luaL_error(L, "milter.null is missing");
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, l_new);
    lua_setfield(L, -2, "new");
    lua_setfield(L, -2, "redis");
}
