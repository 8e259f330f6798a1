/* lb: see lb.h. */
#include "lb_int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "milter_lua.h" /* luaJIT_BC_milter: lua/milter.lua, compiled */

int lb_parse_action(const char *name)
{
    static const struct {
        const char *name;
        int action;
    } t[] = {{"tempfail", VA_TEMPFAIL}, {"accept", VA_ACCEPT},
             {"continue", VA_CONTINUE}, {"reject", VA_REJECT}};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (strcmp(name, t[i].name) == 0)
            return t[i].action;
    return -1;
}

static double script_timeout = 10;
static size_t max_memory = (size_t)256 << 20;
volatile double lb_busy_since;
struct lb_conn *lb_running;
volatile int lb_refused_memory;

void lb_set_limits(double timeout, size_t mem)
{
    script_timeout = timeout;
    max_memory = mem;
}

double lb_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/*
 * The cap counts garbage not yet collected too, and LuaJIT's incremental
 * collector, paced to let the heap grow to twice its live data, can lag far
 * behind a handler that makes big temporaries. The allocator must not
 * collect by itself: LuaJIT calls it where a compiled trace or a half-built
 * object holds pointers the collector does not see. So once the state
 * passes half the cap (or, after that, each further eighth of it),
 * collect_soon() only writes two numbers of LuaJIT's: the collector's
 * threshold, lowered to the bytes in use, so that LuaJIT's next check (at
 * the safe points it chooses itself, in the interpreter and in compiled
 * traces) runs a step; and the step multiplier, set to 0, which makes that
 * step finish the whole cycle. lua_gc's LUA_GCRESTART and LUA_GCSETSTEPMUL
 * do these writes and nothing else (lj_api.c). lb_call restores the
 * multiplier when the call ends.
 */
#define GC_SOFT(cap) ((cap) / 2)
#define GC_GAP(cap) ((cap) / 8)

double lb_script_timeout(void) { return script_timeout; }

static void collect_soon(struct lb_state *st)
{
    st->gc_at = st->mem + GC_GAP(max_memory);
    /* LuaJIT stops its collector while a __gc finalizer runs, so that its
     * steps do not nest; leave it stopped then (and when a script did) */
    if (!lua_gc(st->L, LUA_GCISRUNNING, 0))
        return;
    int mul = lua_gc(st->L, LUA_GCSETSTEPMUL, 0);
    if (!st->gc_forced)
        st->gc_stepmul = mul;
    st->gc_forced = 1;
    lua_gc(st->L, LUA_GCRESTART, 0);
}

/*
 * The state's allocator: LuaJIT's own (fast) allocator underneath, with the
 * bytes counted so that a handler cannot pass the cap. Growing is a
 * function of its own, so that a free (half of the calls) saves no
 * registers and tail-calls LuaJIT's allocator.
 */
static __attribute__((noinline)) void *alloc_grow(struct lb_state *st,
                                                  void *ptr, size_t osize,
                                                  size_t nsize)
{
    if (nsize > osize && st->mem + (nsize - osize) > st->gc_at)
        collect_soon(st);
    /* The cap binds handlers only: the bridge's own work outside a call
     * (errors, tracebacks, ctx) must not fail, or Lua would panic. */
    if (nsize > osize && st->in_call &&
        st->mem + (nsize - osize) > max_memory) {
        lb_refused_memory = 1; /* for a crash report (watchdog.h) */
        return NULL;
    }
    void *p = st->base_alloc(st->base_ud, ptr, osize, nsize);
    if (p)
        st->mem += nsize - osize;
    return p;
}

static void *alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    struct lb_state *st = ud;
    if (nsize != 0)
        return alloc_grow(st, ptr, osize, nsize);
    st->mem -= osize;
    /* collected: ask again at the next gap, but not below half the cap */
    if (st->mem + GC_GAP(max_memory) < st->gc_at)
        st->gc_at = st->mem + GC_GAP(max_memory) > GC_SOFT(max_memory)
                        ? st->mem + GC_GAP(max_memory)
                        : GC_SOFT(max_memory);
    return st->base_alloc(st->base_ud, ptr, osize, 0);
}

