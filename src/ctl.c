/* ctl: see ctl.h. */
#define _GNU_SOURCE
#include "ctl.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum { MSG_SCRIPT = 1, MSG_AGAIN = 2, MSG_LOADED = 3 };

struct msg {
    uint32_t kind;
    uint32_t gen;
};

int ctl_pair(int sv[2])
{
    return socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK,
                      0, sv);
}

int ctl_send_script(int fd, uint32_t gen, int script_fd)
{
    struct msg m = {MSG_SCRIPT, gen};
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec iov = {&m, sizeof m};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                        .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &script_fd, sizeof script_fd);
    ssize_t n;
    while ((n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT)) < 0 &&
           errno == EINTR)
        ;
    return n == (ssize_t)sizeof m ? 0 : -1;
}

int ctl_drain(int fd, uint32_t *gen, int *script_fd, uint32_t *lost)
{
    *script_fd = -1;
    *lost = 0;
    for (;;) {
        struct msg m;
        char cbuf[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {&m, sizeof m};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                            .msg_control = cbuf,
                            .msg_controllen = sizeof cbuf};
        ssize_t n = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (n <= 0)
            return -1;
        int got = -1;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        if (cm && cm->cmsg_level == SOL_SOCKET &&
            cm->cmsg_type == SCM_RIGHTS &&
            cm->cmsg_len >= CMSG_LEN(sizeof(int)))
            memcpy(&got, CMSG_DATA(cm), sizeof got);
        if (n != sizeof m || m.kind != MSG_SCRIPT) {
            if (got >= 0)
                close(got);
            continue;
        }
        /* MSG_CTRUNC: the kernel could not give us the fd (EMFILE) */
        if (got < 0 || (mh.msg_flags & MSG_CTRUNC)) {
            if (got >= 0)
                close(got);
            if (m.gen > *lost)
                *lost = m.gen;
            continue;
        }
        if (*script_fd >= 0 && m.gen < *gen) {
            close(got); /* an older one behind a newer: keep the newer */
            continue;
        }
        if (*script_fd >= 0)
            close(*script_fd);
        *script_fd = got;
        *gen = m.gen;
    }
}

int ctl_ask_again(int fd, uint32_t gen)
{
    struct msg m = {MSG_AGAIN, gen};
    return send(fd, &m, sizeof m, MSG_NOSIGNAL | MSG_DONTWAIT) ==
                   (ssize_t)sizeof m
               ? 0
               : -1;
}

int ctl_loaded(int fd, uint32_t gen)
{
    struct msg m = {MSG_LOADED, gen};
    return send(fd, &m, sizeof m, MSG_NOSIGNAL | MSG_DONTWAIT) ==
                   (ssize_t)sizeof m
               ? 0
               : -1;
}

int ctl_read_requests(int fd, uint32_t *loaded)
{
    int again = 0;
    for (;;) {
        struct msg m;
        ssize_t n = recv(fd, &m, sizeof m, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return again;
        if (n <= 0)
            return -1;
        if (n == sizeof m && m.kind == MSG_AGAIN)
            again = 1;
        if (n == sizeof m && m.kind == MSG_LOADED && m.gen > *loaded)
            *loaded = m.gen;
    }
}
