/*
 * lctx: the ctx handed to every handler (part of the Lua bridge).
 *
 * ctx is a plain Lua table, so the hot fields cost a table lookup that the
 * JIT compiles: ctx.conn, ctx.msg (replaced when a message starts, see
 * lctx_sync), ctx.id and the methods. Everything else (sender, rcpts,
 * headers, helo, client, truncated) is absent from the table and served by
 * __index from the C session: client, sender and helo by a Lua __index
 * through the ffi (compiled into the handler's trace; client then kept in
 * ctx), the rest by a C __index, with rcpts and headers built
 * incrementally and cached.
 *
 * The functions are the same for every connection (made once per state:
 * a connection allocates no closure); they find the connection's C block
 * in ctx's metatable, which is protected, so a script cannot forge one.
 * When the session ends (lctx_detach) the fields are cleared and the
 * block's session pointer is NULLed, so any later use raises instead of
 * touching freed memory.
 */
#include "lb_int.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "log.h"

/*
 * ctx's metatable: [1] the connection's C block (a userdata whose
 * environment, once a view was asked for, holds the cached rcpts and
 * headers tables), [2] &ctx_tag, which no script can make: a table that
 * merely claims to be a ctx has no such key.
 */
static char ctx_tag;

static struct sess *live(lua_State *L, struct lctx *x)
{
    if (!x->s)
        luaL_error(L, "ctx used after its connection closed");
    return x->s;
}

/* Pushes the block of the ctx at index i; raises for anything else. */
static struct lctx *push_block_of(lua_State *L, int i)
{
    struct lctx *x = NULL;
    if (lua_getmetatable(L, i)) {
        lua_rawgeti(L, -1, 2);
        int ours = lua_touserdata(L, -1) == (void *)&ctx_tag;
        lua_pop(L, 1);
        if (ours) {
            lua_rawgeti(L, -1, 1);
            x = lua_touserdata(L, -1);
        }
        lua_remove(L, x ? -2 : -1);
    }
    if (!x)
        luaL_error(L, "not a ctx (call its methods as ctx:name(...))");
    return x;
}

/* The block of self (argument 1), pushing nothing. */
static struct lctx *block(lua_State *L)
{
    struct lctx *x = push_block_of(L, 1);
    lua_pop(L, 1);
    return x;
}

/* Pushes cache[key] (the block's environment, made by the first view a
 * connection asks for), creating an empty table. */
static void cache_table(lua_State *L, struct lctx *x, const char *key)
{
    push_block_of(L, 1);
    if (!x->has_env) {
        lua_createtable(L, 0, 2);
        lua_setfenv(L, -2);
        x->has_env = 1;
    }
    lua_getfenv(L, -1);
    lua_remove(L, -2);
    lua_getfield(L, -1, key);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, key);
    }
    lua_remove(L, -2);
}

static void push_mstr(lua_State *L, const struct sess *s, struct sess_str v)
{
    lua_pushlstring(L, sess_cstr(s, v, 1), v.len);
}

static void push_rcpts(lua_State *L, struct lctx *x, const struct sess *s)
{
    if (x->rcpts_dropped != s->rcpts_dropped) {
        /* a recipient was refused: the view starts again */
        if (x->has_env) {
            push_block_of(L, 1);
            lua_getfenv(L, -1);
            lua_pushnil(L);
            lua_setfield(L, -2, "rcpts");
            lua_pop(L, 2);
        }
        x->nrcpts = 0;
        x->rcpts_dropped = s->rcpts_dropped;
    }
    cache_table(L, x, "rcpts");
    for (; x->nrcpts < s->nrcpts; x->nrcpts++) {
        push_mstr(L, s, s->rcpts[x->nrcpts]);
        lua_rawseti(L, -2, (int)x->nrcpts + 1);
    }
}