#define HOOK_COUNT 10000 /* VM instructions between two clock reads */

/*
 * Count hook: stops a handler past its deadline (interpreted code only).
 * Once past it, the error is raised again at every instruction until the
 * call ends: a pcall that catches it returns into its caller's code, which
 * raises again, so the error climbs past every pcall to lua_resume.
 */
static void hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    struct lb_state *st;
    lua_getallocf(L, (void **)&st);
    if (!st->in_call)
        return;
    if (!st->overdue) {
        if (lb_now() <= st->deadline)
            return;
        st->overdue = 1;
        lua_sethook(L, hook, LUA_MASKCOUNT, 1);
    }
    /* at the script's line that was running (the loop), which a dead
     * coroutine's top frame no longer tells */
    char at[512];
    const char *what = st->loading ? "the script's top level" : "handler";
    if (lwhere_frame(L, 0, at, sizeof at))
        lua_pushfstring(L, "%s: %s ran longer than --script-timeout (%fs)",
                        at, what, (lua_Number)script_timeout);
    else
        lua_pushfstring(L, "%s ran longer than --script-timeout (%fs)",
                        what, (lua_Number)script_timeout);
    lua_error(L); /* not luaL_error: it would prefix a line of its own */
}

/* After a call (or the top level): the hook's pace and the collector's. */
static void end_call(struct lb_state *st)
{
    st->in_call = 0;
    lb_refused_memory = 0;
    if (st->overdue) {
        st->overdue = 0;
        lua_sethook(st->L, hook, LUA_MASKCOUNT, HOOK_COUNT);
    }
    if (st->gc_forced) { /* back to LuaJIT's incremental pace */
        st->gc_forced = 0;
        lua_gc(st->L, LUA_GCSETSTEPMUL, st->gc_stepmul);
    }
}

static int panic(lua_State *L)
{
    log_msg(LL_ERR, 0, NULL, "Lua panic: %s", lua_tostring(L, -1));
    abort();
}

/*
 * Message handler for pcall: the error, located at the script's line when
 * a C function raised it (require, a bad argument), plus a traceback.
 */
static int traceback(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    lwhere_push_error(L, L, 1, msg ? msg : "(error object is not a string)");
    luaL_traceback(L, L, lua_tostring(L, -1), 1);
    return 1;
}

static int l_milter_log(lua_State *L) { return lctx_log(L, 0, NULL, 1); }

/* package.preload.milter: the embedded module plus milter.log. */
static int open_milter(lua_State *L)
{
    if (luaL_loadbuffer(L, (const char *)luaJIT_BC_milter,
                        luaJIT_BC_milter_SIZE, "=milter"))
        return lua_error(L);
    lua_call(L, 0, 1);
    lua_pushcfunction(L, l_milter_log);
    lua_setfield(L, -2, "log");
    lwait_open(L);
    ldns_open(L);
    ltcp_open(L);
    lredis_open(L);
    lhttp_open(L);
    lstore_open(L);
    return 1;
}

/*
 * Warns once per name when a handler writes a global (shared state), at
 * the line of the assignment (level 2: the function that assigns). Made
 * before any script code runs, with the functions it needs given to it:
 * a script that removes or replaces setmetatable, rawset, tostring or
 * debug cannot break it. Returns the function that installs it on the
 * globals table, called once the top level has run.
 */
static const char global_guard[] =
    "local log, getinfo, tb, setmetatable, rawset, tostring = ...\n"
    "local seen = {}\n"
    "local mt = {__newindex = function(t, k, v)\n"
    "  if not seen[k] then seen[k] = true\n"
    "    local i = getinfo(2, 'Sl')\n"
    "    local at = i and i.currentline > 0 and\n"
    "      i.short_src .. ':' .. i.currentline .. ': ' or ''\n"
    "    log(tb(at .. 'script writes global \\'' .. tostring(k) ..\n"
    "      '\\': globals are shared by every connection', 2))\n"
    "  end\n"
    "  rawset(t, k, v)\n"
    "end}\n"
    "return function(G) setmetatable(G, mt) end\n";

