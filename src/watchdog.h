/*
 * watchdog: ends a handler that cannot be stopped from inside the VM. LuaJIT
 * runs no hook in compiled code or a long C call, so a handler past
 * --script-timeout + WATCHDOG_GRACE is ended from SIGALRM; a fault (SIGSEGV,
 * SIGBUS) while a handler runs is caught the same way. Either way the
 * connection whose handler was running gets its pending replies and the
 * on-error reply, and a report in shared memory tells the supervisor which
 * handler and connection it was.
 */
#ifndef LUAMILTER_WATCHDOG_H
#define LUAMILTER_WATCHDOG_H

#include <stddef.h>
#include <stdint.h>

#include "sess.h"

/*
 * What the watchdog leaves for the supervisor (in memory both share) before
 * the worker exits with CONN_WD_STATUS, or dies of a fault: the event whose
 * handler overran or faulted (CONN_WD_TOPLEVEL: the script's top level),
 * its connection and that connection's generation. The supervisor sets ev
 * to CONN_WD_NONE (and crash, oom to 0) before each worker starts.
 */
struct conn_wd_report {
    int ev;
    unsigned gen;
    uint64_t cid;
    int crash;       /* the signal of a fault (SIGSEGV, SIGBUS) that ended
                        it, 0: the budget did */
    int oom;         /* that call had been refused memory (--script-memory) */
};
#define CONN_WD_NONE (-2)
#define CONN_WD_TOPLEVEL (-1)
#define CONN_WD_STATUS 70

/* Arms the worker's watchdog for handlers (and a top level) that overrun
 * their budget; rep (borrowed, may be NULL) receives the report. */
void conn_watchdog_start(const struct sess_cfg *cfg, double script_timeout,
                         volatile struct conn_wd_report *rep);

/* The handler about to run: its connection's fd (-1: nothing to write),
 * its replies not yet written (borrowed until watchdog_unwatch), whether
 * the MTA waits for an answer, the event, connection id and generation. */
void watchdog_watch(int fd, const uint8_t *pending, size_t npending,
                    int reply, int ev, uint64_t cid, unsigned gen);
/* It returned (or waits on a lookup). */
void watchdog_unwatch(void);

#endif
