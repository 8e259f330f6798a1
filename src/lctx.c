/*
 * lctx: the ctx userdata handed to every handler (part of the Lua bridge).
 *
 * ctx is a small block pointing at the C session; its environment table
 * holds what the script owns (conn, msg) and lazily built views of session
 * data (client, rcpts, headers), refreshed only when the session changed.
 * Once the session is over the pointer is NULL and every access raises.
 */
#include "lb_int.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "log.h"

#define CTX_MT "milter.ctx"

static struct sess *live(lua_State *L, struct lctx *x)
{
    if (!x->s)
        luaL_error(L, "ctx used after its connection closed");
    return x->s;
}

static struct lctx *check_ctx(lua_State *L)
{
    return luaL_checkudata(L, 1, CTX_MT);
}

/* Pushes env[key], creating an empty table there when missing. */
static void env_table(lua_State *L, const char *key)
{
    lua_getfenv(L, 1);
    lua_getfield(L, -1, key);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, key);
    }
    lua_remove(L, -2);
}

/* Drops per-message views when a new message started. */
static void sync_msg(lua_State *L, struct lctx *x, const struct sess *s)
{
    if (x->msg_seq == s->msg_seq)
        return;
    lua_getfenv(L, 1);
    lua_pushnil(L);
    lua_setfield(L, -2, "msg");
    lua_pushnil(L);
    lua_setfield(L, -2, "rcpts");
    lua_pushnil(L);
    lua_setfield(L, -2, "headers");
    lua_pop(L, 1);
    x->msg_seq = s->msg_seq;
    x->nrcpts = x->nhdrs = 0;
}

static void push_mstr(lua_State *L, const struct sess *s, struct sess_str v)
{
    lua_pushlstring(L, sess_cstr(s, v, 1), v.len);
}

static void push_rcpts(lua_State *L, struct lctx *x, const struct sess *s)
{
    if (x->rcpts_dropped != s->rcpts_dropped) { /* a recipient was refused */
        lua_getfenv(L, 1);
        lua_pushnil(L);
        lua_setfield(L, -2, "rcpts");
        lua_pop(L, 1);
        x->nrcpts = 0;
        x->rcpts_dropped = s->rcpts_dropped;
    }
    env_table(L, "rcpts");
    for (; x->nrcpts < s->nrcpts; x->nrcpts++) {
        push_mstr(L, s, s->rcpts[x->nrcpts]);
        lua_rawseti(L, -2, (int)x->nrcpts + 1);
    }
}

static void push_headers(lua_State *L, struct lctx *x, const struct sess *s)
{
    env_table(L, "headers");
    for (; x->nhdrs < s->nhdrs; x->nhdrs++) {
        lua_createtable(L, 2, 0);
        push_mstr(L, s, s->hdrs[x->nhdrs].name);
        lua_rawseti(L, -2, 1);
        push_mstr(L, s, s->hdrs[x->nhdrs].value);
        lua_rawseti(L, -2, 2);
        lua_rawseti(L, -2, (int)x->nhdrs + 1);
    }
}

static void push_client(lua_State *L, const struct sess *s)
{
    static const char *const fam[] = {"inet", "inet6", "unix", "unknown"};
    lua_getfenv(L, 1);
    lua_getfield(L, -1, "client");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_createtable(L, 0, 4);
        lua_pushlstring(L, sess_cstr(s, s->host, 0), s->host.len);
        lua_setfield(L, -2, "host");
        const char *f = s->family == '4'   ? fam[0]
                        : s->family == '6' ? fam[1]
                        : s->family == 'L' ? fam[2]
                                           : fam[3];
        lua_pushstring(L, f);
        lua_setfield(L, -2, "family");
        if (s->family != 'U') {
            lua_pushlstring(L, sess_cstr(s, s->addr, 0), s->addr.len);
            lua_setfield(L, -2, "address");
            lua_pushinteger(L, s->port);
            lua_setfield(L, -2, "port");
        }
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, "client");
    }
    lua_remove(L, -2);
}

