/*
 * ltcp: milter.tcp.connect and its socket object (part of the Lua bridge),
 * on the tcpc engine. A socket belongs to the handler call that opened it:
 * it is closed when that call ends, however it ends.
 */
#include "lb_int.h"
#include "metrics.h"

#include <string.h>

#include "tcpc.h"

#define SOCK_MT "milter.tcp"
#define DEFAULT_TIMEOUT 5.0

struct lsock {
    struct tcpc *t;       /* NULL once closed */
    struct lb_conn *lc;   /* the connection whose handler opened it */
    double timeout;       /* default of its calls */
    int ref;              /* registry ref while connecting: the yield drops
                             the C function's stack, so the completion
                             pushes the socket from here */
    struct lsock *next, **pprev; /* lc->socks */
};

static void unlink_sock(struct lsock *s)
{
    if (s->pprev) {
        *s->pprev = s->next;
        if (s->next)
            s->next->pprev = s->pprev;
    }
    s->next = NULL;
    s->pprev = NULL;
}

static void close_sock(struct lsock *s)
{
    tcpc_close(s->t);
    s->t = NULL;
    unlink_sock(s);
}

void ltcp_close_all(struct lb_conn *lc)
{
    while (lc->socks)
        close_sock(lc->socks);
}

/* The result of an operation, pushed onto the waiting coroutine. */
static void finished(void *ud, const char *err, const char *data, size_t len)
{
    struct lsock *s = ud;
    struct lb_conn *lc = s->lc;
    lua_State *co = lc->co;
    if (lc->wait.flags == 1) { /* connect: the socket, or nil, err */
        int ref = s->ref;
        s->ref = LUA_NOREF;
        if (err) {
            close_sock(s);
            lua_pushnil(co);
            lua_pushstring(co, err);
            luaL_unref(co, LUA_REGISTRYINDEX, ref);
            lwait_complete(lc, 2);
        } else {
            lua_rawgeti(co, LUA_REGISTRYINDEX, ref);
            luaL_unref(co, LUA_REGISTRYINDEX, ref);
            lwait_complete(lc, 1);
        }
        return;
    }
    if (err) {
        lua_pushnil(co);
        lua_pushstring(co, err);
        if (data && len) { /* what a failed receive got before it ended */
            lua_pushlstring(co, data, len);
            lwait_complete(lc, 3);
        } else {
            lwait_complete(lc, 2);
        }
        return;
    }
    if (lc->wait.flags == 2) /* send: the bytes sent */
        lua_pushinteger(co, (lua_Integer)lc->wait.count);
    else
        lua_pushlstring(co, data ? data : "", len);
    lwait_complete(lc, 1);
}

static void cancel(void *op)
{
    struct lsock *s = op;
    tcpc_cancel(s->t);
    if (s->ref != LUA_NOREF) { /* abandoned while connecting */
        luaL_unref(s->lc->st->L, LUA_REGISTRYINDEX, s->ref);
        s->ref = LUA_NOREF;
    }
}

static struct lsock *check_open(lua_State *L)
{
    struct lsock *s = luaL_checkudata(L, 1, SOCK_MT);
    if (!s->t)
        luaL_error(L, "milter.tcp: the socket is closed");
    return s;
}

