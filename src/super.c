/* super: see super.h. */
#define _GNU_SOURCE
#include "super.h"

#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ctl.h"
#include "daemon.h"
#include "lb.h"
#include "aio.h"
#include "dnsr.h"
#include "rds.h"
#include "store.h"
#include "listen.h"
#include "log.h"
#include "metrics.h"
#include "metrics_http.h"
#include "notify.h"
#include "reload.h"

#define MAX_WORKERS 256

/* State shared by the supervisor and its workers (one MAP_SHARED mapping). */
struct shared {
    uint64_t next_id; /* connection ids, unique across workers */
    unsigned gen;     /* generation of the script the supervisor checked */
    struct conn_wd_report wd[MAX_WORKERS]; /* each slot's watchdog report */
};

struct slot {
    pid_t pid;
    int ctl;            /* the supervisor's end of the control socket */
    int owed;           /* the worker still needs the current generation */
    uint32_t done;      /* newest generation it reported done with */
    ev_tstamp started;
    ev_child child;
    ev_timer restart;
    ev_io io;           /* requests from the worker; writable when owed */
    ev_timer again;     /* resend after a lost or refused send */
    int stopped;        /* SIGSTOPped (ev_child traces it): not serving */
};

static const struct super_opts *O;
static struct server *S;
static struct listener L;
static struct shared *shm;
static struct slot slots[MAX_WORKERS];
static int stopping;
static ev_timer stop_timer;
static ev_signal sig_hup, sig_term, sig_int; /* the running process's */
static int pidfile_written;
static int script_fd = -1; /* memfd: the checked bytes of generation shm->gen */
static struct reload check; /* a reload being checked in a child */
static int hup_again;       /* SIGHUP during a check: check again after */
static int ready_owed = 1;  /* systemd awaits READY=1 (start, reload) */
static int reload_failed;   /* the last reload kept the old generation */
static struct metrics_slot *mslots; /* --metrics: one per worker slot */
static struct metrics_super msup;   /* the supervisor's own numbers */

/* ---- worker ---------------------------------------------------------- */

/*
 * The worker's end of the control channel (ctl.h): the supervisor sends
 * every new generation with the checked bytes as an fd; EOF means the
 * supervisor is gone.
 */
static ev_io control;
static ev_prepare orphaned; /* fed when the control channel ends */
static uint32_t lost_logged; /* newest lost generation already reported */

/* Loads the checked bytes behind fd; a state, or NULL with err set. */
static struct lb_state *load_fd(int fd, char *err, size_t n)
{
    struct stat sb;
    char *src = NULL;
    struct lb_state *st = NULL;
    if (fstat(fd, &sb) == 0 && (src = malloc((size_t)sb.st_size + 1)) &&
        pread(fd, src, (size_t)sb.st_size, 0) == sb.st_size)
        st = lb_load_buffer(O->script, src, (size_t)sb.st_size, err, n);
    else
        snprintf(err, n, "cannot read the checked script: %s",
                 strerror(errno));
    free(src);
    return st;
}

static void apply(int fd, uint32_t gen)
{
    char err[1024];
    struct lb_state *st = load_fd(fd, err, sizeof err);
    if (!st) {
        log_msg(LL_ERR, 0, NULL, "worker %d keeps generation %u: %s",
                (int)getpid(), S->gen, err);
        ctl_loaded(control.fd, gen); /* done with it all the same */
        return;
    }
    lb_state_release(S->script); /* open connections hold their own refs */
    S->script = st;
    S->cfg.handlers = lb_handlers(st);
    S->gen = gen;
    log_msg(LL_DEBUG, 0, NULL, "worker %d now serves generation %u",
            (int)getpid(), S->gen);
    ctl_loaded(control.fd, gen);
}

/*
 * Every pending control message, before a connection is accepted (a
 * connection made after the supervisor announced generation N gets at
 * least N). Only the newest generation is loaded, however many queued up
 * while the worker was busy; a generation whose fd did not arrive is
 * logged and asked for again.
 */
