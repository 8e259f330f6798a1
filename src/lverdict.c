/*
 * lverdict: reads and validates a handler's verdict table (part of the Lua
 * bridge). Every rule of the API's "Verdicts" and "Modifications" sections
 * is checked here, before anything is sent; strings are borrowed from the
 * Lua state (values rewritten here are anchored in a table left on the
 * coroutine's stack). Reading runs under lua_pcall with raw accesses only,
 * so a hostile table (metatables, huge lists) cannot raise into C.
 */
#include "lb_int.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct vr {
    struct lb_state *st;
    lua_State *co;
    int t;           /* index of the verdict table (1 in the reader frame) */
    int nanchor;     /* strings made here, kept in the table at index 2 */
    int rc;
    unsigned present;  /* modification keys the verdict has (bit k) */
    int ev;
    const struct sess *s;
    struct verdict *v;
    const char **why;
    char *wb;
    size_t wl;
    size_t nmods;
};

static int fail(struct vr *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->wb, r->wl, fmt, ap);
    va_end(ap);
    *r->why = r->wb;
    return -1;
}

/* Modification keys in sending order, with the action each one needs. */
static const struct {
    const char *key;
    uint32_t flag;
} mod_keys[] = {
    {"add_header", SMFIF_ADDHDRS},   {"insert_header", SMFIF_ADDHDRS},
    {"change_header", SMFIF_CHGHDRS}, {"delete_header", SMFIF_CHGHDRS},
    {"add_rcpt", SMFIF_ADDRCPT},     {"del_rcpt", SMFIF_DELRCPT},
    {"change_from", SMFIF_CHGFROM},  {"replace_body", SMFIF_CHGBODY},
    {"quarantine", SMFIF_QUARANTINE},
    {"headers", SMFIF_ADDHDRS | SMFIF_CHGHDRS},
};
#define HEADERS_KEY 9
#define INDEX_KEYS 0xfu /* add, insert, change, delete_header */
#define NMOD_KEYS (int)(sizeof mod_keys / sizeof mod_keys[0])

/* The keys read by name, after the modification keys (0..NMOD_KEYS-1),
 * then the action names: each is kept as the state's own string. */
enum {
    K_ACTION = NMOD_KEYS,
    K_CODE,
    K_XCODE,
    K_REASON,
    K_ACTIONS /* + VA_*: the action names */
};
static const char *const other_keys[] = {"action", "code", "xcode",
                                         "reason"};
_Static_assert(K_ACTIONS + VA__COUNT <= LB_VKEYS, "LB_VKEYS too small");

static const char *key_name(int k)
{
    return k < NMOD_KEYS   ? mod_keys[k].key
           : k < K_ACTIONS ? other_keys[k - K_ACTION]
                           : sess_action_names[k - K_ACTIONS];
}

/* Makes the key strings once per state (outside any handler call). */
static void make_keys(struct lb_state *st)
{
    lua_State *L = st->L;
    for (int k = 0; k < K_ACTIONS + VA__COUNT; k++) {
        lua_pushstring(L, key_name(k));
        st->vkey[k] = lua_tostring(L, -1);
        st->vkey_ref[k] = luaL_ref(L, LUA_REGISTRYINDEX);
    }
}

/* Pushes t[key k] without metamethods. */
static void rawfield(struct vr *r, int t, int k)
{
    lua_rawgeti(r->co, LUA_REGISTRYINDEX, r->st->vkey_ref[k]);
    lua_rawget(r->co, t < 0 ? t - 1 : t);
}

/* Which key (0..K_ACTIONS-1) a verdict's key is, -1 if none: LuaJIT
 * interns every string, so the same text is the same pointer. */
static int key_of(const struct vr *r, const char *key)
{
    for (int k = 0; k < K_ACTIONS; k++)
        if (key == r->st->vkey[k])
            return k;
    return -1;
}

/* A string at stack index i without NUL bytes; -1 if not a string. */
static int get_str(lua_State *co, int i, struct wire_str *out)
{
    if (lua_type(co, i) != LUA_TSTRING)
        return -1;
    out->p = lua_tolstring(co, i, &out->n);
    return memchr(out->p, '\0', out->n) ? -1 : 0;
}