static void push_headers(lua_State *L, struct lctx *x, const struct sess *s)
{
    cache_table(L, x, "headers");
    for (; x->nhdrs < s->hdrs_run; x->nhdrs++) {
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
    lua_createtable(L, 0, 4);
    lua_pushlstring(L, sess_cstr(s, s->host, 0), s->host.len);
    lua_setfield(L, -2, "host");
    lua_pushstring(L, lb_family_name(s->family));
    lua_setfield(L, -2, "family");
    if (s->family != 'U') {
        lua_pushlstring(L, sess_cstr(s, s->addr, 0), s->addr.len);
        lua_setfield(L, -2, "address");
        lua_pushinteger(L, s->port);
        lua_setfield(L, -2, "port");
    }
}

/* __index: the fields that live in the C session. */
static int ctx_index(lua_State *L)
{
    struct lctx *x = block(L);
    struct sess *s = live(L, x);
    const char *k = lua_tostring(L, 2);
    if (!k || lua_type(L, 2) != LUA_TSTRING) {
        lua_pushnil(L);
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
        lua_pushliteral(L, "client"); /* fixed for the session: cache it */
        lua_pushvalue(L, -2);
        lua_rawset(L, 1);
    } else if (strcmp(k, "truncated") == 0) {
        lua_pushboolean(L, s->truncated);
    } else {
        lua_pushnil(L);
    }
    return 1;
}

static int ctx_newindex(lua_State *L)
{
    live(L, block(L));
    return luaL_error(L, "ctx.%s is read-only: keep your data in ctx.conn or "
                         "ctx.msg",
                      lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2)
                                                    : "?");
}