static void control_drain(void)
{
    uint32_t gen = 0, lost = 0;
    int fd = -1;
    if (!ev_is_active(&control))
        return;
    if (ctl_drain(control.fd, &gen, &fd, &lost) < 0) {
        log_msg(LL_ERR, 0, NULL, "worker %d: the supervisor is gone: stopping",
                (int)getpid());
        ev_io_stop(S->loop, &control);
        /* from the loop, not from here (an accept may be under way), and
         * not as a signal to ourselves: one still pending would merge
         * with it and this stop would go unseen */
        ev_feed_event(S->loop, &orphaned, EV_CUSTOM);
    }
    if (fd >= 0) {
        if (gen > S->gen)
            apply(fd, gen);
        close(fd);
    }
    if (lost > S->gen) {
        log_msg(lost != lost_logged ? LL_ERR : LL_DEBUG, 0, NULL,
                "worker %d did not receive the script of generation %u (out "
                "of file descriptors?): asking the supervisor again",
                (int)getpid(), lost);
        lost_logged = lost;
        if (ctl_ask_again(control.fd, lost) < 0)
            log_msg(LL_ERR, 0, NULL, "worker %d cannot ask for generation "
                    "%u: %s", (int)getpid(), lost, strerror(errno));
    }
}

static void worker_control(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    control_drain();
}

static void worker_drain_timeout(struct ev_loop *loop, ev_timer *w, int rev)
{
    (void)w;
    (void)rev;
    log_msg(LL_WARN, 0, NULL,
            "shutdown timeout: dropping %u open connection(s)", S->nconns);
    while (S->conns)
        conn_drop(S->conns, "server shutting down");
    ev_break(loop, EVBREAK_ALL);
}

/* Stops accepting; open connections finish (at most --shutdown-timeout). */
static void worker_begin_stop(struct ev_loop *loop)
{
    if (S->stopping)
        return;
    S->stopping = 1;
    listen_close(&L);
    if (!S->conns) {
        ev_break(loop, EVBREAK_ALL);
        return;
    }
    log_msg(LL_INFO, 0, NULL, "worker %d finishing %u connection(s)",
            (int)getpid(), S->nconns);
    ev_timer_init(&stop_timer, worker_drain_timeout, O->shutdown_timeout, 0);
    ev_timer_start(loop, &stop_timer);
}

static void worker_stop(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)w;
    (void)revents;
    if (S->stopping)
        _exit(0); /* a second signal: at once */
    worker_begin_stop(loop);
}

static void worker_orphaned(struct ev_loop *loop, ev_prepare *w, int revents)
{
    (void)w;
    (void)revents;
    worker_begin_stop(loop);
}

/*
 * Turns a freshly forked child into worker i: the supervisor's watchers are
 * stopped (a signal that already arrived stays pending for the worker's
 * own watcher of that signal), the script is loaded here from the bytes the
 * supervisor checked (so its top level runs in every worker, at start as on
 * reload), then the listener and signals are started.
 */
static void worker_run(int i, int ctl)
{
    struct ev_loop *loop = S->loop;
    ev_loop_fork(loop);
    aio_set_loop(loop); /* lookups of this worker */
    for (int k = 0; k < O->workers; k++) {
        ev_child_stop(loop, &slots[k].child);
        ev_timer_stop(loop, &slots[k].restart);
        ev_io_stop(loop, &slots[k].io);
        ev_timer_stop(loop, &slots[k].again);
        if (slots[k].ctl >= 0)
            close(slots[k].ctl); /* the other workers' channels */
    }
    reload_cancel(loop, &check, 0); /* the supervisor's, not ours */
    ev_signal_stop(loop, &sig_hup);
    ev_signal_stop(loop, &sig_term);
    ev_signal_stop(loop, &sig_int);
    signal(SIGHUP, SIG_IGN); /* reloads come from the supervisor only */
    /* Ctrl-C reaches the whole process group: the supervisor stops us with
     * SIGTERM, so one Ctrl-C lets open conversations finish, and its
     * second Ctrl-C ends us at once (SIGKILL from the supervisor). */
    signal(SIGINT, SIG_IGN);
    L.path[0] = '\0';        /* the supervisor removes the socket file */
    metrics_http_forget(loop);
    if (mslots)
        metrics_cur = &mslots[i]; /* a predecessor's counts go on from here */
    conn_watchdog_start(&S->cfg, O->script_timeout, &shm->wd[i]);
    char err[1024];
    S->gen = shm->gen;
    S->script = load_fd(script_fd, err, sizeof err);
    close(script_fd);
    if (!S->script) {
        log_msg(LL_ERR, 0, NULL, "worker %d cannot load generation %u: %s",
                (int)getpid(), S->gen, err);
        _exit(1);
    }
    S->cfg.handlers = lb_handlers(S->script);
    log_msg(LL_DEBUG, 0, NULL, "worker %d now serves generation %u",
            (int)getpid(), S->gen);
    ctl_loaded(ctl, S->gen);
    ev_prepare_init(&orphaned, worker_orphaned); /* fed, never started */
    ev_io_init(&control, worker_control, ctl, EV_READ);
    ev_io_start(loop, &control);
    L.before_accept = control_drain;
    listen_start(&L);
    ev_signal_init(&sig_term, worker_stop, SIGTERM);
    ev_signal_start(loop, &sig_term);
    control_drain(); /* a reload may have come while we loaded */
    ev_run(loop, 0);
    lb_state_release(S->script);
    store_close();
    dnsr_shutdown(); /* what the lookup engines still hold */
    rds_shutdown();
    _exit(0);
}