static int get_int(lua_State *co, int i, lua_Integer lo, lua_Integer hi,
                   lua_Integer *out)
{
    if (lua_type(co, i) != LUA_TNUMBER)
        return -1;
    lua_Number n = lua_tonumber(co, i);
    /* range first: casting NaN, infinities or 1e300 is undefined */
    if (!(n >= (lua_Number)lo && n <= (lua_Number)hi) || n != floor(n))
        return -1;
    *out = (lua_Integer)n;
    return 0;
}

static int valid_header_name(struct wire_str n)
{
    return n.n > 0 && n.n <= 998 && wire_field_name_len(n.p, n.n) == n.n;
}

/* Splits one reason string into lines at LF (dropping a CR before it). */
static int add_lines(struct vr *r, struct wire_str s)
{
    const char *p = s.p, *end = s.p + s.n;
    do {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *e = nl ? nl : end;
        size_t n = (size_t)(e - p);
        if (n && p[n - 1] == '\r')
            n--;
        if (memchr(p, '\r', n))
            return fail(r, "reason: a line contains a bare CR");
        if (n > WIRE_MAX_REPLY_LINE)
            return fail(r, "reason: a line is longer than %d bytes",
                        WIRE_MAX_REPLY_LINE);
        if (r->v->nlines == WIRE_MAX_REPLY_LINES)
            return fail(r, "reason: more than %d lines", WIRE_MAX_REPLY_LINES);
        r->v->lines[r->v->nlines++] = (struct wire_str){p, n};
        p = nl ? nl + 1 : end;
    } while (p < end);
    return 0;
}

static int read_reply(struct vr *r)
{
    lua_State *co = r->co;
    struct verdict *v = r->v;
    int cls = v->action == VA_REJECT ? 5 : 4;
    lua_Integer code = 0;
    rawfield(r, r->t, K_CODE);
    if (!lua_isnil(co, -1) &&
        get_int(co, -1, cls * 100, cls * 100 + 99, &code) < 0)
        return fail(r, "code must be a %dxx number for %s", cls,
                    sess_action_names[v->action]);
    v->code = (int)code;
    rawfield(r, r->t, K_XCODE);
    if (!lua_isnil(co, -1)) {
        struct wire_str x;
        if (get_str(co, -1, &x) < 0 || !wire_xcode_valid(x.p, x.n, cls))
            return fail(r, "xcode must look like \"%d.7.1\" (class %d for "
                           "%s, then 1 to 3 digits, a dot, 1 to 3 digits)",
                        cls, cls, sess_action_names[v->action]);
        v->xcode = x;
    }
    rawfield(r, r->t, K_REASON);
    struct wire_str line;
    if (lua_istable(co, -1)) {
        int n = (int)lua_objlen(co, -1);
        if (n == 0)
            return fail(r, "reason: an empty list");
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(co, -1, i);
            if (get_str(co, -1, &line) < 0)
                return fail(r, "reason[%d] must be a string", i);
            lua_pop(co, 1); /* still referenced by the reason table */
            if (add_lines(r, line) < 0)
                return -1;
        }
    } else if (!lua_isnil(co, -1)) {
        if (get_str(co, -1, &line) < 0)
            return fail(r, "reason must be a string or a list of strings");
        if (add_lines(r, line) < 0)
            return -1;
    }
    size_t len = wire_replycode_len(
        v->xcode.n ? v->xcode : wire_default_xcode(cls * 100), v->lines,
        v->nlines);
    if (len > WIRE_MAX_CHUNK)
        return fail(r, "the reply is %zu bytes, above the %u a milter packet "
                       "may carry",
                    len, WIRE_MAX_CHUNK);
    return 0;
}

/* A modification packet of len payload bytes fits in one milter packet. */
static int fits(struct vr *r, size_t len, const char *key, int i)
{
    if (len <= WIRE_MAX_CHUNK)
        return 0;
    if (i)
        return fail(r, "%s[%d] is %zu bytes, above the %u a milter packet "
                       "may carry",
                    key, i, len, WIRE_MAX_CHUNK);
    return fail(r, "%s is %zu bytes, above the %u a milter packet may carry",
                key, len, WIRE_MAX_CHUNK);
}

