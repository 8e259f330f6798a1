/* notify: see notify.h. */
#define _GNU_SOURCE
#include "notify.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <systemd/sd-daemon.h>

#include "log.h"

static char sock[4096]; /* NOTIFY_SOCKET as it was given, or "" */

void notify_init(void)
{
    const char *s = getenv("NOTIFY_SOCKET");
    if (s && *s && strlen(s) < sizeof sock)
        memcpy(sock, s, strlen(s) + 1);
    unsetenv("NOTIFY_SOCKET");
}

/*
 * sd_notify() reads the socket from the environment: it is put back for
 * the one call, which removes it again (unset_environment), so a child
 * forked later never sees it.
 */
static void send_state(const char *state)
{
    if (!sock[0])
        return;
    if (setenv("NOTIFY_SOCKET", sock, 1) < 0)
        return;
    int r = sd_notify(1, state);
    unsetenv("NOTIFY_SOCKET"); /* whatever sd_notify did */
    if (r < 0)
        log_msg(LL_WARN, 0, NULL, "cannot notify systemd (%s): %s", sock,
                strerror(-r));
    else if (log_enabled(LL_DEBUG)) {
        char line[256];
        snprintf(line, sizeof line, "%s", state);
        for (char *p = line; *p; p++)
            if (*p == '\n')
                *p = ' '; /* one log line */
        log_msg(LL_DEBUG, 0, NULL, "notified systemd: %s", line);
    }
}

/* "STATUS=serving generation ..." after prefix, into m. */
static void serving_line(char *m, size_t n, const char *prefix, unsigned gen,
                         int serving, int workers, int reload_failed)
{
    const char *failed =
        reload_failed ? " (the last reload failed: see the log)" : "";
    if (serving < workers)
        snprintf(m, n,
                 "%sSTATUS=serving generation %u with %d of %d workers "
                 "(replacing a worker)%s",
                 prefix, gen, serving, workers, failed);
    else
        snprintf(m, n, "%sSTATUS=serving generation %u with %d worker%s%s",
                 prefix, gen, workers, workers == 1 ? "" : "s", failed);
}

void notify_ready(unsigned gen, int workers, int reload_failed)
{
    char m[256];
    serving_line(m, sizeof m, "READY=1\n", gen, workers, workers,
                 reload_failed);
    send_state(m);
}

void notify_serving(unsigned gen, int serving, int workers, int reload_failed)
{
    char m[256];
    serving_line(m, sizeof m, "", gen, serving, workers, reload_failed);
    send_state(m);
}

void notify_reloading(unsigned gen)
{
    struct timespec ts;
    unsigned long long usec = 0;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0)
        usec = (unsigned long long)ts.tv_sec * 1000000ull +
               (unsigned long long)ts.tv_nsec / 1000ull;
    char m[256];
    snprintf(m, sizeof m,
             "RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading: generation "
             "%u serving",
             usec, gen);
    send_state(m);
}

void notify_stopping(void)
{
    send_state("STOPPING=1\nSTATUS=stopping: finishing open conversations");
}