/* ---- supervisor ------------------------------------------------------ */

static void spawn(struct ev_loop *loop, int i);

static void on_restart(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct slot *sl = (struct slot *)((char *)w - offsetof(struct slot, restart));
    spawn(loop, (int)(sl - slots));
}

static int live_workers(void)
{
    int n = 0;
    for (int i = 0; i < O->workers; i++)
        n += slots[i].pid > 0;
    return n;
}

/* Sends the current generation to a worker that needs it, never waiting:
 * a full queue waits for the socket to become writable, and whatever is
 * newest by then is what goes. */
static void send_owed(struct ev_loop *loop, struct slot *sl)
{
    int events = EV_READ;
    if (sl->owed && sl->ctl >= 0) {
        if (ctl_send_script(sl->ctl, shm->gen, script_fd) == 0) {
            sl->owed = 0;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            events |= EV_WRITE;
        } else {
            log_msg(LL_WARN, 0, NULL, "worker %d missed generation %u: %s: "
                    "sending it again in 1s", (int)sl->pid, shm->gen,
                    strerror(errno));
            if (!ev_is_active(&sl->again))
                ev_timer_start(loop, &sl->again);
        }
    }
    if (sl->ctl >= 0 && (sl->io.events & (EV_READ | EV_WRITE)) != events) {
        ev_io_stop(loop, &sl->io);
        ev_io_set(&sl->io, sl->ctl, events);
        ev_io_start(loop, &sl->io);
    }
}

static void on_again(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct slot *sl = (struct slot *)((char *)w - offsetof(struct slot, again));
    sl->owed = 1;
    send_owed(loop, sl);
}

/*
 * READY=1 for systemd once every worker is done with the current
 * generation and no check is running: at start, and to end a reload
 * (whose RELOADING=1 on_hup sent).
 */
static void maybe_ready(void)
{
    if (!ready_owed || stopping || check.pid || hup_again)
        return;
    for (int i = 0; i < O->workers; i++)
        if (slots[i].pid <= 0 || slots[i].done < shm->gen)
            return;
    ready_owed = 0;
    notify_ready(shm->gen, O->workers, reload_failed);
}

/*
 * Between a start or reload's READY and the next reload, systemd's STATUS
 * follows the workers: a dead one being replaced, then all serving again.
 */
static void status_serving(void)
{
    if (ready_owed || stopping)
        return; /* READY=1 is still to come, with its own STATUS */
    int serving = 0;
    for (int i = 0; i < O->workers; i++)
        serving += slots[i].pid > 0 && slots[i].done >= shm->gen;
    notify_serving(shm->gen, serving, O->workers, reload_failed);
}

static void on_ctl(struct ev_loop *loop, ev_io *w, int revents)
{
    struct slot *sl = (struct slot *)((char *)w - offsetof(struct slot, io));
    if (revents & EV_READ) {
        uint32_t done = sl->done;
        int r = ctl_read_requests(sl->ctl, &sl->done);
        if (sl->done != done && ready_owed)
            maybe_ready();
        else if (sl->done != done)
            status_serving(); /* a replaced worker serves again */
        if (r < 0) { /* the worker is gone; on_child reaps it */
            ev_io_stop(loop, w);
            return;
        }
        if (r > 0 && !ev_is_active(&sl->again)) {
            log_msg(LL_DEBUG, 0, NULL, "worker %d asks for the script "
                    "again: sending generation %u in 1s", (int)sl->pid,
                    shm->gen);
            ev_timer_start(loop, &sl->again); /* time to free its fds */
        }
    }
    if (revents & EV_WRITE)
        send_owed(loop, sl);
}