static struct mod *new_mod(struct vr *r)
{
    struct lb_state *st = r->st;
    if (r->nmods == st->mods_cap) {
        size_t n = st->mods_cap ? st->mods_cap * 2 : 16;
        struct mod *m = realloc(st->mods, n * sizeof *m);
        if (!m)
            return NULL;
        st->mods = m;
        st->mods_cap = n;
    }
    struct mod *m = &st->mods[r->nmods++];
    memset(m, 0, sizeof *m);
    return m;
}

/* A header value: no NUL; CRLF becomes LF, as MTAs store values. */
static int header_value(struct vr *r, int i, struct wire_str *out)
{
    if (get_str(r->co, i, out) < 0)
        return -1;
    if (memchr(out->p, '\r', out->n)) {
        if (!r->nanchor) { /* the first rewrite: make the anchor table */
            lua_newtable(r->co);
            lua_replace(r->co, 2);
        }
        luaL_gsub(r->co, out->p, "\r\n", "\n");
        out->p = lua_tolstring(r->co, -1, &out->n);
        lua_rawseti(r->co, 2, ++r->nanchor); /* keeps the new string alive */
    }
    return 0;
}

/* An address, or {address, "ESMTP args"}; args.p stays NULL without. */
static int addr_args(struct vr *r, int i, struct wire_str *addr,
                     struct wire_str *args)
{
    lua_State *co = r->co;
    if (lua_type(co, i) == LUA_TSTRING)
        return get_str(co, i, addr) < 0 || addr->n == 0 ? -1 : 0;
    if (!lua_istable(co, i))
        return -1;
    lua_rawgeti(co, i, 1);
    lua_rawgeti(co, i, 2);
    if (get_str(co, -2, addr) < 0 || addr->n == 0)
        return -1;
    if (!lua_isnil(co, -1) && get_str(co, -1, args) < 0)
        return -1;
    return 0;
}

static int read_header_mod(struct vr *r, int k, int n)
{
    static const char *const shape[] = {
        "{name, value}", "{index, name, value}", "{name, nth, value}",
        "{name, nth}"};
    lua_State *co = r->co;
    int list = lua_gettop(co);
    for (int i = 1; i <= n; i++) {
        lua_settop(co, list); /* values stay referenced by their tables */
        lua_rawgeti(co, list, i);
        struct mod *m = new_mod(r);
        if (!m)
            return fail(r, "out of memory");
        m->op = (uint8_t)k;
        if (!lua_istable(co, -1))
            return fail(r, "%s[%d] must be %s", mod_keys[k].key, i, shape[k]);
        lua_rawgeti(co, -1, 1);
        lua_rawgeti(co, -2, 2);
        lua_rawgeti(co, -3, 3);
        int ni = k == MOD_INSERT_HEADER ? -2 : -3; /* name */
        int xi = k == MOD_INSERT_HEADER ? -3 : -2; /* index or nth */
        int vi = k == MOD_ADD_HEADER ? -2 : -1;    /* value */
        lua_Integer idx = 1;
        if (k != MOD_ADD_HEADER &&
            !(k == MOD_DELETE_HEADER && lua_isnil(co, xi)) &&
            get_int(co, xi, k == MOD_INSERT_HEADER ? 0 : 1, UINT32_MAX,
                    &idx) < 0)
            return fail(r, "%s[%d]: %s must be an integer >= %d",
                        mod_keys[k].key, i,
                        k == MOD_INSERT_HEADER ? "index" : "nth",
                        k == MOD_INSERT_HEADER ? 0 : 1);
        m->index = (uint32_t)idx;
        if (get_str(co, ni, &m->a) < 0 || !valid_header_name(m->a))
            return fail(r, "%s[%d]: bad header name (printable ASCII, no "
                           "colon or space)",
                        mod_keys[k].key, i);
        if (k != MOD_DELETE_HEADER && header_value(r, vi, &m->b) < 0)
            return fail(r, "%s[%d]: the value must be a string without NUL",
                        mod_keys[k].key, i);
        if (fits(r, 4 + m->a.n + m->b.n + 2, mod_keys[k].key, i) < 0)
            return -1;
    }
    lua_settop(co, list);
    return 0;
}