static int ctx_macro(lua_State *L)
{
    struct sess *s = live(L, block(L));
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
    struct sess *s = live(L, block(L));
    size_t n;
    const char *name = luaL_checklstring(L, 2, &n);
    lua_Integer nth = luaL_optinteger(L, 3, 1);
    for (uint32_t i = 0; i < s->hdrs_run && nth > 0; i++) {
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

/* Fields one ctx:log line takes from its tables, at most. */
#define LOG_FIELDS_MAX 256

/*
 * Collects the fields of the table at t into the (new) table on top of L
 * as an array of {key string, value} pairs, sorted by key; raises only
 * through tostring (a value's __tostring), holding no C memory.
 */
static void table_fields(lua_State *L, int t, int out, int *count)
{
    lua_newtable(L); /* vals: key string -> value */
    int vals = lua_gettop(L);
    lua_newtable(L); /* the key strings, to sort */
    int keys = lua_gettop(L);
    int n = 0;
    lua_pushnil(L);
    while (lua_next(L, t) && *count + n < LOG_FIELDS_MAX) {
        int kt = lua_type(L, -2);
        if (kt != LUA_TSTRING && kt != LUA_TNUMBER) {
            lua_pop(L, 1);
            continue;
        }
        lua_pushvalue(L, -2);
        if (kt == LUA_TNUMBER) { /* lua_tostring would change the key */
            lb_push_std(L, LB_TOSTRING);
            lua_insert(L, -2);
            lua_call(L, 1, 1);
        }
        lua_pushvalue(L, -1);
        lua_rawseti(L, keys, ++n);
        lua_insert(L, -2); /* key string, value */
        lua_rawset(L, vals);
    }
    if (*count + n >= LOG_FIELDS_MAX)
        lua_settop(L, keys);
    lb_push_std(L, LB_SORT);
    lua_pushvalue(L, keys);
    lua_call(L, 1, 0);
    for (int i = 1; i <= n; i++) {
        lua_createtable(L, 2, 0);
        lua_rawgeti(L, keys, i);
        lua_pushvalue(L, -1);
        lua_rawget(L, vals);
        int vt = lua_type(L, -1);
        if (vt != LUA_TSTRING && vt != LUA_TNUMBER && vt != LUA_TBOOLEAN) {
            lb_push_std(L, LB_TOSTRING);
            lua_insert(L, -2);
            lua_call(L, 1, 1);
        }
        lua_rawseti(L, -3, 2);
        lua_rawseti(L, -2, 1);
        lua_rawseti(L, out, ++*count);
    }
    lua_settop(L, vals - 1);
}

/* Logs text with the fields of the tables among the arguments. */
static void log_with_fields(lua_State *L, int level, uint64_t cid,
                            const char *qid, const char *text, int first,
                            int top)
{
    lua_newtable(L);
    int out = lua_gettop(L);
    int n = 0;
    for (int i = first + 1; i <= top; i++)
        if (lua_type(L, i) == LUA_TTABLE)
            table_fields(L, i, out, &n);
    struct log_field *f =
        lua_newuserdata(L, (size_t)(n ? n : 1) * sizeof *f);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, out, i + 1); /* stays on the stack: anchors */
        lua_rawgeti(L, -1, 1);
        lua_rawgeti(L, -2, 2);
        struct log_field *x = &f[i];
        memset(x, 0, sizeof *x);
        x->key = lua_tostring(L, -2);
        switch (lua_type(L, -1)) {
        case LUA_TBOOLEAN:
            x->type = LF_BOOL;
            x->i = lua_toboolean(L, -1);
            break;
        case LUA_TNUMBER:
            x->type = LF_NUM;
            x->num = lua_tonumber(L, -1);
            break;
        default:
            x->type = LF_STR;
            x->s = lua_tolstring(L, -1, &x->n);
            break;
        }
        lua_pop(L, 1); /* the value stays in its pair */
        lua_pop(L, 1);
    }
    log_fields(level, cid, qid, text, f, (size_t)n);
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
    int top = lua_gettop(L), pieces = 0, tables = 0;
    luaL_checkstack(L, 2 * (top - first) + 4, "too many values to log");
    lb_push_std(L, LB_TOSTRING);
    for (int i = first + 1; i <= top; i++) {
        if (lua_type(L, i) == LUA_TTABLE) { /* its fields, not its address */
            tables++;
            continue;
        }
        if (pieces) {
            lua_pushliteral(L, " ");
            pieces++;
        }
        lua_pushvalue(L, top + 1);
        lua_pushvalue(L, i);
        lua_call(L, 1, 1);
        pieces++;
    }
    if (pieces)
        lua_concat(L, pieces);
    else
        lua_pushliteral(L, "");
    if (!tables) {
        log_msg(level, cid, qid, "[lua] %s%s", where, lua_tostring(L, -1));
        return 0;
    }
    lua_pushfstring(L, "[lua] %s%s", where, lua_tostring(L, -1));
    size_t len;
    const char *text = lua_tolstring(L, -1, &len);
    /* "[lua] file:12: " with no text: no trailing blank before the fields */
    if (len && text[len - 1] == ' ') {
        lua_pushlstring(L, text, len - 1);
        text = lua_tostring(L, -1);
    }
    log_with_fields(L, level, cid, qid, text, first, top);
    return 0;
}

static int ctx_log(lua_State *L)
{
    struct sess *s = live(L, block(L));
    return lctx_log(L, s->id, sess_qid(s), 2);
}

static int ctx_tostring(lua_State *L)
{
    struct lctx *x = block(L);
    if (x->s)
        lua_pushfstring(L, "milter.ctx(%d)", (int)x->s->id);
    else
        lua_pushliteral(L, "milter.ctx(closed)");
    return 1;
}

/*
 * What the ffi getter gives the Lua __index below: borrowed pointers into
 * the session, valid until the next call into C (the caller makes its
 * strings at once). Fields: 0 client (host; address, NULL for family U;
 * family's name; port), 1 sender, 2 helo (p1, n1).
 */
struct lctx_field {
    const char *p1;
    size_t n1;
    const char *p2;
    size_t n2;
    const char *family;
    int port;
};

/*
 * Field which of the ctx whose id is id, or NULL where the C __index is to
 * answer (a closed ctx, a field not set, a ctx other than the running
 * handler's). Called through the ffi, so that reading ctx.client or
 * ctx.sender stays in the JIT's trace, where a C __index ended it (about
 * 4,300 instructions for a connection's first ctx.client): it uses no Lua
 * API.
 * The ctx is found by its id, the running connection's: a script cannot
 * reach this __index with a table of its own (the metatable is
 * protected), and a closed ctx has no id.
 */