/* Logs a worker's death; the watchdog's report says why it exited 70. */
static void log_death(int i, pid_t pid, int st)
{
    const struct conn_wd_report *wd = &shm->wd[i];
    if (wd->crash && wd->ev != CONN_WD_NONE) { /* a fault in a handler */
        char what[96], how[64];
        if (wd->ev >= 0 && wd->ev < SE__COUNT)
            snprintf(what, sizeof what, "handler %s on connection c=%llu",
                     sess_event_names[wd->ev], (unsigned long long)wd->cid);
        else
            snprintf(what, sizeof what, "the script's top level");
        if (WIFSIGNALED(st)) /* else a sanitizer reported it and exited */
            snprintf(how, sizeof how, "was killed by");
        else
            snprintf(how, sizeof how, "exited with status %d after",
                     WEXITSTATUS(st));
        log_gen = wd->gen;
        log_msg(LL_ERR, wd->cid, NULL, "worker %d %s signal %d (%s) in %s%s",
                (int)pid, how, wd->crash, strsignal(wd->crash), what,
                wd->oom ? ", after the Lua state was refused memory at "
                          "--script-memory (a LuaJIT fault)"
                        : "");
        log_gen = 0;
    } else if (WIFSIGNALED(st))
        log_msg(LL_ERR, 0, NULL, "worker %d was killed by signal %d (%s)",
                (int)pid, WTERMSIG(st), strsignal(WTERMSIG(st)));
    else if (WEXITSTATUS(st) == CONN_WD_STATUS && wd->ev >= 0 &&
             wd->ev < SE__COUNT) {
        log_gen = wd->gen;
        log_msg(LL_ERR, wd->cid, NULL,
                "worker %d exited with status %d: handler %s on connection "
                "c=%llu ran past --script-timeout and cannot be interrupted "
                "(a compiled loop or a C call)",
                (int)pid, CONN_WD_STATUS, sess_event_names[wd->ev],
                (unsigned long long)wd->cid);
        log_gen = 0;
    } else if (WEXITSTATUS(st) == CONN_WD_STATUS &&
               wd->ev == CONN_WD_TOPLEVEL)
        log_msg(LL_ERR, 0, NULL,
                "worker %d exited with status %d: the script's top level ran "
                "past --script-timeout and cannot be interrupted (a compiled "
                "loop or a C call)",
                (int)pid, CONN_WD_STATUS);
    else
        log_msg(LL_ERR, 0, NULL, "worker %d exited with status %d", (int)pid,
                WEXITSTATUS(st));
}

static void on_child(struct ev_loop *loop, ev_child *w, int revents)
{
    (void)revents;
    struct slot *sl = (struct slot *)((char *)w - offsetof(struct slot, child));
    int st = w->rstatus;
    if (WIFSTOPPED(st) || WIFCONTINUED(st)) { /* /health reports it */
        sl->stopped = WIFSTOPPED(st);
        return;
    }
    sl->stopped = 0;
    if (mslots) /* its connections died with it; its counts stay */
        __atomic_store_n(&mslots[sl - slots].conns_open, 0, __ATOMIC_RELAXED);
    ev_child_stop(loop, w);
    ev_io_stop(loop, &sl->io);
    ev_timer_stop(loop, &sl->again);
    if (sl->ctl >= 0)
        close(sl->ctl);
    sl->ctl = -1;
    sl->pid = 0;
    /* A worker exits 0 only when it was told to stop. A SIGTERM to the
     * whole process group reaches the workers as well as us, and their
     * exits can be seen before our own signal (libev reaps children at a
     * higher priority): that is a stop, not a death. */
    int asked = WIFEXITED(st) && WEXITSTATUS(st) == 0;
    if (stopping || (asked && (ev_is_pending(&sig_int) ||
                               ev_is_pending(&sig_term)))) {
        if (stopping && !live_workers())
            ev_break(loop, EVBREAK_ALL);
        return;
    }
    if (asked)
        log_msg(LL_WARN, 0, NULL, "worker %d was stopped by a signal of its "
                "own", (int)w->rpid);
    else
        log_death((int)(sl - slots), w->rpid, st);
    msup.restarts++;
    status_serving();
    /* a worker that dies at once would make us fork in a tight loop */
    double delay = ev_now(loop) - sl->started < 1.0 ? 1.0 : 0.0;
    log_msg(LL_INFO, 0, NULL, "starting a new worker%s",
            delay > 0 ? " in 1s" : "");
    ev_timer_set(&sl->restart, delay, 0);
    ev_timer_start(loop, &sl->restart);
}