/* The guard's warning, tagged with the connection whose handler runs. */
static int l_guard_log(lua_State *L)
{
    struct lb_state *st;
    lua_getallocf(L, (void **)&st);
    struct sess *s = st->running && st->running->ctx ? st->running->ctx->s
                                                     : NULL;
    log_msg(LL_WARN, s ? s->id : 0, s ? sess_qid(s) : NULL, "[lua] %s",
            luaL_checkstring(L, 1));
    return 0;
}

static char std_tag; /* registry key of the table lb_push_std reads */

/* Keeps the functions lb_push_std gives, from the pristine globals (and
 * the ffi module's fields as they were before the script ran). */
static void keep_std(lua_State *L)
{
    lua_pushlightuserdata(L, &std_tag);
    lua_createtable(L, 8, 0);
    static const char *const base[] = {"tostring", "type", "rawget", "next",
                                       "rawset"};
    static const int at[] = {LB_TOSTRING, LB_TYPE, LB_RAWGET, LB_NEXT,
                             LB_RAWSET};
    for (int i = 0; i < 5; i++) {
        lua_getglobal(L, base[i]);
        lua_rawseti(L, -2, at[i]);
    }
    lua_getglobal(L, "require"); /* LuaJIT preloads ffi: load it now */
    lua_pushstring(L, "ffi");
    if (lua_pcall(L, 1, 1, 0) != 0 || !lua_istable(L, -1)) {
        lua_pop(L, 1); /* a LuaJIT built without it */
        lua_pushnil(L);
    } else {
        /* a copy of its fields: the module table is the script's too
         * (require "ffi" gives that very table), and the bridge's ffi
         * code, made on first use, must not find ffi.cast removed */
        lua_newtable(L);
        lua_pushnil(L);
        while (lua_next(L, -3)) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_rawset(L, -4);
        }
        lua_remove(L, -2);
    }
    lua_rawseti(L, -2, LB_FFI);
    lua_getglobal(L, "table");
    lua_getfield(L, -1, "sort");
    lua_rawseti(L, -3, LB_SORT);
    lua_pop(L, 1);
    lua_getglobal(L, "debug");
    lua_getfield(L, -1, "getinfo");
    lua_rawseti(L, -3, LB_GETINFO);
    lua_pop(L, 1);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

void lb_push_std(lua_State *L, int which)
{
    lua_pushlightuserdata(L, &std_tag);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_rawgeti(L, -1, which);
    lua_remove(L, -2);
}

/* The guard's installer (see global_guard) as a registry reference, made
 * from the pristine globals; LUA_NOREF if out of memory. */
