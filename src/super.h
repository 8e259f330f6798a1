/*
 * super: the process side of the server. A supervisor (master) process
 * binds the socket, does the daemon duties (--daemon, --pidfile, --user,
 * --group), loads and checks the script, and runs --workers worker
 * processes that share the listening socket, each with its own event loop
 * and Lua state. It restarts a worker that dies, forwards SIGHUP (reload)
 * once the new script has loaded, and stops everything on SIGTERM.
 */
#ifndef LUAMILTER_SUPER_H
#define LUAMILTER_SUPER_H

#include "conn.h"

struct super_opts {
    const char *listen;
    const char *script;
    unsigned socket_mode;
    double shutdown_timeout;
    int workers;           /* >= 1 */
    const char *pidfile;   /* or NULL */
    const char *user;      /* or NULL */
    const char *group;     /* or NULL */
    int daemon;
    double script_timeout; /* seconds per handler call */
    size_t script_memory;  /* bytes per Lua state */
    const char *metrics;   /* --metrics SPEC, or NULL */
};

/*
 * Serves until stopped. srv holds the per-connection settings (cfg,
 * idle_timeout, max_frame, max_conns). Returns the exit status.
 */
int super_run(const struct super_opts *o, struct server *srv);

#endif