/* headers = { {name, value}, ... }: the whole list, in order. */
static int read_header_list(struct vr *r, int n)
{
    lua_State *co = r->co;
    int list = lua_gettop(co);
    for (int i = 1; i <= n; i++) {
        lua_settop(co, list);
        lua_rawgeti(co, list, i);
        struct mod *m = new_mod(r);
        if (!m)
            return fail(r, "out of memory");
        m->op = MOD_HEADER;
        if (!lua_istable(co, -1))
            return fail(r, "headers[%d] must be {name, value}", i);
        lua_rawgeti(co, -1, 1);
        lua_rawgeti(co, -2, 2);
        if (get_str(co, -2, &m->a) < 0 || !valid_header_name(m->a))
            return fail(r, "headers[%d]: bad header name (printable ASCII, "
                           "no colon or space)",
                        i);
        if (header_value(r, -1, &m->b) < 0)
            return fail(r, "headers[%d]: the value must be a string without "
                           "NUL",
                        i);
        if (fits(r, 4 + m->a.n + m->b.n + 2, "headers", i) < 0)
            return -1;
    }
    lua_settop(co, list);
    return 0;
}

static int read_rcpt_mod(struct vr *r, int k, int n)
{
    lua_State *co = r->co;
    int list = lua_gettop(co);
    for (int i = 1; i <= n; i++) {
        lua_settop(co, list);
        lua_rawgeti(co, list, i);
        struct mod *m = new_mod(r);
        if (!m)
            return fail(r, "out of memory");
        m->op = k == 4 ? MOD_ADD_RCPT : MOD_DEL_RCPT;
        int bad = k == 4 ? addr_args(r, lua_gettop(co), &m->a, &m->b)
                         : get_str(co, -1, &m->a) < 0 || m->a.n == 0;
        if (bad)
            return fail(r, "%s[%d] must be %s", mod_keys[k].key, i,
                        k == 4 ? "an address or {address, \"ARGS\"}"
                               : "an address");
        if (fits(r, m->a.n + m->b.n + 2, mod_keys[k].key, i) < 0)
            return -1;
        if (m->b.p && !(r->s->actions & SMFIF_ADDRCPT_PAR))
            return fail(r, "add_rcpt[%d]: the MTA does not allow recipient "
                           "arguments (ADDRCPT_PAR not offered)",
                        i);
    }
    lua_settop(co, list);
    return 0;
}

static int read_mod(struct vr *r, int k)
{
    lua_State *co = r->co;
    struct verdict *v = r->v;
    if ((r->s->actions & mod_keys[k].flag) != mod_keys[k].flag)
        return fail(r, "the MTA does not allow %s (action 0x%x not offered)",
                    mod_keys[k].key, mod_keys[k].flag);
    switch (k) {
    case 6: /* change_from */
        if (addr_args(r, lua_gettop(co), &v->from, &v->from_args) < 0)
            return fail(r, "change_from must be an address or "
                           "{address, \"ARGS\"}");
        return fits(r, v->from.n + v->from_args.n + 2, "change_from", 0);
    case 7: /* replace_body */
        if (lua_type(co, -1) != LUA_TSTRING)
            return fail(r, "replace_body must be a string");
        v->body.p = lua_tolstring(co, -1, &v->body.n);
        return 0;
    case HEADERS_KEY:
        if (!lua_istable(co, -1))
            return fail(r, "headers must be a list of {name, value}");
        v->header_list = 1;
        return read_header_list(r, (int)lua_objlen(co, -1));
    case 8: /* quarantine */
        if (get_str(co, -1, &v->quarantine) < 0 || v->quarantine.n == 0)
            return fail(r, "quarantine must be a non-empty reason string");
        return fits(r, v->quarantine.n + 1, "quarantine", 0);
    default:
        if (!lua_istable(co, -1))
            return fail(r, "%s must be a list", mod_keys[k].key);
        int n = (int)lua_objlen(co, -1);
        return k < 4 ? read_header_mod(r, k, n) : read_rcpt_mod(r, k, n);
    }
}

