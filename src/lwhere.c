/*
 * lwhere: the script's file:line for the bridge's messages (part of the Lua
 * bridge). A handler error is located at the innermost line of a script
 * file on the failed coroutine; a bad verdict at the handler's return.
 * `return milter.reject(...)` is a tail call, which replaces the handler's
 * frame: for it (and for any verdict, which is read after the handler
 * returned) the lines come from the handler's bytecode, which lists where
 * it returns a value or makes a tail call.
 */
#include "lb_int.h"

#include <stdio.h>
#include <string.h>

void lwhere_def(lua_State *L, int idx, char *out, size_t n)
{
    lua_Debug ar;
    lua_pushvalue(L, idx);
    if (lua_getinfo(L, ">S", &ar))
        snprintf(out, n, "%s:%d", ar.short_src, ar.linedefined);
    else
        snprintf(out, n, "?");
}

/*
 * Given a function and a flag (tail calls only), returns "file:12",
 * "file:12 or 15", "file:12, 15 or 20", or nothing when the function has
 * no such site or jit.util/jit.vmdef are missing.
 */
static const char sites_lua[] =
    "local f, tails = ...\n"
    "local okv, vmdef = pcall(require, 'jit.vmdef')\n"
    "local oku, util = pcall(require, 'jit.util')\n"
    "if not (okv and oku) then return end\n"
    "local want = tails and { CALLT = true, CALLMT = true } or\n"
    "  { RET = true, RET1 = true, RETM = true, CALLT = true, CALLMT = true }\n"
    "local seen, lines, pc = {}, {}, 1\n"
    "while true do\n"
    "  local ins = util.funcbc(f, pc)\n"
    "  if not ins then break end\n"
    "  local o = 6 * bit.band(ins, 0xff)\n"
    "  local op = vmdef.bcnames:sub(o + 1, o + 6):gsub(' +$', '')\n"
    "  local line = util.funcinfo(f, pc).currentline\n"
    "  if want[op] and line and not seen[line] then\n"
    "    seen[line] = true\n"
    "    lines[#lines + 1] = line\n"
    "  end\n"
    "  pc = pc + 1\n"
    "end\n"
    "if #lines == 0 then return end\n"
    "table.sort(lines)\n"
    "local s = debug.getinfo(f, 'S').short_src .. ':' .. lines[1]\n"
    "for i = 2, #lines do\n"
    "  s = s .. (i == #lines and ' or ' or ', ') .. lines[i]\n"
    "end\n"
    "return s\n";

int lwhere_sites(lua_State *L, int idx, int tails, char *out, size_t n)
{
    *out = '\0';
    int top = lua_gettop(L);
    if (idx < 0)
        idx = top + idx + 1;
    if (luaL_loadbuffer(L, sites_lua, sizeof sites_lua - 1, "=milter.where"))
        goto done;
    lua_pushvalue(L, idx);
    lua_pushboolean(L, tails);
    if (lua_pcall(L, 2, 1, 0) == 0 && lua_type(L, -1) == LUA_TSTRING)
        snprintf(out, n, "%s", lua_tostring(L, -1));
done:
    lua_settop(L, top);
    return *out != '\0';
}

/* Whether msg starts with a position, "chunk:LINE:". */
static int has_position(const char *msg)
{
    const char *c = strchr(msg, ':');
    if (!c || c == msg || c[1] < '0' || c[1] > '9')
        return 0;
    for (c++; *c >= '0' && *c <= '9'; c++)
        ;
    return *c == ':';
}

int lwhere_frame(lua_State *co, int level, char *out, size_t n)
{
    lua_Debug ar;
    for (; lua_getstack(co, level, &ar); level++)
        if (lua_getinfo(co, "Sl", &ar) && ar.source[0] == '@' &&
            ar.currentline > 0) {
            snprintf(out, n, "%s:%d", ar.short_src, ar.currentline);
            return 1;
        }
    *out = '\0';
    return 0;
}

int lwhere_on_stack(lua_State *L, int idx, lua_State *co)
{
    lua_Debug ar;
    int found = 0;
    if (idx < 0)
        idx = lua_gettop(L) + idx + 1;
    for (int level = 0; !found && lua_getstack(co, level, &ar); level++)
        if (lua_getinfo(co, "f", &ar)) {
            lua_xmove(co, L, 1);
            found = lua_rawequal(L, -1, idx);
            lua_pop(L, 1);
        }
    return found;
}

void lwhere_push_error(lua_State *L, lua_State *co, int level,
                       const char *msg)
{
    char where[512];
    if (!has_position(msg) && lwhere_frame(co, level, where, sizeof where))
        lua_pushfstring(L, "%s: %s", where, msg);
    else
        lua_pushstring(L, msg);
}

const char *lb_handler_site(struct lb_conn *lc, int ev)
{
    struct lb_state *st = lc->st;
    if (!st || ev < 0 || ev >= SE__COUNT || !(st->handlers & SE_BIT(ev)))
        return "";
    if (!(st->sites_made & SE_BIT(ev))) {
        lua_State *L = st->L;
        char *out = st->sites[ev];
        lua_rawgeti(L, LUA_REGISTRYINDEX, st->handler[ev]);
        lwhere_def(L, -1, out, sizeof st->sites[ev]);
        lua_pop(L, 1);
        st->sites_made |= SE_BIT(ev);
    }
    return st->sites[ev];
}