static const struct lctx_field *ffi_field(const char *id, int which)
{
    static struct lctx_field f; /* one worker thread */
    const struct lctx *x = lb_running ? lb_running->ctx : NULL;
    const struct sess *s = x ? x->s : NULL;
    if (!s || !id)
        return NULL;
    uint64_t n = 0;
    for (const char *p = id; *p >= '0' && *p <= '9'; p++)
        n = n * 10 + (uint64_t)(*p - '0');
    if (n != s->id)
        return NULL;
    if (which == 0 && s->family) {
        f = (struct lctx_field){
            sess_cstr(s, s->host, 0), s->host.len,
            s->family == 'U' ? NULL : sess_cstr(s, s->addr, 0), s->addr.len,
            lb_family_name(s->family), s->port};
    } else if (which == 1 && s->has_sender) {
        f.p1 = sess_cstr(s, s->sender, 1);
        f.n1 = s->sender.len;
    } else if (which == 2 && s->has_helo) {
        f.p1 = sess_cstr(s, s->helo, 0);
        f.n1 = s->helo.len;
    } else {
        return NULL;
    }
    return &f;
}

/*
 * The functions that build a ctx with its metatable and clear it, made
 * once per state and kept in the registry under &ctx_tag. A ctx comes
 * from table constructors, which LuaJIT duplicates from a template with
 * the keys in place, where a lua_setfield per key (interning it, then
 * inserting it) cost ten times as much: 11,000 to about 4,000
 * instructions per connection. They read no global (a script may have
 * replaced any), only the functions every ctx shares, given here: a
 * connection allocates no closure. With the ffi, client, sender and helo
 * are read by a Lua __index through ffi_field; the rest, and whatever
 * ffi_field leaves, goes to the C __index. The clear function empties a
 * ctx's own fields: they then reach __index, which raises.
 */
static const char make_src[] =
    "local macro, header, log, cindex, newindex, tostr, tag, ffi, field,\n"
    "      rawset, rawget = ...\n"
    "local index = cindex\n"
    "if ffi then\n"
    "  local fp = ffi.typeof('const struct { const char *p1; size_t n1;"
    " const char *p2; size_t n2; const char *family; int port; } *')\n"
    "  local get = ffi.cast(ffi.typeof('$ (*)(const char *, int)', fp), field)\n"
    "  local str = ffi.string\n"
    "  index = function(ctx, k)\n"
    "    if k == 'client' then\n"
    "      local f = get(rawget(ctx, 'id'), 0)\n"
    "      if f == nil then return cindex(ctx, k) end\n"
    "      local c\n" /* one constructor each: keys added later rehash */
    "      if f.p2 == nil then\n" /* family U has no address */
    "        c = { host = str(f.p1, f.n1), family = str(f.family) }\n"
    "      else\n"
    "        c = { host = str(f.p1, f.n1), family = str(f.family),\n"
    "              address = str(f.p2, f.n2), port = f.port }\n"
    "      end\n"
    "      rawset(ctx, 'client', c)\n" /* fixed for the session */
    "      return c\n"
    "    elseif k == 'sender' or k == 'helo' then\n"
    "      local f = get(rawget(ctx, 'id'), k == 'sender' and 1 or 2)\n"
    "      if f == nil then return cindex(ctx, k) end\n"
    "      return str(f.p1, f.n1)\n"
    "    end\n"
    "    return cindex(ctx, k)\n"
    "  end\n"
    "end\n"
    "return function(block, id)\n"
    "  return { conn = {}, msg = {}, id = id, macro = macro, header = header,\n"
    "           log = log },\n"
    "         { block, tag, __index = index, __newindex = newindex,\n"
    "           __tostring = tostr, __metatable = \"milter.ctx\" }\n"
    "end, function(ctx)\n"
    "  rawset(ctx, 'conn', nil) rawset(ctx, 'msg', nil)\n"
    "  rawset(ctx, 'id', nil) rawset(ctx, 'client', nil)\n"
    "end\n";

