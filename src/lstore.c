/*
 * lstore: milter.store and its methods get, set, del and incr (part of
 * the Lua bridge), on the store engine. The calls are short local
 * transactions that never wait, but they are allowed inside handlers only
 * (a coroutine of the script's own included): a write at the top level
 * would run in the supervisor's check and again in every worker at every
 * reload. Misuse (a bad key, value or ttl, a call outside a handler)
 * raises; a failing store ("store full", an I/O error) is nil, err.
 * With --store redis://... the same calls go to lstore_rds.c and wait
 * like every lookup (from the handler itself only).
 */
#include "lb_int.h"
#include "metrics.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "store.h"

#define STORE_MT "milter.store"
#define MAX_TTL 1e9 /* seconds: about 31 years */

/* raises unless a handler runs; returns the key at index 2 */
static const char *check_call(lua_State *L, const char *what, size_t *klen)
{
    struct lb_state *st;
    luaL_checkudata(L, 1, STORE_MT);
    lua_getallocf(L, (void **)&st);
    if (store_redis_url()) { /* the call waits: from the handler itself */
        char what_[32];
        snprintf(what_, sizeof what_, "milter.store:%s", what);
        lwait_current(L, what_);
    } else if (!st->running)
        luaL_error(L, "milter.store:%s: only inside a handler (not at the "
                      "script's top level)",
                   what);
    if (lua_type(L, 2) != LUA_TSTRING)
        luaL_argerror(L, 2, "key must be a string");
    const char *k = lua_tolstring(L, 2, klen);
    if (*klen == 0 || *klen > STORE_MAX_KEY)
        luaL_argerror(L, 2, "key must be 1 to 511 bytes");
    return k;
}

/* the ttl at idx: none (0) or seconds > 0, rounded up; raises otherwise */
static double check_ttl(lua_State *L, int idx)
{
    if (lua_isnoneornil(L, idx))
        return 0;
    if (lua_type(L, idx) != LUA_TNUMBER)
        luaL_argerror(L, idx, "ttl must be a number of seconds");
    double t = lua_tonumber(L, idx);
    if (!(t > 0) || t > MAX_TTL)
        luaL_argerror(L, idx, "ttl must be a number of seconds > 0");
    return ceil(t);
}

static int failed(lua_State *L, const char *err)
{
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
}

/* store:get(key) -> value | nil  (nil, err on failure) */
static int lstore_get(lua_State *L)
{
    size_t klen;
    const char *k = check_call(L, "get", &klen);
    if (store_redis_url())
        return lstore_rds(L, LSTORE_GET, k, klen, NULL, 0, 0);
    struct store_val v;
    const char *err;
    int r = store_get(k, klen, &v, &err);
    metrics_store(LSTORE_GET, r < 0);
    if (r < 0)
        return failed(L, err);
    if (r == 0)
        lua_pushnil(L);
    else if (v.type == STORE_NUMBER)
        lua_pushnumber(L, v.num);
    else
        lua_pushlstring(L, v.str, v.len);
    return 1;
}

/* store:set(key, value [, ttl]) -> true */
static int lstore_set(lua_State *L)
{
    size_t klen;
    const char *k = check_call(L, "set", &klen);
    struct store_val v = {0};
    if (lua_type(L, 3) == LUA_TNUMBER) {
        v.type = STORE_NUMBER;
        v.num = lua_tonumber(L, 3);
        if (!isfinite(v.num))
            return luaL_argerror(L, 3, "value must be a finite number");
    } else if (lua_type(L, 3) == LUA_TSTRING) {
        v.type = STORE_STRING;
        v.str = lua_tolstring(L, 3, &v.len);
    } else {
        return luaL_argerror(L, 3, "value must be a string or a number "
                                   "(store:del removes a key)");
    }
    double ttl = check_ttl(L, 4);
    if (store_redis_url())
        return lstore_rds(L, LSTORE_SET, k, klen, &v, 0, ttl);
    const char *err;
    int r = store_set(k, klen, &v, ttl, &err);
    metrics_store(LSTORE_SET, r < 0);
    if (r < 0)
        return failed(L, err);
    lua_pushboolean(L, 1);
    return 1;
}

/* store:del(key) -> true (an absent key too) */
static int lstore_del(lua_State *L)
{
    size_t klen;
    const char *k = check_call(L, "del", &klen);
    if (store_redis_url())
        return lstore_rds(L, LSTORE_DEL, k, klen, NULL, 0, 0);
    const char *err;
    int r = store_del(k, klen, &err);
    metrics_store(LSTORE_DEL, r < 0);
    if (r < 0)
        return failed(L, err);
    lua_pushboolean(L, 1);
    return 1;
}

