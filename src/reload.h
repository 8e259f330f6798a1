/*
 * reload: checks a script in a child process with a deadline, so that a
 * top level that never returns (a loop the JIT compiled, a long C call)
 * cannot stop the supervisor. The child loads the bytes exactly as a worker
 * will (lb_load_buffer) and writes its verdict to a pipe; a child that runs
 * past --script-timeout plus a grace second is killed. At start the check
 * is synchronous; on reload it runs on the supervisor's libev loop and
 * reports through a callback. Part of the supervisor (glue layer).
 */
#ifndef LUAMILTER_RELOAD_H
#define LUAMILTER_RELOAD_H

#include <ev.h>
#include <stddef.h>
#include <sys/types.h>

struct reload;
/* The check of src ended (r is idle again; src is borrowed and freed after
 * the call): err is NULL when the script loads, else one line. */
typedef void (*reload_done_fn)(struct reload *r, const char *src, size_t len,
                               const char *err);

/* One check in progress; embedded in the supervisor, zeroed when idle. */
struct reload {
    pid_t pid;          /* the checking child, 0 when idle */
    int fd;             /* read end of its verdict pipe */
    int killed;         /* we killed it at the deadline */
    const char *path;   /* borrowed: names the chunk in messages */
    char *src;          /* the bytes under check, owned */
    size_t len;
    double timeout;
    reload_done_fn done;
    ev_child child;
    ev_timer deadline;
};

/*
 * Checks src synchronously (bounded by timeout + 1 s); 0 when it loads,
 * else -1 with "path: ..." in err. Call before the loop exists.
 */
int reload_check_sync(const char *path, const char *src, size_t len,
                      double timeout, char *err, size_t errlen);

/*
 * Starts checking src (takes ownership) on loop; done runs once.
 * Returns -1 (src freed, err set) when no child could be started.
 */
int reload_start(struct ev_loop *loop, struct reload *r, const char *path,
                 char *src, size_t len, double timeout, reload_done_fn done,
                 char *err, size_t errlen);

/* Abandons a check in progress (kill_child: SIGKILL it); done never runs. */
void reload_cancel(struct ev_loop *loop, struct reload *r, int kill_child);

#endif
