/*
 * lhttp: milter.http.request (part of the Lua bridge), on the httpc
 * engine. A response of any status is a result; a failure to get one
 * (timeout, refused, TLS, too large) is nil, err; misuse raises.
 */
#include "lb_int.h"
#include "metrics.h"

#include <ctype.h>
#include <string.h>

#include "httpc.h"

#define WHAT "milter.http.request"
#define DEFAULT_TIMEOUT 5.0
#define DEFAULT_MAX_BODY (16u << 20)
#define MAX_MAX_BODY (1u << 30)
#define DEFAULT_FOLLOW 5
#define MAX_FOLLOW 20

static const char *const keys[] = {"url",    "method",   "headers", "body",
                                   "timeout", "cafile",  "verify",  "follow",
                                   "max_body", "proxy",  NULL};

/* The response (or nil, err), pushed onto the waiting coroutine. */
static void answered(void *ud, const struct httpc_resp *r)
{
    struct lb_conn *lc = ud;
    lua_State *co = lc->co;
    lua_checkstack(co, 8);
    if (r->err) {
        lua_pushnil(co);
        lua_pushstring(co, r->err);
        lwait_complete(lc, 2);
        return;
    }
    lua_createtable(co, 0, 3);
    lua_pushinteger(co, (lua_Integer)r->status);
    lua_setfield(co, -2, "status");
    lua_createtable(co, 0, (int)r->nh);
    for (size_t i = 0; i < r->nh; i++) {
        const struct httpc_header *h = &r->h[i];
        lua_pushlstring(co, h->name, h->nlen);
        lua_pushvalue(co, -1);
        lua_rawget(co, -3);
        if (lua_isstring(co, -1)) { /* repeated: values joined by ", " */
            lua_pushliteral(co, ", ");
            lua_pushlstring(co, h->value, h->vlen);
            lua_concat(co, 3);
        } else {
            lua_pop(co, 1);
            lua_pushlstring(co, h->value, h->vlen);
        }
        lua_rawset(co, -3);
    }
    lua_setfield(co, -2, "headers");
    lua_pushlstring(co, r->body, r->len);
    lua_setfield(co, -2, "body");
    lwait_complete(lc, 1);
}

static void cancel(void *op) { httpc_cancel(op); }

/* Raises unless the table at 1 has only known keys. */
static void check_keys(lua_State *L)
{
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        lua_pop(L, 1);
        const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1)
                                                       : NULL;
        int i = 0;
        while (k && keys[i] && strcmp(k, keys[i]) != 0)
            i++;
        if (!k || !keys[i])
            luaL_error(L, WHAT ": unknown option %s",
                       k ? k : luaL_typename(L, -1));
    }
}

/* Field k of the options: a string or nil; raises for anything else. */
static const char *opt_string(lua_State *L, const char *k, size_t *len)
{
    lua_getfield(L, 1, k);
    int t = lua_type(L, -1);
    lua_pop(L, 1); /* the table keeps the string alive */
    if (t == LUA_TNIL)
        return NULL;
    if (t != LUA_TSTRING)
        luaL_error(L, WHAT ": %s must be a string", k);
    lua_getfield(L, 1, k);
    const char *s = lua_tolstring(L, -1, len);
    lua_pop(L, 1);
    return s;
}

static int is_token(const char *s, size_t n)
{
    if (!n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && !strchr("!#$%&'*+.^_`|~-", s[i]))
            return 0;
    return 1;
}

/* Appends "name: value" for the value on top (popped) to the lines
 * table at index lines; raises for a bad value. */
static void add_line(lua_State *L, int lines, const char *name, size_t *n)
{
    size_t vl;
    int t = lua_type(L, -1);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
        luaL_error(L, WHAT ": header %s: a value must be a string, a number "
                      "or a list of them", name);
    const char *v = lua_tolstring(L, -1, &vl);
    if (strlen(v) != vl || strpbrk(v, "\r\n"))
        luaL_error(L, WHAT ": header %s: a value may not contain CR, LF or "
                      "NUL", name);
    /* "Name;" is libcurl's spelling of a header with no value ("Name:"
     * would remove it) */
    if (vl)
        lua_pushfstring(L, "%s: %s", name, v);
    else
        lua_pushfstring(L, "%s;", name);
    lua_rawseti(L, lines, (int)++*n);
    lua_pop(L, 1);
}

/*
 * headers = {Name = value or {value, ...}}: pushes a table of "Name:
 * value" lines (anchoring them) and a userdata array of pointers to them;
 * a list gives the header once per value. Raises for a bad name or value.
 * Returns the count.
 */
