/* reload: see reload.h. */
#define _GNU_SOURCE
#include "reload.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "lb.h"

#define GRACE 1.0 /* past --script-timeout, as the workers' watchdog */

/* In the child: loads the bytes, writes "+" or "-error" and exits. */
static void checker(int out, const char *path, const char *src, size_t len,
                    double timeout)
{
    static const int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGALRM, SIGCHLD};
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        signal(sigs[i], SIG_DFL);
    alarm((unsigned)timeout + 3); /* in case the supervisor is gone */
    prctl(PR_SET_NAME, "luamilter-check"); /* not a worker, in ps and /proc */
    char err[2048];
    err[0] = '-';
    struct lb_state *st = lb_load_buffer(path, src, len, err + 1,
                                         sizeof err - 1);
    const char *msg = st ? "+" : err;
    ssize_t w = write(out, msg, strlen(msg));
    _exit(st && w == 1 ? 0 : 1);
}

static pid_t fork_checker(const char *path, const char *src, size_t len,
                          double timeout, int *rfd, char *err, size_t n)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        snprintf(err, n, "%s: cannot check the script: pipe: %s", path,
                 strerror(errno));
        return -1;
    }
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        close(p[0]);
        checker(p[1], path, src, len, timeout);
    }
    close(p[1]);
    if (pid < 0) {
        snprintf(err, n, "%s: cannot check the script: fork: %s", path,
                 strerror(errno));
        close(p[0]);
        return -1;
    }
    fcntl(p[0], F_SETFL, O_NONBLOCK);
    *rfd = p[0];
    return pid;
}

/* Turns what the child wrote and how it ended into NULL (ok) or err. */
static const char *verdict(const char *path, double timeout, char *buf,
                           size_t got, int status, int killed, char *err,
                           size_t n)
{
    buf[got] = '\0';
    if (killed)
        snprintf(err, n,
                 "%s: the script's top level did not return within "
                 "--script-timeout (%gs)",
                 path, timeout);
    else if (got == 1 && buf[0] == '+' && WIFEXITED(status) &&
             WEXITSTATUS(status) == 0)
        return NULL;
    else if (got > 1 && buf[0] == '-')
        snprintf(err, n, "%s", buf + 1);
    else if (WIFSIGNALED(status))
        snprintf(err, n, "%s: checking the script: killed by signal %d (%s)",
                 path, WTERMSIG(status), strsignal(WTERMSIG(status)));
    else
        snprintf(err, n, "%s: the script's top level exited with status %d",
                 path, WEXITSTATUS(status));
    return err;
}

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int reload_check_sync(const char *path, const char *src, size_t len,
                      double timeout, char *err, size_t errlen)
{
    int fd;
    pid_t pid = fork_checker(path, src, len, timeout, &fd, err, errlen);
    if (pid < 0)
        return -1;
    char buf[2100];
    size_t got = 0;
    int killed = 0, status = 0;
    double deadline = now_mono() + timeout + GRACE;
    for (;;) {
        double left = deadline - now_mono();
        if (left <= 0) {
            kill(pid, SIGKILL);
            killed = 1;
            break;
        }
        struct pollfd pf = {fd, POLLIN, 0};
        if (poll(&pf, 1, (int)(left * 1000) + 1) < 0 && errno != EINTR)
            break;
        ssize_t r = read(fd, buf + got, sizeof buf - 1 - got);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
            break; /* EOF: the child is done */
        if (r > 0 && (got += (size_t)r) == sizeof buf - 1)
            break;
    }
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    close(fd);
    return verdict(path, timeout, buf, got, status, killed, err, errlen)
               ? -1
               : 0;
}

static void finish(struct ev_loop *loop, struct reload *r, int status)
{
    char buf[2100], err[2200];
    ssize_t got = read(r->fd, buf, sizeof buf - 1);
    const char *e = verdict(r->path, r->timeout, buf, got > 0 ? (size_t)got : 0,
                            status, r->killed, err, sizeof err);
    reload_done_fn done = r->done;
    char *src = r->src;
    size_t len = r->len;
    r->src = NULL;
    reload_cancel(loop, r, 0); /* idle again: done may start the next */
    done(r, src, len, e);
    free(src);
}

static void on_child(struct ev_loop *loop, ev_child *w, int revents)
{
    (void)revents;
    struct reload *r = (struct reload *)((char *)w -
                                         offsetof(struct reload, child));
    finish(loop, r, w->rstatus);
}

static void on_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct reload *r = (struct reload *)((char *)w -
                                         offsetof(struct reload, deadline));
    r->killed = 1;
    kill(r->pid, SIGKILL); /* on_child reports it */
}

int reload_start(struct ev_loop *loop, struct reload *r, const char *path,
                 char *src, size_t len, double timeout, reload_done_fn done,
                 char *err, size_t errlen)
{
    int fd;
    pid_t pid = fork_checker(path, src, len, timeout, &fd, err, errlen);
    if (pid < 0) {
        free(src);
        return -1;
    }
    *r = (struct reload){.pid = pid, .fd = fd, .path = path, .src = src,
                         .len = len, .timeout = timeout, .done = done};
    ev_child_init(&r->child, on_child, pid, 0);
    ev_child_start(loop, &r->child);
    ev_timer_init(&r->deadline, on_deadline, timeout + GRACE, 0);
    ev_timer_start(loop, &r->deadline);
    return 0;
}

void reload_cancel(struct ev_loop *loop, struct reload *r, int kill_child)
{
    if (!r->pid)
        return;
    if (kill_child)
        kill(r->pid, SIGKILL);
    ev_child_stop(loop, &r->child);
    ev_timer_stop(loop, &r->deadline);
    close(r->fd);
    free(r->src);
    r->src = NULL;
    r->pid = 0;
}