static void spawn(struct ev_loop *loop, int i)
{
    struct slot *sl = &slots[i];
    int sv[2];
    if (ctl_pair(sv) < 0)
        sv[0] = sv[1] = -1;
    shm->wd[i].ev = CONN_WD_NONE;
    shm->wd[i].crash = shm->wd[i].oom = 0;
    pid_t pid = sv[0] < 0 ? -1 : fork();
    if (pid < 0) {
        log_msg(LL_ERR, 0, NULL, "cannot start a worker: %s: retrying in 1s",
                strerror(errno));
        if (sv[0] >= 0) {
            close(sv[0]);
            close(sv[1]);
        }
        ev_timer_set(&sl->restart, 1.0, 0);
        ev_timer_start(loop, &sl->restart);
        return;
    }
    if (pid == 0) {
        close(sv[0]);
        worker_run(i, sv[1]);
    }
    close(sv[1]);
    if (sl->ctl >= 0)
        close(sl->ctl);
    sl->ctl = sv[0];
    sl->owed = 0; /* it loads the current generation itself */
    sl->done = 0;
    sl->pid = pid;
    sl->started = ev_now(loop);
    ev_child_set(&sl->child, pid, 1); /* 1: stops and continues too */
    sl->stopped = 0;
    ev_child_start(loop, &sl->child);
    ev_io_set(&sl->io, sl->ctl, EV_READ);
    ev_io_start(loop, &sl->io);
}

/* A memfd holding src (what workers load), or -1 with errno set. */
static int script_memfd(const char *src, size_t len)
{
    int fd = memfd_create("luamilter-script", MFD_CLOEXEC);
    if (fd >= 0 && write(fd, src, len) != (ssize_t)len) {
        close(fd);
        return -1;
    }
    return fd;
}

static void start_check(struct ev_loop *loop);

/* The child's verdict on the script SIGHUP read (see reload.h). */
static void on_checked(struct reload *r, const char *src, size_t len,
                       const char *err)
{
    (void)r;
    int fd = err ? -1 : script_memfd(src, len);
    reload_failed = err || fd < 0;
    if (reload_failed)
        msup.reloads_failed++;
    else
        msup.reloads_ok++;
    if (reload_failed) {
        log_msg(LL_ERR, 0, NULL,
                "reload failed, generation %u keeps serving: %s", shm->gen,
                err ? err : "cannot pass the script to the workers");
    } else {
        close(script_fd); /* queued copies live on in the sockets */
        script_fd = fd;
        S->gen = ++shm->gen;
        for (int i = 0; i < O->workers; i++) {
            if (slots[i].pid > 0) {
                slots[i].owed = 1;
                send_owed(S->loop, &slots[i]); /* before we announce it */
            }
        }
        log_msg(LL_INFO, 0, NULL, "reloaded %s: generation %u", O->script,
                shm->gen);
    }
    if (hup_again && !stopping) {
        hup_again = 0;
        start_check(S->loop);
    }
    maybe_ready();
}

/* Reads the script once and checks those bytes in a child process. */
static void start_check(struct ev_loop *loop)
{
    char err[1024];
    size_t len;
    char *src = lb_read_file(O->script, &len, err, sizeof err);
    if (!src || reload_start(loop, &check, O->script, src, len,
                             O->script_timeout, on_checked, err,
                             sizeof err) < 0) {
        log_msg(LL_ERR, 0, NULL,
                "reload failed, generation %u keeps serving: %s", shm->gen,
                err);
        reload_failed = 1;
        msup.reloads_failed++;
        maybe_ready();
    }
}

static void signal_workers(int sig)
{
    for (int i = 0; i < O->workers; i++)
        if (slots[i].pid > 0)
            kill(slots[i].pid, sig);
}

static void on_hup(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)w;
    (void)revents;
    if (!ready_owed && !stopping)
        notify_reloading(shm->gen);
    ready_owed = 1;
    if (check.pid)
        hup_again = 1; /* one more check, of the file as it is then */
    else
        start_check(loop);
}

