/*
 * The httpc engine from C, on a loop of its own, against a tiny server in
 * the same loop: a response arrives with lower-cased headers, the callback
 * never runs inside httpc_request(), a cancelled request (before it
 * started, or while the server holds it) never calls back, timeouts and
 * refusals are errors. Built with -fsanitize=address, LeakSanitizer then
 * checks at exit that cancelling freed everything.
 */
#include <arpa/inet.h>
#include <ev.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "aio.h"
#include "httpc.h"
#include "t.h"

static struct ev_loop *loop;
static int port, requests; /* requests the server has read */

struct peer {
    ev_io w;
    char buf[4096];
    size_t len;
};

static void on_peer(struct ev_loop *l, ev_io *w, int revents)
{
    (void)revents;
    struct peer *p = (struct peer *)w;
    ssize_t n = read(w->fd, p->buf + p->len, sizeof p->buf - 1 - p->len);
    if (n <= 0) {
        ev_io_stop(l, w);
        close(w->fd);
        free(p);
        return;
    }
    p->len += (size_t)n;
    p->buf[p->len] = '\0';
    if (!strstr(p->buf, "\r\n\r\n"))
        return;
    requests++;
    p->len = 0;
    if (strncmp(p->buf, "GET /ok ", 8) == 0) {
        static const char r[] = "HTTP/1.1 201 Created\r\nX-Thing: 1\r\n"
                                "x-thing: 2\r\nContent-Length: 5\r\n\r\nhello";
        CHECK(write(w->fd, r, sizeof r - 1) == (ssize_t)(sizeof r - 1),
              "server write");
    } /* anything else: held, never answered */
}

static void on_accept(struct ev_loop *l, ev_io *w, int revents)
{
    (void)revents;
    int fd = accept(w->fd, NULL, NULL);
    if (fd < 0)
        return;
    struct peer *p = calloc(1, sizeof *p);
    ev_io_init(&p->w, on_peer, fd, EV_READ);
    ev_io_start(l, &p->w);
}

struct got {
    int calls;
    const char *err;
    long status;
    char headers[256], body[64];
};

static void done(void *ud, const struct httpc_resp *r)
{
    struct got *g = ud;
    g->calls++;
    g->err = r->err;
    g->status = r->status;
    size_t off = 0;
    for (size_t i = 0; i < r->nh && off < sizeof g->headers - 64; i++)
        off += (size_t)snprintf(g->headers + off, sizeof g->headers - off,
                                "%.*s=%.*s;", (int)r->h[i].nlen, r->h[i].name,
                                (int)r->h[i].vlen, r->h[i].value);
    if (!r->err)
        snprintf(g->body, sizeof g->body, "%.*s", (int)r->len, r->body);
}

static struct httpc_req *get(const char *path, double timeout, int p,
                             struct got *g)
{
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", p, path);
    struct httpc_opts o = {.url = url, .method = "GET", .timeout = timeout,
                           .verify = 1, .max_body = 1 << 20};
    const char *err = NULL;
    struct httpc_req *r = httpc_request(&o, done, g, &err);
    CHECK(r != NULL, "%s: %s", path, err ? err : "?");
    CHECK(g->calls == 0, "called back from inside httpc_request");
    return r;
}

static void run_until(const int *cond, double max)
{
    ev_tstamp end = ev_time() + max;
    while (!*cond && ev_time() < end)
        ev_run(loop, EVRUN_ONCE);
}

static void run_for(double s)
{
    ev_tstamp end = ev_time() + s;
    while (ev_time() < end)
        ev_run(loop, EVRUN_ONCE | EVRUN_NOWAIT), usleep(1000);
}

int main(void)
{
    loop = ev_default_loop(0);
    aio_set_loop(loop);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 16) < 0 ||
        getsockname(ls, (struct sockaddr *)&a, &al) < 0)
        return 1;
    port = ntohs(a.sin_port);
    ev_io lw;
    ev_io_init(&lw, on_accept, ls, EV_READ);
    ev_io_start(loop, &lw);

    CHECK(httpc_check_url("http://127.0.0.1/") == NULL, "good url");
    CHECK(httpc_check_url("ftp://127.0.0.1/") != NULL, "ftp");
    CHECK(httpc_check_url("no url") != NULL, "junk");

    struct got ok = {0};
    get("/ok", 5, port, &ok);
    run_until(&ok.calls, 5);
    CHECK(ok.calls == 1 && !ok.err, "ok: %d %s", ok.calls, ok.err);
    CHECK(ok.status == 201, "status %ld", ok.status);
    CHECK(strcmp(ok.body, "hello") == 0, "body %s", ok.body);
    CHECK(strcmp(ok.headers, "x-thing=1;x-thing=2;content-length=5;") == 0,
          "headers %s", ok.headers);

    /* cancelled before the loop ran: nothing was sent */
    struct got early = {0};
    httpc_cancel(get("/held", 5, port, &early));
    /* cancelled while the server holds it */
    struct got held = {0};
    int before = requests;
    struct httpc_req *h = get("/held", 5, port, &held);
    int target = before + 1;
    while (requests < target && held.calls == 0)
        ev_run(loop, EVRUN_ONCE);
    httpc_cancel(h);
    run_for(0.2);
    CHECK(early.calls == 0 && held.calls == 0, "cancelled but called back");

    struct got slow = {0};
    get("/held", 0.2, port, &slow);
    run_until(&slow.calls, 5);
    CHECK(slow.calls == 1 && slow.err && strcmp(slow.err, "timeout") == 0,
          "timeout: %s", slow.err ? slow.err : "none");

    /* a port nobody listens on (not ours: its kept-alive connection
     * would be reused) */
    int fs = socket(AF_INET, SOCK_STREAM, 0);
    a.sin_port = 0;
    al = sizeof a;
    if (bind(fs, (struct sockaddr *)&a, sizeof a) < 0 ||
        getsockname(fs, (struct sockaddr *)&a, &al) < 0)
        return 1;
    int free_port = ntohs(a.sin_port);
    close(fs);
    struct got refused = {0};
    get("/", 5, free_port, &refused);
    run_until(&refused.calls, 5);
    CHECK(refused.calls == 1 && refused.err &&
              strcmp(refused.err, "connection refused") == 0,
          "refused: %s", refused.err ? refused.err : "none");
    return t_done("test_httpc");
}