static int ctx_index(lua_State *L)
{
    struct lctx *x = check_ctx(L);
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1)); /* methods */
    if (!lua_isnil(L, -1) || lua_type(L, 2) != LUA_TSTRING)
        return 1;
    const char *k = lua_tostring(L, 2);
    struct sess *s = live(L, x);
    sync_msg(L, x, s);
    if (strcmp(k, "msg") == 0 || strcmp(k, "conn") == 0) {
        env_table(L, k);
    } else if (strcmp(k, "id") == 0) {
        char id[24];
        snprintf(id, sizeof id, "%llu", (unsigned long long)s->id);
        lua_pushstring(L, id);
    } else if (strcmp(k, "sender") == 0 && s->has_sender) {
        push_mstr(L, s, s->sender);
    } else if (strcmp(k, "rcpts") == 0) {
        push_rcpts(L, x, s);
    } else if (strcmp(k, "headers") == 0) {
        push_headers(L, x, s);
    } else if (strcmp(k, "helo") == 0 && s->has_helo) {
        lua_pushlstring(L, sess_cstr(s, s->helo, 0), s->helo.len);
    } else if (strcmp(k, "client") == 0 && s->family) {
        push_client(L, s);
    } else if (strcmp(k, "truncated") == 0) {
        lua_pushboolean(L, s->truncated);
    } else {
        lua_pushnil(L);
    }
    return 1;
}

static int ctx_newindex(lua_State *L)
{
    return luaL_error(L, "ctx.%s is read-only: keep your data in ctx.conn or "
                         "ctx.msg",
                      lua_tostring(L, 2) ? lua_tostring(L, 2) : "?");
}

static int ctx_macro(lua_State *L)
{
    struct sess *s = live(L, check_ctx(L));
    size_t n, vlen;
    const char *name = luaL_checklstring(L, 2, &n);
    const char *v = sess_macro(s, name, n, &vlen);
    if (v)
        lua_pushlstring(L, v, vlen);
    else
        lua_pushnil(L);
    return 1;
}

static int ctx_header(lua_State *L)
{
    struct sess *s = live(L, check_ctx(L));
    size_t n;
    const char *name = luaL_checklstring(L, 2, &n);
    lua_Integer nth = luaL_optinteger(L, 3, 1);
    for (uint32_t i = 0; i < s->nhdrs && nth > 0; i++) {
        struct sess_hdr *h = &s->hdrs[i];
        if (h->name.len == n &&
            strncasecmp(sess_cstr(s, h->name, 1), name, n) == 0 && --nth == 0) {
            push_mstr(L, s, h->value);
            return 1;
        }
    }
    lua_pushnil(L);
    return 1;
}

int lctx_log(lua_State *L, uint64_t cid, const char *qid, int first)
{
    int level;
    if (log_parse_level(luaL_checkstring(L, first), &level) < 0)
        return luaL_argerror(L, first,
                             "level must be error, warn, info or debug");
    if (!log_enabled(level))
        return 0;
    lua_Debug ar;
    char where[300] = "";
    if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "Sl", &ar))
        snprintf(where, sizeof where, "%s:%d: ", ar.short_src, ar.currentline);
    int top = lua_gettop(L), pieces = 0;
    luaL_checkstack(L, 2 * (top - first) + 4, "too many values to log");
    lua_getglobal(L, "tostring");
    for (int i = first + 1; i <= top; i++) {
        if (i > first + 1) {
            lua_pushliteral(L, " ");
            pieces++;
        }
        lua_pushvalue(L, top + 1);
        lua_pushvalue(L, i);
        lua_call(L, 1, 1);
        pieces++;
    }
    lua_concat(L, pieces);
    log_msg(level, cid, qid, "[lua] %s%s", where, lua_tostring(L, -1));
    return 0;
}

static int ctx_log(lua_State *L)
{
    struct sess *s = live(L, check_ctx(L));
    return lctx_log(L, s->id, sess_qid(s), 2);
}

static int ctx_tostring(lua_State *L)
{
    struct lctx *x = check_ctx(L);
    if (x->s)
        lua_pushfstring(L, "milter.ctx(%d)", (int)x->s->id);
    else
        lua_pushliteral(L, "milter.ctx(closed)");
    return 1;
}

void lctx_register(lua_State *L)
{
    static const luaL_Reg methods[] = {{"macro", ctx_macro},
                                       {"header", ctx_header},
                                       {"log", ctx_log},
                                       {NULL, NULL}};
    luaL_newmetatable(L, CTX_MT);
    lua_newtable(L);
    for (const luaL_Reg *m = methods; m->name; m++) {
        lua_pushcfunction(L, m->func);
        lua_setfield(L, -2, m->name);
    }
    lua_pushcclosure(L, ctx_index, 1);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, ctx_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushcfunction(L, ctx_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, "milter.ctx");
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 1);
}

struct lctx *lctx_push(lua_State *L, struct sess *s)
{
    struct lctx *x = lua_newuserdata(L, sizeof *x);
    memset(x, 0, sizeof *x);
    x->s = s;
    x->conn_seq = s->conn_seq;
    x->msg_seq = s->msg_seq;
    luaL_getmetatable(L, CTX_MT);
    lua_setmetatable(L, -2);
    lua_createtable(L, 0, 4);
    lua_setfenv(L, -2);
    return x;
}