static int make_guard(lua_State *L)
{
    if (luaL_loadbuffer(L, global_guard, sizeof global_guard - 1,
                        "=milter.guard")) {
        lua_pop(L, 1);
        return LUA_NOREF;
    }
    lua_pushcfunction(L, l_guard_log);
    lua_getglobal(L, "debug");
    lua_getfield(L, -1, "getinfo");
    lua_getfield(L, -2, "traceback");
    lua_remove(L, -3);
    lua_getglobal(L, "setmetatable");
    lua_getglobal(L, "rawset");
    lua_getglobal(L, "tostring");
    if (lua_pcall(L, 6, 1, 0)) {
        lua_pop(L, 1);
        return LUA_NOREF;
    }
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

/*
 * Seeds math.random before the top level runs: workers are forked copies
 * of one process, and each must draw its own numbers.
 */
static void seed_random(lua_State *L)
{
    static unsigned counter;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t seed = (uint64_t)getpid() << 32 ^ (uint64_t)ts.tv_sec << 20 ^
                    (uint64_t)ts.tv_nsec ^ (uint64_t)++counter << 48;
    lua_getglobal(L, "math");
    lua_getfield(L, -1, "randomseed");
    lua_pushnumber(L, (lua_Number)(seed % 9007199254740993ull));
    lua_call(L, 1, 0);
    lua_pop(L, 1);
}

void lb_error_text(lua_State *L, char *err, size_t errlen)
{
    const char *msg = lua_tostring(L, -1);
    snprintf(err, errlen, "%s", msg ? msg : "unknown error");
    /* the whole message (require's lists every path it tried), but not
     * the traceback the message handler appended */
    char *tb = strstr(err, "\nstack traceback:");
    if (tb)
        *tb = '\0';
}

void lb_skip_hashbang(const char **src, size_t *len)
{
    if (*len && (*src)[0] == '#') { /* a #! line, kept as an empty line 1 */
        const char *nl = memchr(*src, '\n', *len);
        *len -= nl ? (size_t)(nl - *src) : *len;
        *src = nl ? nl : *src;
    }
}

/*
 * How many arguments after ctx the function on top can see: LuaJIT's
 * debug.getinfo(f, "u") (as it was before the script ran) tells its
 * parameters and whether it takes `...` (so does every C function).
 */
static unsigned char declared_args(lua_State *L)
{
    int n = LB_ALL_ARGS;
    lb_push_std(L, LB_GETINFO);
    lua_pushvalue(L, -2);
    lua_pushliteral(L, "u");
    if (lua_pcall(L, 2, 1, 0) == 0 && lua_istable(L, -1)) {
        lua_getfield(L, -1, "isvararg");
        lua_getfield(L, -2, "nparams");
        if (!lua_toboolean(L, -2) && lua_isnumber(L, -1))
            n = lua_tointeger(L, -1) > 1 ? (int)lua_tointeger(L, -1) - 1 : 0;
        lua_pop(L, 2);
    }
    lua_pop(L, 1);
    return (unsigned char)(n < LB_ALL_ARGS ? n : LB_ALL_ARGS);
}

/* Checks the table a script returned and takes refs of its handlers. */
static int take_handlers(struct lb_state *st, const char *path, char *err,
                         size_t errlen)
{
    lua_State *L = st->L;
    if (!lua_istable(L, -1)) {
        snprintf(err, errlen,
                 "%s: the script must return a table of handlers, not %s",
                 path, luaL_typename(L, -1));
        return -1;
    }
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        int ev = -1;
        if (lua_type(L, -2) == LUA_TSTRING)
            for (int i = 0; i < SE__COUNT; i++)
                if (strcmp(lua_tostring(L, -2), sess_event_names[i]) == 0)
                    ev = i;
        char where[256] = "";
        if (lua_isfunction(L, -1))
            lwhere_def(L, -1, where, sizeof where);
        if (ev < 0) {
            snprintf(err, errlen,
                     "%s: unknown handler key '%s' (known: connect, helo, "
                     "envfrom, envrcpt, data, header, eoh, body, eom, abort, "
                     "close, unknown)",
                     *where ? where : path,
                     lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2)
                                                    : luaL_typename(L, -2));
            return -1;
        }
        if (!lua_isfunction(L, -1)) {
            snprintf(err, errlen, "%s: handler '%s' must be a function, not %s",
                     path, sess_event_names[ev], luaL_typename(L, -1));
            return -1;
        }
        st->nargs[ev] = declared_args(L);
        st->handler[ev] = luaL_ref(L, LUA_REGISTRYINDEX);
        st->handlers |= SE_BIT(ev);
    }
    return 0;
}

char *lb_read_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *data = NULL;
    size_t n = 0, cap = 0;
    if (!f) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    for (;;) {
        if (n + 4096 > cap) {
            cap = cap ? cap * 2 : 65536;
            char *p = realloc(data, cap);
            if (!p)
                break;
            data = p;
        }
        size_t got = fread(data + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
    }
    if (ferror(f) || !data) {
        snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
        fclose(f);
        free(data);
        return NULL;
    }
    fclose(f);
    *len = n;
    return data;
}

struct lb_state *lb_load(const char *path, char *err, size_t errlen)
{
    size_t len;
    char *src = lb_read_file(path, &len, err, errlen);
    if (!src)
        return NULL;
    struct lb_state *st = lb_load_buffer(path, src, len, err, errlen);
    free(src);
    return st;
}