static size_t push_headers(lua_State *L, const char ***out)
{
    lua_getfield(L, 1, "headers");
    int given = lua_gettop(L);
    if (!lua_isnil(L, given) && !lua_istable(L, given))
        luaL_error(L, WHAT ": headers must be a table of name = value");
    lua_newtable(L);
    int lines = lua_gettop(L);
    size_t n = 0;
    if (lua_istable(L, given)) {
        lua_pushnil(L);
        while (lua_next(L, given)) {
            size_t nl;
            if (lua_type(L, -2) != LUA_TSTRING)
                luaL_error(L, WHAT ": headers must be a table of name = "
                              "value");
            const char *name = lua_tolstring(L, -2, &nl);
            if (!is_token(name, nl))
                luaL_error(L, WHAT ": bad header name '%s'", name);
            if (lua_istable(L, -1)) {
                int k = (int)lua_objlen(L, -1);
                for (int i = 1; i <= k; i++) {
                    lua_rawgeti(L, -1, i);
                    add_line(L, lines, name, &n);
                }
                lua_pop(L, 1);
            } else {
                add_line(L, lines, name, &n);
            }
        }
    }
    lua_remove(L, given); /* the lines table stays */
    const char **a = lua_newuserdata(L, (n ? n : 1) * sizeof *a);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, -2, (int)i + 1);
        a[i] = lua_tostring(L, -1);
        lua_pop(L, 1);
    }
    *out = a;
    return n;
}

/* milter.http.request{url=, method=, headers=, body=, timeout=, ...} */
static int l_request(lua_State *L)
{
    struct lb_conn *lc = lwait_current(L, WHAT);
    luaL_checktype(L, 1, LUA_TTABLE);
    check_keys(L);
    struct httpc_opts o;
    memset(&o, 0, sizeof o);
    if (!(o.url = opt_string(L, "url", NULL)))
        luaL_error(L, WHAT ": url is required");
    const char *why = httpc_check_url(o.url);
    if (why)
        luaL_error(L, WHAT ": %s: %s", why, o.url);
    o.body = opt_string(L, "body", &o.body_len);

    char method[33];
    size_t ml;
    const char *m = opt_string(L, "method", &ml);
    if (!m)
        m = o.body ? "POST" : "GET", ml = strlen(m);
    if (ml >= sizeof method || !is_token(m, ml))
        luaL_error(L, WHAT ": bad method");
    for (size_t i = 0; i <= ml; i++)
        method[i] = (char)toupper((unsigned char)m[i]);
    o.method = method;
    if (o.body && strcmp(method, "HEAD") == 0)
        luaL_error(L, WHAT ": a HEAD request has no body");

    o.cafile = opt_string(L, "cafile", NULL);
    o.proxy = opt_string(L, "proxy", NULL);
    lua_getfield(L, 1, "verify");
    if (!lua_isnil(L, -1) && !lua_isboolean(L, -1))
        luaL_error(L, WHAT ": verify must be a boolean");
    o.verify = lua_isnil(L, -1) || lua_toboolean(L, -1);
    lua_getfield(L, 1, "follow");
    if (lua_isboolean(L, -1)) {
        o.follow = lua_toboolean(L, -1) ? DEFAULT_FOLLOW : 0;
    } else if (lua_type(L, -1) == LUA_TNUMBER) {
        lua_Number f = lua_tonumber(L, -1);
        if (!(f >= 0 && f <= MAX_FOLLOW) || f != (lua_Number)(long)f)
            luaL_error(L, WHAT ": follow must be a boolean or 0 to %d",
                       MAX_FOLLOW);
        o.follow = (long)f;
    } else if (!lua_isnil(L, -1)) {
        luaL_error(L, WHAT ": follow must be a boolean or a number");
    }
    lua_getfield(L, 1, "max_body");
    o.max_body = DEFAULT_MAX_BODY;
    if (lua_type(L, -1) == LUA_TNUMBER) {
        lua_Number b = lua_tonumber(L, -1);
        if (!(b >= 0 && b <= MAX_MAX_BODY) || b != (lua_Number)(size_t)b)
            luaL_error(L, WHAT ": max_body must be 0 to %d bytes",
                       (int)MAX_MAX_BODY);
        o.max_body = (size_t)b;
    } else if (!lua_isnil(L, -1)) {
        luaL_error(L, WHAT ": max_body must be a number of bytes");
    }
    lua_pop(L, 3);
    double timeout = lwait_cap(lc, lwait_opt_timeout(L, 1, DEFAULT_TIMEOUT));
    o.nheaders = push_headers(L, (const char ***)&o.headers);
    if (timeout <= 0)
        return lwait_fail(L, "timeout");
    o.timeout = timeout;
    const char *err;
    struct httpc_req *r = httpc_request(&o, answered, lc, &err);
    if (!r)
        return lwait_fail(L, err);
    return lwait_suspend(L, lc, MK_HTTP, r, cancel);
}

void lhttp_open(lua_State *L)
{
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, l_request);
    lua_setfield(L, -2, "request");
    lua_setfield(L, -2, "http");
}