/* milter.tcp.connect(host, port [, opts]) or ("unix:/path" [, opts]) */
static int l_connect(lua_State *L)
{
    struct lb_conn *lc = lwait_current(L, "milter.tcp.connect");
    const char *host = luaL_checkstring(L, 1);
    int unix = strncmp(host, "unix:", 5) == 0;
    int port = 0, oi = 2;
    if (!unix) {
        lua_Number p = luaL_checknumber(L, 2);
        if (!(p >= 1 && p <= 65535) || p != (lua_Number)(int)p)
            return luaL_argerror(L, 2, "port must be 1 to 65535");
        port = (int)p;
        oi = 3;
    }
    double given = lwait_opt_timeout(L, oi, DEFAULT_TIMEOUT);
    double timeout = lwait_cap(lc, given);
    if (timeout <= 0)
        return lwait_fail(L, "timeout");
    struct lsock *s = lua_newuserdata(L, sizeof *s);
    memset(s, 0, sizeof *s);
    luaL_getmetatable(L, SOCK_MT);
    lua_setmetatable(L, -2);
    s->lc = lc;
    s->timeout = given; /* the default of its later calls */
    s->ref = LUA_NOREF;
    const char *err;
    s->t = tcpc_connect(host, port, timeout, finished, s, &err);
    if (!s->t)
        return lwait_fail(L, err);
    lua_pushvalue(L, -1);
    s->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    s->next = lc->socks;
    if (s->next)
        s->next->pprev = &s->next;
    s->pprev = &lc->socks;
    lc->socks = s;
    lc->wait.flags = 1;
    return lwait_suspend(L, lc, MK_TCP, s, cancel);
}

/* sock:send(data [, timeout]) -> bytes sent | nil, err */
static int l_send(lua_State *L)
{
    struct lsock *s = check_open(L);
    struct lb_conn *lc = lwait_current(L, "sock:send");
    size_t n;
    const char *data = luaL_checklstring(L, 2, &n);
    double timeout = lwait_timeout(L, lc, 3, s->timeout);
    if (timeout <= 0)
        return lwait_fail(L, "timeout");
    s->lc = lc;
    lc->wait.flags = 2;
    lc->wait.count = n;
    if (tcpc_send(s->t, data, n, timeout, finished, s) < 0)
        return luaL_error(L, "sock:send: another call on it is pending");
    return lwait_suspend(L, lc, MK_TCP, s, cancel);
}

/* sock:receive("*l" | "*a" | n [, timeout]) -> data | nil, err, partial */
static int l_receive(lua_State *L)
{
    struct lsock *s = check_open(L);
    struct lb_conn *lc = lwait_current(L, "sock:receive");
    int mode = TCPC_LINE;
    size_t want = 0;
    if (lua_type(L, 2) == LUA_TNUMBER) {
        lua_Number n = lua_tonumber(L, 2);
        if (!(n >= 0 && n <= (64 << 20)) || n != (lua_Number)(size_t)n)
            return luaL_argerror(L, 2, "a byte count from 0 to 64 MiB");
        mode = TCPC_BYTES;
        want = (size_t)n;
    } else if (!lua_isnoneornil(L, 2)) {
        const char *p = luaL_checkstring(L, 2);
        if (strcmp(p, "*l") == 0 || strcmp(p, "l") == 0)
            mode = TCPC_LINE;
        else if (strcmp(p, "*a") == 0 || strcmp(p, "a") == 0)
            mode = TCPC_ALL;
        else
            return luaL_argerror(L, 2, "expected \"*l\", \"*a\" or a byte "
                                       "count");
    }
    double timeout = lwait_timeout(L, lc, 3, s->timeout);
    if (timeout <= 0)
        return lwait_fail(L, "timeout");
    s->lc = lc;
    lc->wait.flags = 3;
    if (tcpc_receive(s->t, mode, want, timeout, finished, s) < 0)
        return luaL_error(L, "sock:receive: another call on it is pending");
    return lwait_suspend(L, lc, MK_TCP, s, cancel);
}

static int l_close(lua_State *L)
{
    struct lsock *s = luaL_checkudata(L, 1, SOCK_MT);
    if (s->t)
        close_sock(s);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_gc(lua_State *L)
{
    struct lsock *s = luaL_checkudata(L, 1, SOCK_MT);
    if (s->t)
        close_sock(s);
    return 0;
}

void ltcp_open(lua_State *L)
{
    if (luaL_newmetatable(L, SOCK_MT)) {
        static const luaL_Reg m[] = {{"send", l_send},
                                     {"receive", l_receive},
                                     {"close", l_close},
                                     {NULL, NULL}};
        lua_newtable(L);
        luaL_register(L, NULL, m);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, l_connect);
    lua_setfield(L, -2, "connect");
    lua_setfield(L, -2, "tcp");
}
