/*
 * sendmail_shim.c: an LD_PRELOAD library for the private Sendmail of the
 * end-to-end suite (scripts/e2e-sendmail.sh).  Two things Sendmail takes
 * from the system, without a setting of its own, are answered here:
 *
 * 1. Its log.
 * Sendmail logs only through syslog(3), and the suite's machine has no
 * syslog daemon (and the suite must not start one or touch /dev/log).  With
 * this preloaded, every line Sendmail logs is appended to $SYSLOG_SHIM_FILE
 * as "<unix time> <ident>[<pid>]: <level>: <text>", so the suite can show
 * and check Sendmail's log as the Postfix suite does with its maillog.
 * The variable is read when the library loads (Sendmail replaces its
 * environment early), and the file is opened for each line (O_APPEND):
 * Sendmail forks for every connection and closes descriptors it does not
 * know about.
 *
 * 2. Its host name.  Before it reads its .cf, Sendmail qualifies
 * gethostname(2) through the system resolver, and when the answer has no
 * dot (this machine is "vm", and /etc/hosts says no more) it logs "My
 * unqualified host name unknown", sleeps 60 s and tries once again.  With
 * $SM_SHIM_HOSTNAME set (the suite's mta.e2e.test), gethostname(2) returns
 * that name instead, which is qualified already; the .cf's $j says the same.
 *
 * Depends on nothing but libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

static char ident[64] = "syslog";
static char log_path[4096];

static char host_name[256];

__attribute__((constructor)) static void shim_init(void)
{
    const char *p = getenv("SYSLOG_SHIM_FILE");
    if (p != NULL)
        snprintf(log_path, sizeof log_path, "%s", p);
    p = getenv("SM_SHIM_HOSTNAME");
    if (p != NULL)
        snprintf(host_name, sizeof host_name, "%s", p);
}

int gethostname(char *name, size_t len)
{
    size_t n;

    if (host_name[0] == '\0') {
        struct utsname u;
        if (uname(&u) < 0)
            return -1;
        snprintf(host_name, sizeof host_name, "%s", u.nodename);
    }
    n = strlen(host_name);
    if (n + 1 > len) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(name, host_name, n + 1);
    return 0;
}

static const char *level_name(int pri)
{
    static const char *const names[] = {"emerg", "alert", "crit", "err",
                                        "warning", "notice", "info", "debug"};
    return names[LOG_PRI(pri)];
}

void openlog(const char *id, int option, int facility)
{
    (void)option;
    (void)facility;
    if (id != NULL)
        snprintf(ident, sizeof ident, "%s", id);
}

void closelog(void) {}

int setlogmask(int mask)
{
    (void)mask;
    return 0xff;
}

void vsyslog(int pri, const char *fmt, va_list ap)
{
    char line[8192];
    struct timespec ts;
    int n, m, fd;

    if (log_path[0] == '\0')
        return;
    clock_gettime(CLOCK_REALTIME, &ts);
    n = snprintf(line, sizeof line, "%lld.%03ld %s[%ld]: %s: ", (long long)ts.tv_sec,
                 ts.tv_nsec / 1000000, ident, (long)getpid(), level_name(pri));
    if (n < 0 || (size_t)n >= sizeof line)
        return;
    m = vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
    if (m < 0)
        return;
    n += (size_t)m < sizeof line - n - 1 ? m : (int)(sizeof line - n - 2);
    line[n++] = '\n';
    fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    if (write(fd, line, n) < 0) { /* nothing to do: logging must not fail */ }
    close(fd);
}

void syslog(int pri, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsyslog(pri, fmt, ap);
    va_end(ap);
}

/* the _FORTIFY_SOURCE entry points Debian's binaries call */
void __vsyslog_chk(int pri, int flag, const char *fmt, va_list ap)
{
    (void)flag;
    vsyslog(pri, fmt, ap);
}

void __syslog_chk(int pri, int flag, const char *fmt, ...)
{
    va_list ap;
    (void)flag;
    va_start(ap, fmt);
    vsyslog(pri, fmt, ap);
    va_end(ap);
}
