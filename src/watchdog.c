/* watchdog: see watchdog.h. */
#define _GNU_SOURCE
#include "watchdog.h"

#include <signal.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include "buf.h"
#include "lb.h"

/* Seconds past --script-timeout before the watchdog ends the worker. */
#define WATCHDOG_GRACE 1.0
static struct {
    double timeout;
    int fd;                 /* connection whose handler runs, or -1 */
    const uint8_t *pending; /* its replies not yet written (borrowed) */
    size_t npending;
    int reply;              /* the MTA waits for an answer */
    int ev;                 /* the event whose handler runs */
    uint64_t cid;           /* its connection */
    unsigned gen;           /* and that connection's script generation */
    volatile struct conn_wd_report *rep; /* where the supervisor reads why */
    uint8_t onerr[128];
    size_t nonerr;
} wd = {.fd = -1};

static void write_all(int fd, const void *p, size_t n)
{
    const char *s = p;
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

/* The running handler's end: its connection gets its pending replies and
 * the on-error reply, the supervisor a report. Async-signal-safe only:
 * plain stores and write(2). */
static void wd_report(int sig)
{
    if (wd.rep) {
        wd.rep->cid = wd.fd >= 0 ? wd.cid : 0;
        wd.rep->gen = wd.gen;
        wd.rep->crash = sig;
        wd.rep->oom = lb_refused_memory;
        wd.rep->ev = wd.fd >= 0 ? wd.ev : CONN_WD_TOPLEVEL;
    }
    if (wd.fd >= 0) {
        write_all(wd.fd, wd.pending, wd.npending);
        if (wd.reply)
            write_all(wd.fd, wd.onerr, wd.nonerr);
    }
}

static void on_alarm(int sig)
{
    (void)sig;
    double since = lb_busy_since;
    if (since == 0 || lb_now() - since < wd.timeout + WATCHDOG_GRACE)
        return;
    wd_report(0);
    _exit(CONN_WD_STATUS);
}

/*
 * A fault while a handler runs: LuaJIT after a refused allocation inside
 * compiled code, or a script's own ffi. Its message gets the on-error
 * reply (not a dropped connection), the supervisor learns which handler it
 * was, and the fault then takes its course (the previous action: a core
 * dump, or the sanitizer's report).
 */
static struct sigaction crash_prev[2];
static const int crash_sigs[2] = {SIGSEGV, SIGBUS};

static void on_crash(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    if (lb_busy_since != 0)
        wd_report(sig);
    int k = sig == SIGBUS;
    sigaction(sig, &crash_prev[k], NULL);
    if (si->si_code <= 0) /* sent, not raised by the fault: send it again */
        raise(sig);
    /* returning runs the faulting instruction again, under the old action */
}

static void crash_handlers(void)
{
    static char altstack[64 * 1024]; /* the fault may be a stack overflow */
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
    sigaltstack(&ss, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_crash;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    for (int k = 0; k < 2; k++)
        sigaction(crash_sigs[k], &sa, &crash_prev[k]);
}

void conn_watchdog_start(const struct sess_cfg *cfg, double script_timeout,
                         volatile struct conn_wd_report *rep)
{
    struct buf b;
    buf_init(&b, sizeof wd.onerr);
    if (sess_put_on_error(cfg, &b) == 0) {
        memcpy(wd.onerr, buf_head(&b), buf_len(&b));
        wd.nonerr = buf_len(&b);
    }
    buf_free(&b);
    wd.timeout = script_timeout;
    wd.rep = rep;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{1, 0}, {1, 0}};
    setitimer(ITIMER_REAL, &it, NULL);
    crash_handlers();
}

void watchdog_watch(int fd, const uint8_t *pending, size_t npending,
                    int reply, int ev, uint64_t cid, unsigned gen)
{
    wd.pending = pending;
    wd.npending = npending;
    wd.reply = reply;
    wd.ev = ev;
    wd.cid = cid;
    wd.gen = gen;
    wd.fd = fd;
}

void watchdog_unwatch(void) { wd.fd = -1; }
