/*
 * benchdns: a DNS responder for scripts/bench that answers every query
 * NXDOMAIN after a fixed delay, so a DNSBL policy's throughput can be
 * measured against the latency limit (concurrency / delay). FIFO: every
 * answer is due `delay` after its query, so one timer on the head of a
 * queue serves them all.
 *
 *   benchdns DELAY_MS PORTFILE    binds 127.0.0.1 on a free UDP port
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ev.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define QMAX 65536
struct pending {
    ev_tstamp due;
    struct sockaddr_in peer;
    unsigned char pkt[512];
    int len;
};
static struct pending q[QMAX];
static unsigned head, tail; /* q[head..tail) wait */
static int fd;
static double delay;
static ev_timer timer;
static ev_io io;

static void arm(struct ev_loop *loop)
{
    if (head == tail || ev_is_active(&timer))
        return;
    double in = q[head % QMAX].due - ev_now(loop);
    ev_timer_set(&timer, in > 0 ? in : 0, 0);
    ev_timer_start(loop, &timer);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)w;
    (void)revents;
    while (head != tail && q[head % QMAX].due <= ev_now(loop) + 0.0005) {
        struct pending *p = &q[head % QMAX];
        sendto(fd, p->pkt, (size_t)p->len, 0, (struct sockaddr *)&p->peer,
               sizeof p->peer);
        head++;
    }
    arm(loop);
}

static void on_read(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)w;
    (void)revents;
    for (;;) {
        struct pending *p = &q[tail % QMAX];
        socklen_t sl = sizeof p->peer;
        ssize_t n = recvfrom(fd, p->pkt, sizeof p->pkt, MSG_DONTWAIT,
                             (struct sockaddr *)&p->peer, &sl);
        if (n < 12)
            break;
        if (tail - head == QMAX)
            continue; /* full: drop, the client retries */
        p->len = (int)n;
        p->pkt[2] |= 0x80;                   /* QR */
        p->pkt[3] = (p->pkt[3] & 0xf0) | 3;  /* NXDOMAIN */
        p->pkt[3] |= 0x80;                   /* RA */
        memset(p->pkt + 6, 0, 6);            /* no answer, authority, additional */
        p->due = ev_time() + delay;
        tail++;
    }
    arm(loop);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: benchdns DELAY_MS PORTFILE\n");
        return 2;
    }
    delay = atof(argv[1]) / 1000.0;
    fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int big = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("benchdns: bind");
        return 1;
    }
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    FILE *f = fopen(argv[2], "w");
    if (!f || fprintf(f, "%d\n", ntohs(sa.sin_port)) < 0 || fclose(f) != 0)
        return 1;
    struct ev_loop *loop = ev_default_loop(0);
    ev_init(&timer, on_timer);
    ev_io_init(&io, on_read, fd, EV_READ);
    ev_io_start(loop, &io);
    ev_run(loop, 0);
    return 0;
}
