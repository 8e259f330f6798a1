/*
 * daemon: the supervisor's duties as a daemon, each a plain function of
 * the process: the pidfile, the run-time identity, detaching from the
 * terminal, absolute paths (a daemon's cwd becomes /). No loop, no Lua.
 */
#ifndef LUAMILTER_DAEMON_H
#define LUAMILTER_DAEMON_H

#include <stddef.h>
#include <sys/types.h>

/* Refuses (-1, err) a pidfile that names a live process. */
int daemon_pidfile_check(const char *pidfile, char *err, size_t n);
/* Writes our pid to a temporary file and renames it into place. */
int daemon_pidfile_write(const char *pidfile, char *err, size_t n);

/* The identity --user/--group name, resolved before dropping root. */
struct daemon_ids {
    uid_t uid;
    gid_t gid;
    const char *name; /* for initgroups */
    int set_uid, set_gid;
};
/* Looks user and group (either may be NULL) up; -1 with err. */
int daemon_ids(const char *user, const char *group, struct daemon_ids *id,
               char *err, size_t n);
/* Hands the unix socket sock ("" for none) to the run-time identity, then
 * drops root for good; -1 with err. */
int daemon_drop_privileges(const struct daemon_ids *id, const char *sock,
                           char *err, size_t n);

/*
 * Detaches from the terminal. The original process waits on a pipe for
 * the daemon to report that it started (one NUL byte) or why not (the
 * text), and exits 0 or 1; the daemon gets the pipe's end in *report.
 */
int daemon_detach(int *report);

/* path made absolute against the cwd (in buf), or path itself. */
const char *daemon_absolute(const char *path, char *buf, size_t n);

#endif