static void cleanup(void)
{
    if (O->metrics)
        metrics_http_stop(S->loop);
    if (pidfile_written && unlink(O->pidfile) < 0 && errno != ENOENT)
        log_msg(LL_WARN, 0, NULL, "cannot remove %s: %s", O->pidfile,
                strerror(errno));
    listen_close(&L);
}

static void on_stop_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)w;
    (void)revents;
    log_msg(LL_WARN, 0, NULL, "workers still running: killing them");
    signal_workers(SIGKILL);
    ev_break(loop, EVBREAK_ALL);
}

static void on_stop(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    if (stopping) {
        log_msg(LL_WARN, 0, NULL, "second signal %d: exiting now",
                w->signum);
        /* not a second SIGTERM: one that reached a worker before it ran
         * its handler for the first would merge with it, and that worker
         * would go on finishing its sessions */
        signal_workers(SIGKILL);
        cleanup();
        exit(0);
    }
    stopping = 1;
    notify_stopping();
    reload_cancel(loop, &check, 1);
    for (int i = 0; i < O->workers; i++) {
        ev_timer_stop(loop, &slots[i].restart);
        ev_timer_stop(loop, &slots[i].again);
    }
    log_msg(LL_INFO, 0, NULL, "signal %d: stopping", w->signum);
    listen_close(&L); /* new MTA connections fail fast from now on */
    signal_workers(SIGTERM);
    if (!live_workers()) {
        ev_break(loop, EVBREAK_ALL);
        return;
    }
    ev_timer_init(&stop_timer, on_stop_timeout, O->shutdown_timeout + 5, 0);
    ev_timer_start(loop, &stop_timer);
}

/* ---- --metrics -------------------------------------------------------- */

/* Workers serving: running (not stopped) with a script loaded. */
static int workers_ready(void)
{
    int n = 0;
    for (int i = 0; i < O->workers; i++)
        n += slots[i].pid > 0 && slots[i].done > 0 && !slots[i].stopped;
    return n;
}

static int render(char **out, size_t *len)
{
    msup.generation = shm->gen;
    msup.workers = O->workers;
    msup.workers_ready = workers_ready();
    return metrics_render(mslots, O->workers, &msup, out, len);
}

static int healthy(char *why, size_t n)
{
    for (int i = 0; i < O->workers; i++) {
        const struct slot *sl = &slots[i];
        if (sl->pid <= 0)
            snprintf(why, n, "worker %d is not running", i + 1);
        else if (sl->stopped)
            snprintf(why, n, "worker %d (pid %d) is stopped", i + 1,
                     (int)sl->pid);
        else if (!sl->done)
            snprintf(why, n, "worker %d (pid %d) has not loaded the script",
                     i + 1, (int)sl->pid);
        else
            continue;
        return 0;
    }
    if (stopping) {
        snprintf(why, n, "stopping");
        return 0;
    }
    return 1;
}

static int fail(int report, const char *err)
{
    if (report >= 0) {
        if (write(report, err, strlen(err)) < 0)
            log_msg(LL_ERR, 0, NULL, "%s", err);
    } else {
        fprintf(stderr, "luamilter: %s\n", err);
    }
    return 1;
}

