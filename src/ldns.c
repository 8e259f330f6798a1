/*
 * ldns: milter.dns.query and milter.dns.rbl (part of the Lua bridge), on
 * the dnsr engine. Answers are lists in the server's order; a name with no
 * record of the type is an empty list (dns.rbl: false); an unknown answer
 * (timeout, SERVFAIL, REFUSED, no resolver) is nil, err.
 */
#include "lb_int.h"
#include "metrics.h"

#include <string.h>
#include <strings.h>

#include "dnsr.h"

#define DEFAULT_TIMEOUT 5.0

static const char *const type_names[] = {"A",   "AAAA",  "MX", "TXT",
                                         "PTR", "CNAME", "NS"};

/* The answer, pushed onto the waiting coroutine. */
static void answered(void *ud, const struct dnsr_answer *a)
{
    struct lb_conn *lc = ud;
    lua_State *co = lc->co;
    if (a->err) {
        lua_pushnil(co);
        lua_pushstring(co, a->err);
        lwait_complete(lc, 2);
        return;
    }
    if (lc->wait.flags && a->n == 0) { /* dns.rbl: not listed */
        lua_pushboolean(co, 0);
        lwait_complete(lc, 1);
        return;
    }
    lua_createtable(co, (int)a->n, 0);
    for (size_t i = 0; i < a->n; i++) {
        if (lc->wait.mx) { /* {pref=, host=} */
            lua_createtable(co, 0, 2);
            lua_pushinteger(co, a->rr[i].pref);
            lua_setfield(co, -2, "pref");
            lua_pushlstring(co, a->rr[i].s, a->rr[i].len);
            lua_setfield(co, -2, "host");
        } else {
            lua_pushlstring(co, a->rr[i].s, a->rr[i].len);
        }
        lua_rawseti(co, -2, (int)i + 1);
    }
    lwait_complete(lc, 1);
}

static void cancel(void *op) { dnsr_cancel(op); }

static int start(lua_State *L, struct lb_conn *lc, const char *name, int type,
                 double timeout, int rbl)
{
    if (timeout <= 0)
        return lwait_fail(L, "timeout");
    lc->wait.flags = rbl;
    lc->wait.mx = type == DNSR_MX;
    const char *err;
    struct dnsr_req *r = dnsr_query(name, type, timeout, answered, lc, &err);
    if (!r)
        return lwait_fail(L, err);
    return lwait_suspend(L, lc, MK_DNS, r, cancel);
}

/* milter.dns.query(name, type [, timeout | {timeout=}]) */
static int l_query(lua_State *L)
{
    struct lb_conn *lc = lwait_current(L, "milter.dns.query");
    const char *name = luaL_checkstring(L, 1);
    const char *tname = luaL_checkstring(L, 2);
    int type = -1;
    for (int i = 0; i < (int)(sizeof type_names / sizeof type_names[0]); i++)
        if (strcasecmp(tname, type_names[i]) == 0)
            type = i;
    if (type < 0)
        return luaL_argerror(L, 2, "record type must be A, AAAA, MX, TXT, "
                                   "PTR, CNAME or NS");
    double timeout = lwait_timeout(L, lc, 3, DEFAULT_TIMEOUT);
    char rev[128];
    if (type == DNSR_PTR && dnsr_reverse(name, NULL, rev, sizeof rev) == 0)
        name = rev; /* an address: its reverse name */
    return start(L, lc, name, type, timeout, 0);
}

/* milter.dns.rbl(address, zone [, timeout | {timeout=}]) */
static int l_rbl(lua_State *L)
{
    struct lb_conn *lc = lwait_current(L, "milter.dns.rbl");
    const char *addr = luaL_checkstring(L, 1);
    const char *zone = luaL_checkstring(L, 2);
    char name[512];
    if (!*zone || dnsr_reverse(addr, zone, name, sizeof name) < 0)
        return luaL_argerror(L, 1, "expected an IPv4 or IPv6 address and a "
                                   "zone");
    return start(L, lc, name, DNSR_A, lwait_timeout(L, lc, 3, DEFAULT_TIMEOUT),
                 1);
}

void ldns_open(lua_State *L)
{
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, l_query);
    lua_setfield(L, -2, "query");
    lua_pushcfunction(L, l_rbl);
    lua_setfield(L, -2, "rbl");
    lua_setfield(L, -2, "dns");
}