/* store:incr(key [, by [, ttl]]) -> the new value */
static int lstore_incr(lua_State *L)
{
    size_t klen;
    const char *k = check_call(L, "incr", &klen);
    double by = 1;
    if (!lua_isnoneornil(L, 3)) {
        if (lua_type(L, 3) != LUA_TNUMBER || !isfinite(lua_tonumber(L, 3)))
            return luaL_argerror(L, 3, "increment must be a finite number");
        by = lua_tonumber(L, 3);
    }
    double ttl = check_ttl(L, 4), n;
    if (store_redis_url())
        return lstore_rds(L, LSTORE_INCR, k, klen, NULL, by, ttl);
    const char *err;
    int r = store_incr(k, klen, by, ttl, &n, &err);
    metrics_store(LSTORE_INCR, r < 0);
    if (r < 0)
        return failed(L, err);
    lua_pushnumber(L, n);
    return 1;
}

/*
 * store:incr through the ffi, for the LMDB store: a call of a Lua C
 * function ends the JIT's trace, and the handler's code after it then
 * runs in the interpreter (440 instructions per call, measured). The Lua
 * function below checks the arguments and calls lstore_ffi_incr; any call
 * it does not take (a bad argument, a call outside a handler, Redis, an
 * increment that is not finite) goes to lstore_incr as a tail call, so
 * that the error names the script's line and `incr`, as it always did.
 */
static int lstore_ffi_incr(const char *k, size_t klen, double by,
                           double ttl, double *out, const char **err)
{
    if (!lb_running || store_redis_url() || !isfinite(by))
        return 1;
    int r = store_incr(k, klen, by, ceil(ttl), out, err);
    metrics_store(LSTORE_INCR, r < 0);
    return r < 0 ? -1 : 0;
}

static const char fast_src[] =
    "local ffi, cincr, fp, store, type, maxkey, maxttl = ...\n"
    "local fincr = ffi.cast('int (*)(const char *, size_t, double, double,"
    " double *, const char **)', fp)\n"
    "local out, errp, str = ffi.new('double[1]'), ffi.new('const char *[1]'),"
    " ffi.string\n"
    "return function(self, key, by, ttl)\n"
    "  if self == store and type(key) == 'string' and #key > 0 and\n"
    "      #key <= maxkey and (by == nil or type(by) == 'number') and\n"
    "      (ttl == nil or (type(ttl) == 'number' and ttl > 0 and\n"
    "      ttl <= maxttl)) then\n"
    "    local r = fincr(key, #key, by or 1, ttl or 0, out, errp)\n"
    "    if r == 0 then return out[0] end\n"
    "    if r < 0 then return nil, str(errp[0]) end\n"
    "  end\n"
    "  return cincr(self, key, by, ttl)\n"
    "end\n";

/* methods.incr = the ffi's incr, where there is an ffi and the store is
 * LMDB; [-1] is the methods table, [-2] the store. */
static void fast_incr(lua_State *L)
{
    if (store_redis_url())
        return;
    lb_push_std(L, LB_FFI);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    if (luaL_loadbuffer(L, fast_src, sizeof fast_src - 1, "=milter.store")) {
        lua_pop(L, 2); /* out of memory: the C function stays */
        return;
    }
    lua_insert(L, -2); /* the chunk, then ffi */
    lua_pushcfunction(L, lstore_incr);
    int (*fn)(const char *, size_t, double, double, double *,
              const char **) = lstore_ffi_incr;
    void *p;
    memcpy(&p, &fn, sizeof p); /* a function's address, for ffi.cast */
    lua_pushlightuserdata(L, p);
    lua_pushvalue(L, -6); /* the store */
    lb_push_std(L, LB_TYPE);
    lua_pushinteger(L, STORE_MAX_KEY);
    lua_pushnumber(L, MAX_TTL);
    if (lua_pcall(L, 7, 1, 0) != 0) {
        lua_pop(L, 1); /* out of memory: the C function stays */
        return;
    }
    lua_setfield(L, -2, "incr");
}

static int lstore_tostring(lua_State *L)
{
    lua_pushliteral(L, "milter.store");
    return 1;
}

void lstore_open(lua_State *L)
{
    static const luaL_Reg methods[] = {{"get", lstore_get},
                                       {"set", lstore_set},
                                       {"del", lstore_del},
                                       {"incr", lstore_incr},
                                       {NULL, NULL}};
    lua_newuserdata(L, 1);
    if (luaL_newmetatable(L, STORE_MT)) {
        lua_createtable(L, 0, 4);
        luaL_register(L, NULL, methods);
        lua_pushvalue(L, -3); /* the store, for fast_incr */
        lua_insert(L, -2);
        fast_incr(L);
        lua_remove(L, -2);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, lstore_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_pushliteral(L, "milter.store");
        lua_setfield(L, -2, "__metatable");
    }
    lua_setmetatable(L, -2);
    lua_setfield(L, -2, "store");
}