/* Checks every key once: known, and allowed with this action and event. */
static int check_keys(struct vr *r)
{
    lua_State *co = r->co;
    int act = r->v->action;
    lua_pushnil(co);
    while (lua_next(co, r->t)) {
        lua_pop(co, 1);
        if (lua_type(co, -1) != LUA_TSTRING)
            return fail(r, "verdict keys must be strings");
        const char *key = lua_tostring(co, -1);
        int k = key_of(r, key);
        if (k == K_ACTION)
            continue;
        if (k == K_CODE || k == K_XCODE || k == K_REASON) {
            if (act != VA_REJECT && act != VA_TEMPFAIL)
                return fail(r, "'%s' goes with reject or tempfail only", key);
            continue;
        }
        if (k < 0)
            return fail(r, "unknown key '%s'", key);
        if (r->ev != SE_EOM)
            return fail(r, "%s: modifications are only allowed in eom", key);
        if (act != VA_ACCEPT && act != VA_CONTINUE)
            return fail(r, "%s: modifications go with accept or continue "
                           "only",
                        key);
        r->present |= 1u << k;
    }
    return 0;
}

/* The reader, run under lua_pcall: [1] verdict table, [2] anchor table
 * (nil until needed), [3] the struct vr. Returns the anchor. */
static int read_all(lua_State *co)
{
    struct vr *r = lua_touserdata(co, 3);
    lua_settop(co, 2);
    struct verdict *v = r->v;
    int ev = r->ev;
    r->rc = -1;
    rawfield(r, r->t, K_ACTION);
    const char *a = lua_type(co, -1) == LUA_TSTRING ? lua_tostring(co, -1)
                                                    : NULL;
    int act = 0;
    while (a && act < VA__COUNT && a != r->st->vkey[K_ACTIONS + act])
        act++;
    if (!a || act == VA__COUNT)
        return fail(r, "no valid action (build verdicts with milter.accept{}, "
                       "milter.reject{}...)"), 0;
    v->action = act;
    if (act == VA_SKIP && ev != SE_BODY)
        return fail(r, "skip is only allowed in body"), 0;
    if (act == VA_DISCARD &&
        (ev == SE_CONNECT || ev == SE_HELO || ev == SE_UNKNOWN))
        return fail(r, "discard is not allowed before envfrom"), 0;
    if (check_keys(r) < 0)
        return 0;
    if ((act == VA_REJECT || act == VA_TEMPFAIL) && read_reply(r) < 0)
        return 0;
    if ((r->present & (1u << HEADERS_KEY)) && (r->present & INDEX_KEYS))
        return fail(r, "headers (the whole list) cannot be combined with "
                       "add_header, insert_header, change_header or "
                       "delete_header"),
               0;
    for (int k = 0; r->present && k < NMOD_KEYS; k++) {
        if (!(r->present & (1u << k)))
            continue;
        lua_settop(co, 2);
        rawfield(r, r->t, k);
        if (!lua_isnil(co, -1) && read_mod(r, k) < 0)
            return 0;
    }
    r->rc = 0;
    lua_settop(co, 2);
    return 1; /* the anchor table, if any, outlives the call */
}

int lverdict_read(struct lb_state *st, lua_State *co, int idx, int ev,
                  const struct sess *s, struct verdict *v, const char **why,
                  char *whybuf, size_t whylen)
{
    struct vr r = {st, co, 1, 0, -1, 0, ev, s, v, why, whybuf, whylen, 0};
    verdict_clear(v);
    if (idx == 0 || lua_isnil(co, idx))
        return 0;
    if (!lua_istable(co, idx))
        return fail(&r, "expected nothing or a verdict table such as "
                        "milter.accept{}, got a %s",
                    luaL_typename(co, idx));
    if (!lua_checkstack(co, 8))
        return fail(&r, "out of Lua stack");
    /* read_all(verdict, anchor, &r): no closure, no allocation per call;
     * the anchor table is made only when a value had to be rewritten. */
    if (st->reader_ref == 0) { /* once per state: no closure per call */
        make_keys(st);
        lua_pushcfunction(st->L, read_all);
        st->reader_ref = luaL_ref(st->L, LUA_REGISTRYINDEX);
    }
    lua_rawgeti(co, LUA_REGISTRYINDEX, st->reader_ref);
    lua_pushvalue(co, idx);
    lua_pushnil(co);
    lua_pushlightuserdata(co, &r);
    if (lua_pcall(co, 3, 1, 0) != 0) {
        fail(&r, "%s", lua_tostring(co, -1) ? lua_tostring(co, -1) : "error");
        lua_pop(co, 1);
        return -1;
    }
    /* the anchor (or nil) stays on the stack until the next call */
    if (r.rc < 0)
        return -1;
    v->mods = st->mods;
    v->nmods = r.nmods;
    return 0;
}