struct lb_state *lb_load_buffer(const char *path, const char *src, size_t len,
                                char *err, size_t errlen)
{
    struct lb_state *st = calloc(1, sizeof *st);
    lua_State *L = st ? luaL_newstate() : NULL;
    if (L) {
        st->L = L;
        st->base_alloc = lua_getallocf(L, &st->base_ud);
        st->mem = (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 +
                  (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
        st->gc_at = GC_SOFT(max_memory);
        lua_setallocf(L, alloc, st);
    }
    if (!L) {
        snprintf(err, errlen, "%s: out of memory", path);
        free(st);
        return NULL;
    }
    st->L = L;
    st->refs = 1;
    for (int i = 0; i < SE__COUNT; i++)
        st->handler[i] = LUA_NOREF;
    lua_atpanic(L, panic);
    lua_sethook(L, hook, LUA_MASKCOUNT, HOOK_COUNT);
    luaL_openlibs(L);
    /* A collection cycle once the heap has grown to four times what the
     * last one left, not LuaJIT's two: a quarter less collector work per
     * message, in a state whose live data is small (the script, a ctx per
     * connection); the --script-memory cap still forces a cycle at half
     * of it. A script may set its own (collectgarbage "setpause"). */
    lua_gc(L, LUA_GCSETPAUSE, 400);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, open_milter);
    lua_setfield(L, -2, "milter");
    lua_pop(L, 2);
    seed_random(L);
    keep_std(L);
    int guard = make_guard(L);

    lua_pushcfunction(L, traceback);
    int tb = lua_gettop(L);
    *err = '\0';
    lb_skip_hashbang(&src, &len);
    char chunk[4096];
    snprintf(chunk, sizeof chunk, "@%s", path);
    /* The top level has the handlers' budget: the count hook stops an
     * interpreted loop, the watchdog (lb_busy_since) a compiled one. */
    st->loading = 1;
    st->in_call = 1;
    lb_busy_since = lb_now();
    st->deadline = lb_busy_since + script_timeout;
    int failed = lsetup_run(L, path, tb, err, errlen) < 0;
    if (!failed && (luaL_loadbuffer(L, src, len, chunk) ||
                    lua_pcall(L, 0, 1, tb))) {
        failed = 1;
        lb_error_text(L, err, errlen);
    }
    end_call(st);
    lb_busy_since = 0;
    st->loading = 0;
    if (!failed)
        take_handlers(st, path, err, errlen);
    if (*err) {
        lua_setallocf(L, st->base_alloc, st->base_ud);
        lua_close(L);
        free(st);
        return NULL;
    }
    lua_settop(L, 0);
    if (guard != LUA_NOREF) { /* a _G the script protected stays unguarded */
        lua_rawgeti(L, LUA_REGISTRYINDEX, guard);
        luaL_unref(L, LUA_REGISTRYINDEX, guard);
        lua_pushvalue(L, LUA_GLOBALSINDEX);
        if (lua_pcall(L, 1, 0, 0))
            lua_pop(L, 1);
    }
    return st;
}

void lb_state_hold(struct lb_state *st) { st->refs++; }

void lb_state_release(struct lb_state *st)
{
    if (--st->refs > 0)
        return;
    /* LuaJIT frees its whole arena at close only through its own allocator */
    lua_setallocf(st->L, st->base_alloc, st->base_ud);
    lua_close(st->L);
    free(st->mods);
    free(st);
}

unsigned lb_handlers(const struct lb_state *st) { return st->handlers; }

void lb_conn_init(struct lb_conn *lc, struct lb_state *st)
{
    memset(lc, 0, sizeof *lc);
    lc->st = st;
    lc->co_ref = lc->ctx_ref = LUA_NOREF;
    lb_state_hold(st);
}

static void drop_ctx(struct lb_conn *lc)
{
    if (lc->ctx) {
        lua_State *L = lc->st->L;
        lua_rawgeti(L, LUA_REGISTRYINDEX, lc->ctx_ref);
        lctx_detach(L, lua_gettop(L), lc->ctx);
        lua_pop(L, 1);
    }
    lc->ctx = NULL;
    luaL_unref(lc->st->L, LUA_REGISTRYINDEX, lc->ctx_ref);
    lc->ctx_ref = LUA_NOREF;
}

static void drop_thread(struct lb_conn *lc)
{
    luaL_unref(lc->st->L, LUA_REGISTRYINDEX, lc->co_ref);
    lc->co_ref = LUA_NOREF;
    lc->co = NULL;
}

/* The connection ends: a coroutine whose last call returned (not one that
 * failed, which is dead, nor one left waiting) is kept for the next
 * connection, emptied and with the globals it started with (setfenv(0)
 * in a handler changes its own), as lua_newthread would make it. */
static void spare_thread(struct lb_conn *lc)
{
    struct lb_state *st = lc->st;
    lua_State *co = lc->co;
    if (!co || lc->suspended || st->running == lc || lua_status(co) != 0 ||
        st->nspare_co == LB_SPARE_CO) {
        drop_thread(lc);
        return;
    }
    lua_settop(co, 0); /* the last call's values: nothing kept alive */
    lua_pushvalue(st->L, LUA_GLOBALSINDEX);
    lua_xmove(st->L, co, 1);
    lua_replace(co, LUA_GLOBALSINDEX);
    st->spare_co[st->nspare_co++] = lc->co_ref;
    lc->co_ref = LUA_NOREF;
    lc->co = NULL;
}

void lb_conn_free(struct lb_conn *lc)
{
    if (!lc->st)
        return;
    drop_ctx(lc);
    spare_thread(lc);
    lb_state_release(lc->st);
    lc->st = NULL;
}

const char *lb_family_name(char f)
{
    switch (f) {
    case '4': return "inet";
    case '6': return "inet6";
    case 'L': return "unix";
    default: return "unknown";
    }
}

/* Pushes a NUL-separated list as a Lua array. */
static void push_list(lua_State *co, const char *list, size_t len,
                      unsigned count)
{
    size_t pos = 0;
    lua_createtable(co, (int)count, 0);
    for (int i = 1;; i++) {
        struct wire_str a = wire_list_next(list, len, &pos);
        if (!a.p)
            break;
        lua_pushlstring(co, a.p, a.n);
        lua_rawseti(co, -2, i);
    }
}

static unsigned name_hash(const char *p, size_t n)
{
    return ((unsigned)n * 31u + (unsigned char)p[0] * 7u +
            (unsigned char)p[n / 2] * 3u + (unsigned char)p[n - 1]) %
           LB_NAMES;
}

int lb_name_slot(struct lb_state *st, const char *p, size_t n)
{
    if (n == 0 || n > LB_NAME_MAX)
        return 0;
    unsigned i = name_hash(p, n);
    struct lb_name *e = &st->names[i];
    if (e->kept && e->len == n && memcmp(e->p, p, n) == 0)
        return (int)i + 1;
    e->kept = 0;
    e->len = (uint8_t)n;
    memcpy(e->p, p, n);
    return -(int)i - 1;
}

void lb_name_kept(struct lb_state *st, int k)
{
    if (k >= 1 && k <= LB_NAMES)
        st->names[k - 1].kept = 1;
}

void lb_push_names(struct lb_state *st, lua_State *co)
{
    if (st->names_ref == 0) { /* an array of false, filled as names come */
        lua_State *L = st->L;
        lua_createtable(L, LB_NAMES, 0);
        for (int k = 1; k <= LB_NAMES; k++) {
            lua_pushboolean(L, 0);
            lua_rawseti(L, -2, k);
        }
        st->names_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_rawgeti(co, LUA_REGISTRYINDEX, st->names_ref);
}

/* Pushes a header name: the slot's string when it is this name, pushed
 * again without hashing and interning it anew. */
void lb_push_name(struct lb_state *st, lua_State *co, const char *p,
                  size_t n)
{
    int k = lb_name_slot(st, p, n);
    if (k > 0) {
        lb_push_names(st, co);
        lua_rawgeti(co, -1, k);
        lua_remove(co, -2);
        return;
    }
    lua_pushlstring(co, p, n);
    if (k < 0) {
        lb_push_names(st, co);
        lua_pushvalue(co, -2);
        lua_rawseti(co, -2, -k);
        lua_pop(co, 1);
        lb_name_kept(st, -k);
    }
}

/* Pushes the handler's arguments after ctx; returns how many. */
static int push_args(struct lb_state *st, lua_State *co, int ev,
                     const struct wire_cmd *c)
{
    unsigned want = st->nargs[ev];
    if (want == 0)
        return 0;
    switch (ev) {
    case SE_CONNECT:
        lua_pushlstring(co, c->s1.p, c->s1.n);
        if (want < 2)
            return 1;
        lua_createtable(co, 0, 3);
        lua_pushstring(co, lb_family_name(c->family));
        lua_setfield(co, -2, "family");
        if (c->family != 'U') {
            lua_pushlstring(co, c->s2.p, c->s2.n);
            lua_setfield(co, -2, "address");
            lua_pushinteger(co, c->port);
            lua_setfield(co, -2, "port");
        }
        return 2;
    case SE_HELO:
    case SE_UNKNOWN:
        lua_pushlstring(co, c->s1.p, c->s1.n);
        return 1;
    case SE_ENVFROM:
    case SE_ENVRCPT:
        lua_pushlstring(co, c->s1.p, c->s1.n);
        if (want < 2)
            return 1;
        push_list(co, c->list, c->list_len, c->list_count);
        return 2;
    case SE_HEADER:
        lb_push_name(st, co, c->s1.p, c->s1.n);
        if (want < 2)
            return 1;
        lua_pushlstring(co, c->s2.p, c->s2.n);
        return 2;
    case SE_BODY:
        lua_pushlstring(co, (const char *)c->body, c->body_len);
        return 1;
    default:
        return 0;
    }
}

/* Makes sure the connection has a coroutine and a live ctx. */
int lb_prepare(struct lb_conn *lc, struct sess *s)
{
    lua_State *L = lc->st->L;
    if (!lc->co && lc->st->nspare_co) {
        lc->co_ref = lc->st->spare_co[--lc->st->nspare_co];
        lua_rawgeti(L, LUA_REGISTRYINDEX, lc->co_ref);
        lc->co = lua_tothread(L, -1);
        lua_pop(L, 1);
    }
    if (!lc->co) {
        lc->co = lua_newthread(L);
        lc->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if (lc->ctx && lc->ctx->conn_seq != s->conn_seq)
        drop_ctx(lc); /* QUIT_NC started a new session: fresh ctx.conn */
    if (!lc->ctx) {
        lc->ctx = lctx_push(L, s);
        lc->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    return 0;
}

/*
 * Logs a handler's error with the script's line. No line of a script is
 * left on the coroutine when the handler failed in a function it called
 * as `return f(...)` (a tail call, `return milter.reject("x")`): then the
 * message names the handler's tail calls.
 */
static void report_error(struct lb_conn *lc, struct sess *s, const char *msg)
{
    lua_State *L = lc->st->L;
    const char *ev = sess_event_names[lc->ev];
    char tail[512] = "", at[512];
    msg = lheld_unblame(msg);
    if (!lwhere_frame(lc->co, 0, at, sizeof at)) {
        /* No line: the top frame of a dead coroutine has none. The
         * handler's own code failed (the VM or the timeout raised it) when
         * its frame is there; a tail call replaced that frame. */
        lua_rawgeti(L, LUA_REGISTRYINDEX, lc->st->handler[lc->ev]);
        if (!lwhere_on_stack(L, -1, lc->co) &&
            !lwhere_sites(L, -1, 1, tail, sizeof tail))
            lwhere_def(L, -1, tail, sizeof tail);
        lua_pop(L, 1);
    }
    lwhere_push_error(L, lc->co, 0, msg);
    if (*tail) {
        lua_pushfstring(L, " (in a tail call, `return f(...)`, of %s at %s)",
                        ev, tail);
        lua_concat(L, 2);
    }
    luaL_traceback(L, lc->co, lua_tostring(L, -1), 0);
    lheld_trim(L);
    log_msg(LL_ERR, s->id, sess_qid(s), "handler %s failed: %s", ev,
            lua_tostring(L, -1));
    lua_pop(L, 2);
}

/*
 * Runs the connection's coroutine until the handler returns, fails or
 * waits on a lookup; nargs values on co are its arguments (a new call) or
 * the lookup's results (a resume). The one path of every handler's verdict.
 */
int lb_run_slice(struct lb_conn *lc, struct sess *s, int nargs,
                 struct verdict *v)
{
    struct lb_state *st = lc->st;
    lua_State *L = st->L;
    lua_State *co = lc->co;
    int ev = lc->ev;
    lb_busy_since = lc->started; /* the budget counts the waits too */
    st->deadline = lc->deadline;
    st->in_call = 1;
    st->running = lb_running = lc;
    lc->suspended = 0;
    int status = lua_resume(co, nargs);
    st->running = lb_running = NULL;
    end_call(st);
    if (status == LUA_YIELD && lc->wait.active) {
        lc->suspended = 1;
        lb_busy_since = 0; /* waiting is no runaway */
        return LB_WAIT;
    }
    int rc = 0;
    if (status == 0) {
        const char *why = NULL;
        char whybuf[512];
        if (ev == SE_ABORT || ev == SE_CLOSE)
            ; /* nothing is sent back: the return value does not matter */
        else if (lverdict_read(st, co, lua_gettop(co) ? 1 : 0, ev, s, v, &why,
                               whybuf, sizeof whybuf) < 0) {
            char def[256], ret[512];
            lua_rawgeti(L, LUA_REGISTRYINDEX, st->handler[ev]);
            lwhere_def(L, -1, def, sizeof def);
            lwhere_sites(L, -1, 0, ret, sizeof ret);
            lua_pop(L, 1);
            log_msg(LL_ERR, s->id, sess_qid(s),
                    "bad verdict from %s (handler at %s%s%s): %s",
                    sess_event_names[ev], def, *ret ? ", returned at " : "",
                    ret, why);
            rc = -1;
        }
    } else {
        const char *msg = status == LUA_YIELD
                              ? "handler yielded outside a coroutine of its own"
                              : lua_tostring(co, -1);
        if (!msg)
            msg = "(error object is not a string)";
        report_error(lc, s, msg);
        drop_thread(lc); /* a dead coroutine cannot run again */
        if (status == LUA_ERRMEM) { /* give the memory back now */
            log_msg(LL_ERR, s->id, sess_qid(s),
                    "the Lua state reached --script-memory (%zu bytes)",
                    max_memory);
            lua_gc(L, LUA_GCCOLLECT, 0);
        }
        rc = -1;
    }
    ltcp_close_all(lc); /* a socket left open ends with its handler */
    lc->held_s = NULL;  /* a batch of held headers is over */
    /* the watchdog watched the verdict's reading too: a huge verdict
     * table is the handler's doing */
    lb_busy_since = 0;
    if (ev == SE_CLOSE)
        drop_ctx(lc);
    return rc;
}

int lb_call(struct lb_conn *lc, struct sess *s, int ev,
            const struct wire_cmd *cmd, struct verdict *v)
{
    struct lb_state *st = lc->st;
    lb_prepare(lc, s);
    lua_State *co = lc->co;
    lc->held_s = NULL;
    lua_settop(co, 0);
    lua_rawgeti(co, LUA_REGISTRYINDEX, st->handler[ev]);
    lua_rawgeti(co, LUA_REGISTRYINDEX, lc->ctx_ref);
    lctx_sync(co, 2, lc->ctx);
    int nargs = 1 + (cmd ? push_args(st, co, ev, cmd) : 0);
    lc->ev = ev;
    lc->started = lb_now();
    lc->deadline = lc->started + script_timeout;
    return lb_run_slice(lc, s, nargs, v);
}

int lb_resume(struct lb_conn *lc, struct sess *s, struct verdict *v)
{
    if (!lc->suspended || lc->wait.active || !lc->co)
        return -1; /* nothing to resume: the glue's bug, not the script's */
    return lb_run_slice(lc, s, lc->wait.nres, v);
}

void lb_abandon(struct lb_conn *lc)
{
    if (!lc->suspended)
        return;
    if (lc->wait.active && lc->wait.cancel)
        lc->wait.cancel(lc->wait.op);
    memset(&lc->wait, 0, sizeof lc->wait);
    lc->suspended = 0;
    lc->held_s = NULL;
    ltcp_close_all(lc);
    drop_thread(lc); /* never resumed: the next call gets a new one */
    if (lc->ev == SE_CLOSE)
        drop_ctx(lc);
}