int super_run(const struct super_opts *o, struct server *srv)
{
    static struct super_opts own;
    static char script[4096], pidfile[4096], listen[4200];
    notify_init(); /* before any fork: only we talk to systemd */
    own = *o;
    own.script = daemon_absolute(o->script, script, sizeof script);
    own.pidfile = daemon_absolute(o->pidfile, pidfile, sizeof pidfile);
    const char *colon = strchr(o->listen, ':');
    const char *upath = o->listen[0] == '/'         ? NULL
                        : !strncmp(o->listen, "unix:", 5)  ? o->listen + 5
                        : !strncmp(o->listen, "local:", 6) ? o->listen + 6
                                                           : NULL;
    if (upath && upath[0] != '/') {
        char abs[4096];
        snprintf(listen, sizeof listen, "%.*s:%s", (int)(colon - o->listen),
                 o->listen, daemon_absolute(upath, abs, sizeof abs));
        own.listen = listen;
    }
    o = &own;
    O = o;
    S = srv;
    lb_set_limits(O->script_timeout, O->script_memory);
    char err[2048];
    struct daemon_ids id;
    int report = -1;
    if (daemon_ids(O->user, O->group, &id, err, sizeof err) < 0 ||
        (O->pidfile && daemon_pidfile_check(O->pidfile, err, sizeof err) < 0))
        return fail(-1, err);
    if (listen_open(&L, S, O->listen, O->socket_mode, err, sizeof err) < 0) {
        char full[2200];
        snprintf(full, sizeof full, "cannot listen on %s: %s", O->listen, err);
        return fail(-1, full);
    }
    if (O->metrics && metrics_http_bind(O->metrics, err, sizeof err) < 0) {
        char full[2200];
        snprintf(full, sizeof full, "--metrics %s: %s", O->metrics, err);
        cleanup();
        return fail(-1, full);
    }
    if (O->daemon && daemon_detach(&report) < 0) {
        cleanup();
        return fail(-1, "cannot start the daemon");
    }
    if (O->pidfile && daemon_pidfile_write(O->pidfile, err, sizeof err) == 0)
        pidfile_written = 1;
    else if (O->pidfile) {
        cleanup();
        return fail(report, err);
    }
    if (daemon_drop_privileges(&id, L.path, err, sizeof err) < 0) {
        cleanup();
        return fail(report, err);
    }
    /* The store opens (and is created) as the run-time identity, once
     * here and closed again before any fork: an unusable path fails the
     * start rather than every call of every worker. */
    if (store_check(err, sizeof err) < 0) {
        cleanup();
        return fail(report, err);
    }
    /* The supervisor never runs the script itself: a child checks the
     * bytes (bounded by --script-timeout) and every worker loads them. */
    size_t len;
    char *src = lb_read_file(O->script, &len, err, sizeof err);
    if (!src || reload_check_sync(O->script, src, len, O->script_timeout,
                                  err, sizeof err) < 0 ||
        (script_fd = script_memfd(src, len)) < 0) {
        if (src && script_fd < 0 && !*err)
            snprintf(err, sizeof err, "memfd: %s", strerror(errno));
        free(src);
        cleanup();
        return fail(report, err);
    }
    free(src);
    shm = mmap(NULL, sizeof *shm, PROT_READ | PROT_WRITE,
               MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED) {
        cleanup();
        return fail(report, "mmap: out of memory");
    }
    if (O->metrics && !(mslots = metrics_map(O->workers))) {
        cleanup();
        return fail(report, "mmap: out of memory");
    }
    shm->gen = S->gen = 1;
    S->next_id = &shm->next_id;
    if (report >= 0) {
        int fd = open("/dev/null", O_RDWR);
        if (fd >= 0) {
            dup2(fd, 0);
            dup2(fd, 1);
            dup2(fd, 2);
            if (fd > 2)
                close(fd);
        }
        log_use_syslog("luamilter");
        if (write(report, "", 1) < 0)
            log_msg(LL_WARN, 0, NULL, "cannot report the start");
        close(report);
    }
    signal(SIGPIPE, SIG_IGN);
    struct ev_loop *loop = ev_default_loop(EVFLAG_AUTO);
    S->loop = loop;
    static const struct metrics_http_ops mops = {render, healthy};
    if (O->metrics && metrics_http_start(loop, &mops, err, sizeof err) < 0) {
        cleanup();
        return fail(-1, err);
    }
    log_msg(LL_INFO, 0, NULL,
            "luamilter serving %s on %s (generation 1, %d worker%s)",
            O->script, O->listen, O->workers, O->workers > 1 ? "s" : "");
    ev_signal_init(&sig_hup, on_hup, SIGHUP);
    ev_signal_init(&sig_term, on_stop, SIGTERM);
    ev_signal_init(&sig_int, on_stop, SIGINT);
    ev_signal_start(loop, &sig_hup);
    ev_signal_start(loop, &sig_term);
    ev_signal_start(loop, &sig_int);
    /* main() held SIGHUP until now: one sent during the start reloads */
    sigset_t hup;
    sigemptyset(&hup);
    sigaddset(&hup, SIGHUP);
    sigprocmask(SIG_UNBLOCK, &hup, NULL);
    for (int i = 0; i < O->workers; i++) {
        ev_init(&slots[i].restart, on_restart);
        ev_init(&slots[i].child, on_child);
        ev_init(&slots[i].io, on_ctl);
        ev_init(&slots[i].again, on_again);
        ev_timer_set(&slots[i].again, 1.0, 0);
        slots[i].ctl = -1;
    }
    for (int i = 0; i < O->workers; i++)
        spawn(loop, i);
    ev_run(loop, 0);
    cleanup();
    log_msg(LL_INFO, 0, NULL, "stopped");
    return 0;
}
