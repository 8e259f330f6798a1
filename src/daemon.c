/* daemon: see daemon.h. */
#include "daemon.h"

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* Refuses a pidfile that names a live process. */
int daemon_pidfile_check(const char *pidfile, char *err, size_t n)
{
    FILE *f = fopen(pidfile, "r");
    long pid = 0;
    if (!f)
        return 0;
    if (fscanf(f, "%ld", &pid) != 1)
        pid = 0;
    fclose(f);
    if (pid > 0 && (kill((pid_t)pid, 0) == 0 || errno == EPERM)) {
        snprintf(err, n, "%s: another instance (pid %ld) is running",
                 pidfile, pid);
        return -1;
    }
    return 0;
}

/* Writes our pid to a temporary file and renames it into place. */
int daemon_pidfile_write(const char *pidfile, char *err, size_t n)
{
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", pidfile, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0 ||
        rename(tmp, pidfile) < 0) {
        snprintf(err, n, "%s: %s", pidfile, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

int daemon_ids(const char *user, const char *group, struct daemon_ids *id,
               char *err, size_t n)
{
    memset(id, 0, sizeof *id);
    if (user) {
        struct passwd *pw = getpwnam(user);
        if (!pw) {
            snprintf(err, n, "--user %s: no such user", user);
            return -1;
        }
        id->uid = pw->pw_uid;
        id->gid = pw->pw_gid;
        id->name = user;
        id->set_uid = id->set_gid = 1;
    }
    if (group) {
        struct group *gr = getgrnam(group);
        if (!gr) {
            snprintf(err, n, "--group %s: no such group", group);
            return -1;
        }
        id->gid = gr->gr_gid;
        id->set_gid = 1;
    }
    if ((id->set_uid || id->set_gid) && geteuid() != 0) {
        snprintf(err, n, "--user/--group need root to switch identity");
        return -1;
    }
    return 0;
}

/* Hands the socket to the run-time identity, then drops root for good. */
int daemon_drop_privileges(const struct daemon_ids *id, const char *sock,
                           char *err, size_t n)
{
    if (sock[0] && (id->set_uid || id->set_gid) &&
        chown(sock, id->set_uid ? id->uid : (uid_t)-1,
              id->set_gid ? id->gid : (gid_t)-1) < 0) {
        snprintf(err, n, "chown %s: %s", sock, strerror(errno));
        return -1;
    }
    if (id->set_gid && (setgroups(0, NULL) < 0 || setgid(id->gid) < 0)) {
        snprintf(err, n, "setgid: %s", strerror(errno));
        return -1;
    }
    if (id->set_uid && ((id->name && initgroups(id->name, id->gid) < 0) ||
                        setuid(id->uid) < 0)) {
        snprintf(err, n, "setuid: %s", strerror(errno));
        return -1;
    }
    if (id->set_uid && setuid(0) == 0) {
        snprintf(err, n, "could regain root after dropping it");
        return -1;
    }
    return 0;
}

/*
 * Detaches from the terminal. The original process waits on a pipe for the
 * daemon to report that it started (or why not) and exits 0 or 1.
 */
int daemon_detach(int *report)
{
    int p[2];
    if (pipe(p) < 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid > 0) {
        close(p[1]);
        char msg[2048];
        ssize_t n = read(p[0], msg, sizeof msg - 1);
        if (n == 1 && msg[0] == '\0')
            _exit(0);
        if (n > 0)
            fprintf(stderr, "luamilter: %.*s\n", (int)n, msg);
        else
            fprintf(stderr, "luamilter: the daemon failed to start\n");
        _exit(1);
    }
    close(p[0]);
    setsid();
    pid = fork();
    if (pid < 0)
        _exit(1);
    if (pid > 0)
        _exit(0);
    if (chdir("/") < 0)
        _exit(1);
    *report = p[1];
    return 0;
}

/* Makes a relative path absolute (the daemon's cwd becomes /). */
const char *daemon_absolute(const char *path, char *buf, size_t n)
{
    char cwd[4096];
    if (!path || path[0] == '/' || !getcwd(cwd, sizeof cwd))
        return path;
    int w = snprintf(buf, n, "%s/", cwd);
    if (w < 0 || (size_t)w + strlen(path) >= n)
        return path;
    memcpy(buf + w, path, strlen(path) + 1);
    return buf;
}