static char clear_tag;
/* registry[&msg_tag]: the registry ref of the string "msg", which
 * lctx_sync pushes for every message (interning it cost 220 instructions) */
static char msg_tag;

/* Pushes the make function (the clear one is kept under &clear_tag). */
static void push_make(lua_State *L)
{
    lua_pushlightuserdata(L, &ctx_tag);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (!lua_isnil(L, -1))
        return;
    lua_pop(L, 1);
    static const lua_CFunction fns[] = {ctx_macro,    ctx_header,
                                        ctx_log,      ctx_index,
                                        ctx_newindex, ctx_tostring};
    int n = (int)(sizeof fns / sizeof fns[0]);
    if (luaL_loadbuffer(L, make_src, sizeof make_src - 1, "=luamilter ctx"))
        lua_error(L); /* out of memory: the source itself is fixed */
    for (int i = 0; i < n; i++)
        lua_pushcfunction(L, fns[i]);
    lua_pushlightuserdata(L, &ctx_tag);
    lb_push_std(L, LB_FFI);
    const struct lctx_field *(*fn)(const char *, int) = ffi_field;
    void *p;
    memcpy(&p, &fn, sizeof p); /* a function's address, for ffi.cast */
    lua_pushlightuserdata(L, p);
    lb_push_std(L, LB_RAWSET);
    lb_push_std(L, LB_RAWGET);
    lua_call(L, n + 5, 2);
    lua_pushlightuserdata(L, &clear_tag);
    lua_insert(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_pushlightuserdata(L, &msg_tag);
    lua_pushliteral(L, "msg");
    lua_pushinteger(L, luaL_ref(L, LUA_REGISTRYINDEX));
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_pushlightuserdata(L, &ctx_tag);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

struct lctx *lctx_push(lua_State *L, struct sess *s)
{
    push_make(L);
    struct lctx *x = lua_newuserdata(L, sizeof *x);
    memset(x, 0, sizeof *x);
    x->s = s;
    x->conn_seq = s->conn_seq;
    x->msg_seq = s->msg_seq;
    lua_pushlightuserdata(L, &msg_tag);
    lua_rawget(L, LUA_REGISTRYINDEX);
    x->msg_key = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    char id[24], *end = id + sizeof id;
    const char *p = log_digits(end, s->id);
    lua_pushlstring(L, p, (size_t)(end - p)); /* ctx.id */
    lua_call(L, 2, 2);         /* the ctx table and its metatable */
    lua_setmetatable(L, -2);   /* leaves the ctx table on top */
    return x;
}

void lctx_sync(lua_State *L, int idx, struct lctx *x)
{
    const struct sess *s = x->s;
    if (x->msg_seq == s->msg_seq)
        return;
    x->msg_seq = s->msg_seq; /* a new message: fresh msg and views */
    x->nrcpts = x->nhdrs = 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->msg_key);
    /* room for a policy's few per-message fields: a table made empty
     * grows its hash part at the first, second and third key, a rehash
     * each time (about 1,000 instructions per bench message) */
    lua_createtable(L, 0, 4);
    lua_rawset(L, idx);
    if (!x->has_env)
        return; /* no view was asked for yet */
    push_block_of(L, idx);
    lua_getfenv(L, -1);
    lua_pushnil(L);
    lua_setfield(L, -2, "rcpts");
    lua_pushnil(L);
    lua_setfield(L, -2, "headers");
    lua_pop(L, 2);
}

void lctx_detach(lua_State *L, int idx, struct lctx *x)
{
    x->s = NULL;
    if (idx < 0)
        idx = lua_gettop(L) + idx + 1;
    lua_pushlightuserdata(L, &clear_tag);
    lua_rawget(L, LUA_REGISTRYINDEX); /* made with the ctx, by push_make */
    lua_pushvalue(L, idx);
    lua_call(L, 1, 0); /* assignments of nil: cannot fail */
}
