/*
 * lsetup: what a script's Lua state gets before the script's top level
 * runs (part of the Lua bridge): the milter module loaded, with
 * milter.script_dir (also put first on package.path) and milter.settings
 * from --set, then the --preload file run in the same state.
 *
 * The settings and the preload bytes are taken once from the command line
 * and apply to every state loaded afterwards (the check child, every
 * worker, every reload), so a reload sees what the process started with.
 */
#include "lb_int.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct setting {
    const char *spec; /* borrowed: "NAME=VALUE" (argv) */
    size_t namelen;
};

static struct setting *settings;
static size_t nsettings;
static char *preload_src; /* owned; NULL without --preload */
static size_t preload_len;
static char preload_chunk[PATH_MAX + 2]; /* "@path" */

int lb_add_setting(const char *spec, char *err, size_t errlen)
{
    const char *eq = strchr(spec, '=');
    if (!eq || eq == spec) {
        snprintf(err, errlen, "--set wants NAME=VALUE, not '%s'", spec);
        return -1;
    }
    struct setting *p = realloc(settings, (nsettings + 1) * sizeof *p);
    if (!p) {
        snprintf(err, errlen, "--set: out of memory");
        return -1;
    }
    settings = p;
    settings[nsettings].spec = spec;
    settings[nsettings].namelen = (size_t)(eq - spec);
    nsettings++;
    return 0;
}

int lb_set_preload(const char *path, char *err, size_t errlen)
{
    size_t len;
    char *src = lb_read_file(path, &len, err, errlen);
    if (!src)
        return -1;
    free(preload_src);
    preload_src = src;
    preload_len = len;
    snprintf(preload_chunk, sizeof preload_chunk, "@%s", path);
    return 0;
}

/*
 * The absolute directory of path, without resolving the file's own name
 * (a symlinked script keeps the directory it is linked from): realpath of
 * the directory, or the current directory joined lexically when it does
 * not exist (a script given as bytes).
 */
static void script_dir(const char *path, char *out, size_t n)
{
    char dir[PATH_MAX], cwd[PATH_MAX];
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (slash == path)
        snprintf(dir, sizeof dir, "/");
    else
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    char *real = realpath(dir, NULL);
    if (real) {
        snprintf(out, n, "%s", real);
        free(real);
    } else if (dir[0] == '/' || !getcwd(cwd, sizeof cwd)) {
        snprintf(out, n, "%s", dir);
    } else {
        snprintf(out, n, "%s/%s", cwd, dir);
    }
}

/* Runs the function below it on the stack with the handler at tb. */
static int run(lua_State *L, int nargs, int nres, int tb, char *err,
               size_t errlen)
{
    if (lua_pcall(L, nargs, nres, tb) == 0)
        return 0;
    lb_error_text(L, err, errlen);
    lua_pop(L, 1);
    return -1;
}

int lsetup_run(lua_State *L, const char *path, int tb, char *err,
               size_t errlen)
{
    char dir[2 * PATH_MAX + 2];
    script_dir(path, dir, sizeof dir);
    /* package.path: the script's directory first */
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", dir, dir);
    lua_getfield(L, -2, "path");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);

    lua_getglobal(L, "require");
    lua_pushliteral(L, "milter");
    if (run(L, 1, 1, tb, err, errlen) < 0)
        return -1;
    lua_pushstring(L, dir);
    lua_setfield(L, -2, "script_dir");
    lua_createtable(L, 0, (int)nsettings);
    for (size_t i = 0; i < nsettings; i++) {
        lua_pushlstring(L, settings[i].spec, settings[i].namelen);
        lua_pushstring(L, settings[i].spec + settings[i].namelen + 1);
        lua_rawset(L, -3); /* a later --set of a name wins */
    }
    lua_setfield(L, -2, "settings");
    lua_pop(L, 1);

    if (!preload_src)
        return 0;
    const char *src = preload_src;
    size_t len = preload_len;
    lb_skip_hashbang(&src, &len);
    if (luaL_loadbuffer(L, src, len, preload_chunk)) {
        lb_error_text(L, err, errlen);
        lua_pop(L, 1);
        return -1;
    }
    return run(L, 0, 0, tb, err, errlen);
}
