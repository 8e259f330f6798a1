/* benchgen: options, the measured window, the RESULT line (benchgen.h). */
#define _GNU_SOURCE
#include "benchgen.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static void sleep_until(double t)
{
    for (;;) {
        double d = t - gen_now();
        if (d <= 0 || atomic_load(&g_stop))
            return;
        if (d > 0.05)
            d = 0.05;
        struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
        nanosleep(&ts, NULL);
    }
}

static void parse_spec(const char *spec)
{
    memset(&g_addr, 0, sizeof g_addr);
    const char *path = NULL;
    if (strncmp(spec, "unix:", 5) == 0)
        path = spec + 5;
    else if (strncmp(spec, "local:", 6) == 0)
        path = spec + 6;
    else if (spec[0] == '/')
        path = spec;
    if (path) {
        struct sockaddr_un *un = (struct sockaddr_un *)&g_addr;
        if (strlen(path) >= sizeof un->sun_path)
            gen_die("socket path too long: %s", path);
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, path);
        g_addrlen = sizeof *un;
        return;
    }
    /* inet:PORT@HOST or inet:PORT (127.0.0.1) */
    if (strncmp(spec, "inet:", 5) != 0)
        gen_die("bad socket spec %s (unix:/path or inet:PORT@HOST)", spec);
    char port[16], host[256] = "127.0.0.1";
    const char *at = strchr(spec + 5, '@');
    size_t pl = at ? (size_t)(at - spec - 5) : strlen(spec + 5);
    if (pl == 0 || pl >= sizeof port)
        gen_die("bad port in %s", spec);
    memcpy(port, spec + 5, pl);
    port[pl] = 0;
    if (at)
        snprintf(host, sizeof host, "%s", at + 1);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai) != 0)
        gen_die("cannot resolve %s", spec);
    memcpy(&g_addr, ai->ai_addr, ai->ai_addrlen);
    g_addrlen = ai->ai_addrlen;
    freeaddrinfo(ai);
    g_is_tcp = 1;
}

static size_t parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || v < 0)
        gen_die("bad size %s", s);
    switch (tolower((unsigned char)*end)) {
    case 'k': v *= 1024; break;
    case 'm': v *= 1024 * 1024; break;
    case 0: break;
    default: gen_die("bad size %s", s);
    }
    return (size_t)v;
}

static void usage(void)
{
    fputs("usage: benchgen -s SOCKET [options]\n"
          "  -s, --socket SPEC        unix:/path or inet:PORT@HOST\n"
          "  -c, --concurrency N      connections in flight (8)\n"
          "  -m, --msgs-per-conn N    messages per connection (10)\n"
          "  -r, --rcpts N            recipients per message (2)\n"
          "  -H, --headers N          headers per message (10)\n"
          "  -b, --body BYTES         body size, K/M suffixes (4096)\n"
          "  -d, --duration SECONDS   measured window (5)\n"
          "  -w, --warmup SECONDS     warm-up before the window (1)\n"
          "  -n, --messages N         run exactly N messages instead\n"
          "  -t, --threads N          generator threads (1)\n"
          "  -T, --timeout SECONDS    reply timeout (10)\n"
          "  -e, --expect-header NAME each BODYEOB must add this header\n"
          "  -p, --server-pid PID     report this process's CPU and RSS\n"
          "      --helper-pid PID     a process the server relies on (a store's\n"
          "                           redis-server): its CPU is reported as\n"
          "                           helper_util, not counted as other_util\n"
          "  -l, --label NAME         name in the RESULT line\n"
          "      --idle N             open N idle sessions, report RSS, exit\n"
          "      --settle SECONDS     idle: wait before measuring (1)\n"
          "      --probe              print the server's OPTNEG reply, exit\n"
          "      --max-errors N       stop after N errors (1000)\n",
          stderr);
    exit(2);
}

static void parse_args(int argc, char **argv)
{
    static const struct option lo[] = {{"socket", 1, 0, 's'},
                                       {"concurrency", 1, 0, 'c'},
                                       {"msgs-per-conn", 1, 0, 'm'},
                                       {"rcpts", 1, 0, 'r'},
                                       {"headers", 1, 0, 'H'},
                                       {"body", 1, 0, 'b'},
                                       {"duration", 1, 0, 'd'},
                                       {"warmup", 1, 0, 'w'},
                                       {"messages", 1, 0, 'n'},
                                       {"threads", 1, 0, 't'},
                                       {"timeout", 1, 0, 'T'},
                                       {"expect-header", 1, 0, 'e'},
                                       {"server-pid", 1, 0, 'p'},
                                       {"label", 1, 0, 'l'},
                                       {"idle", 1, 0, 1},
                                       {"settle", 1, 0, 2},
                                       {"probe", 0, 0, 3},
                                       {"max-errors", 1, 0, 4},
                                       {"helper-pid", 1, 0, 5},
                                       {"help", 0, 0, 'h'},
                                       {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "s:c:m:r:H:b:d:w:n:t:T:e:p:l:h", lo,
                             NULL)) != -1) {
        switch (ch) {
        case 's': O.spec = optarg; break;
        case 'c': O.conc = atoi(optarg); break;
        case 'm': O.msgs_per_conn = atoi(optarg); break;
        case 'r': O.rcpts = atoi(optarg); break;
        case 'H': O.headers = atoi(optarg); break;
        case 'b': O.body = parse_size(optarg); break;
        case 'd': O.duration = atof(optarg); break;
        case 'w': O.warmup = atof(optarg); break;
        case 'n': O.total = atol(optarg); break;
        case 't': O.threads = atoi(optarg); break;
        case 'T': O.timeout = atof(optarg); break;
        case 'e': O.expect_header = *optarg ? optarg : NULL; break;
        case 'p': O.server_pid = atoi(optarg); break;
        case 'l': O.label = optarg; break;
        case 1: O.idle = atoi(optarg); break;
        case 2: O.settle = atof(optarg); break;
        case 3: O.probe = 1; break;
        case 4: O.max_errors = atol(optarg); break;
        case 5: O.helper_pid = atoi(optarg); break;
        default: usage();
        }
    }
    if (!O.spec || optind != argc)
        usage();
    if (O.conc < 1 || O.msgs_per_conn < 1 || O.rcpts < 0 || O.headers < 0 ||
        O.threads < 1 || O.duration <= 0 || O.warmup < 0 || O.timeout <= 0 ||
        O.total < 0 || O.idle < 0)
        gen_die("bad option value");
    if (O.threads > O.conc)
        O.threads = O.conc;
}

/* Probe: OPTNEG only, print what the server asked for. */
static int probe(void)
{
    int fd = gen_connect_fd();
    if (fd < 0)
        gen_die("connect %s: %s", O.spec, strerror(errno));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    struct timeval tv = {(time_t)O.timeout, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    unsigned char req[17], rep[512];
    gen_put_u32(req, 13);
    req[4] = 'O';
    gen_put_u32(req + 5, OFFER_VERSION);
    gen_put_u32(req + 9, OFFER_ACTIONS);
    gen_put_u32(req + 13, OFFER_PROTOCOL);
    if (write(fd, req, sizeof req) != (ssize_t)sizeof req)
        gen_die("write: %s", strerror(errno));
    size_t got = 0;
    while (got < 17) {
        ssize_t k = read(fd, rep + got, sizeof rep - got);
        if (k <= 0)
            gen_die("no OPTNEG reply");
        got += (size_t)k;
    }
    if (rep[4] != 'O' || gen_get_u32(rep) < 13)
        gen_die("bad OPTNEG reply %s", gen_show(rep[4]));
    printf("version=%u actions=0x%x protocol=0x%x\n", gen_get_u32(rep + 5),
           gen_get_u32(rep + 9), gen_get_u32(rep + 13));
    unsigned char quit[5] = {0, 0, 0, 1, 'Q'};
    if (write(fd, quit, 5) != 5)
        gen_die("write: %s", strerror(errno));
    close(fd);
    return 0;
}

static long sum_errs(struct worker *ws, int nw, int kind)
{
    long s = 0;
    for (int i = 0; i < nw; i++)
        s += ws[i].errs[kind];
    return s;
}

static void print_errors(struct worker *ws, int nw)
{
    long total = atomic_load(&g_errors);
    printf(" errors=%ld", total);
    for (int k = 0; k < E__N; k++)
        printf(" err_%s=%ld", gen_err_names[k], sum_errs(ws, nw, k));
    if (total) {
        fprintf(stderr, "benchgen: %s: %ld error(s):", O.label, total);
        for (int k = 0; k < E__N; k++)
            if (sum_errs(ws, nw, k))
                fprintf(stderr, " %s=%ld", gen_err_names[k],
                        sum_errs(ws, nw, k));
        fputc('\n', stderr);
    }
}

/* Opens O.idle sessions that stop after CONNECT, then reports RSS. */
static int run_idle(struct worker *w)
{
    w->conns = calloc((size_t)O.idle, sizeof *w->conns);
    if (!w->conns)
        gen_die("out of memory");
    w->nconns = O.idle;
    long base = O.server_pid ? proc_status_kb(O.server_pid, "VmRSS") : -1;
    int nprocs = 0;
    if (O.server_pid)
        proc_cpu(O.server_pid, &nprocs);
    double t0 = gen_now();
    for (int i = 0; i < O.idle; i++) {
        struct conn *c = &w->conns[i];
        c->w = w;
        c->fd = -1;
        if (gen_conn_start(c) == 0)
            w->active++;
        if (i % 128 == 127)
            gen_worker_loop(w, gen_now() + 0.001); /* answer OPTNEG replies */
        if (atomic_load(&g_stop))
            break;
    }
    /* Wait until every session has its CONNECT out and nothing pending. */
    double limit = gen_now() + O.timeout;
    for (;;) {
        int pending = 0;
        for (int i = 0; i < w->nconns; i++) {
            struct conn *c = &w->conns[i];
            if (c->active &&
                (c->await >= 0 || c->step != S_IDLE || c->segpos < c->nsegs))
                pending++;
        }
        if (!pending || gen_now() > limit || !w->active)
            break;
        gen_worker_loop(w, gen_now() + 0.05);
    }
    double t_open = gen_now() - t0;
    gen_worker_loop(w, gen_now() + O.settle); /* a close now is an error */
    int open = 0;
    for (int i = 0; i < w->nconns; i++)
        open += w->conns[i].active && w->conns[i].step == S_IDLE &&
                w->conns[i].await < 0;
    long rss = -1, hwm = -1;
    if (O.server_pid) {
        rss = proc_status_kb(O.server_pid, "VmRSS");
        hwm = proc_status_kb(O.server_pid, "VmHWM");
    }
    printf("RESULT label=%s idle=%d open=%d open_secs=%.3f base_kb=%ld "
           "rss_kb=%ld hwm_kb=%ld procs=%d protocol=0x%x",
           O.label, O.idle, open, t_open, base, rss, hwm, nprocs,
           atomic_load(&g_neg_protocol));
    if (open != O.idle && atomic_load(&g_errors) == 0)
        gen_err(&w->conns[0], E_DISCONNECT, "only %d of %d sessions open", open,
                O.idle);
    print_errors(w, 1);
    printf("\n");
    for (int i = 0; i < w->nconns; i++)
        gen_conn_close(&w->conns[i]);
    return atomic_load(&g_errors) ? 1 : 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *v, size_t n, double p)
{
    if (!n)
        return 0;
    size_t k = (size_t)ceil(p * (double)n);
    return v[k ? k - 1 : 0];
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    parse_spec(O.spec);
    if (O.probe)
        return probe();
    gen_make_body(O.body);
    t_start = gen_now();
    t_ws = O.total ? t_start : t_start + O.warmup;
    t_we = O.total ? 1e300 : t_ws + O.duration;

    int nw = O.idle ? 1 : O.threads;
    struct worker *ws = calloc((size_t)nw, sizeof *ws);
    if (!ws)
        gen_die("out of memory");
    for (int i = 0; i < nw; i++) {
        ws[i].id = i;
        ws[i].ep = epoll_create1(EPOLL_CLOEXEC);
        if (ws[i].ep < 0)
            gen_die("epoll_create1: %s", strerror(errno));
    }
    if (O.idle)
        return run_idle(&ws[0]);

    for (int i = 0; i < nw; i++) {
        struct worker *w = &ws[i];
        w->nconns = O.conc / nw + (i < O.conc % nw);
        w->conns = calloc((size_t)w->nconns, sizeof *w->conns);
        if (!w->conns)
            gen_die("out of memory");
        for (int k = 0; k < w->nconns; k++) {
            w->conns[k].w = w;
            w->conns[k].fd = -1;
            w->conns[k].slot = k;
        }
    }
    if (O.server_pid)
        proc_reset_hwm(O.server_pid);
    for (int i = 0; i < nw; i++)
        if (pthread_create(&ws[i].th, NULL, gen_worker_main, &ws[i]) != 0)
            gen_die("pthread_create failed");

    double cpu0 = -1, cpu1 = -1, g0, g1 = 0, tw0, tw1 = 0, m0, m1 = 0;
    double h0 = -1, h1 = -1; /* the helper's CPU */
    int nprocs = 0;
    if (O.total) {
        tw0 = t_start;
        m0 = proc_machine_busy();
        g0 = proc_self_cpu();
        if (O.server_pid)
            cpu0 = proc_cpu(O.server_pid, &nprocs);
        if (O.helper_pid)
            h0 = proc_cpu(O.helper_pid, NULL);
    } else {
        sleep_until(t_ws);
        tw0 = gen_now();
        m0 = proc_machine_busy();
        g0 = proc_self_cpu();
        if (O.server_pid)
            cpu0 = proc_cpu(O.server_pid, &nprocs);
        if (O.helper_pid)
            h0 = proc_cpu(O.helper_pid, NULL);
        sleep_until(t_we);
        atomic_store(&g_stop, 1);
        tw1 = gen_now();
        m1 = proc_machine_busy();
        g1 = proc_self_cpu();
        if (O.server_pid)
            cpu1 = proc_cpu(O.server_pid, NULL);
        if (O.helper_pid)
            h1 = proc_cpu(O.helper_pid, NULL);
    }
    for (int i = 0; i < nw; i++)
        pthread_join(ws[i].th, NULL);
    long hwm = -1, rss = -1;
    if (O.total) {
        tw1 = 0;
        for (int i = 0; i < nw; i++)
            if (ws[i].t_last_done > tw1)
                tw1 = ws[i].t_last_done;
        if (tw1 < tw0)
            tw1 = gen_now();
        m1 = proc_machine_busy();
        g1 = proc_self_cpu();
        if (O.server_pid)
            cpu1 = proc_cpu(O.server_pid, NULL);
        if (O.helper_pid)
            h1 = proc_cpu(O.helper_pid, NULL);
    }
    if (O.server_pid) {
        hwm = proc_status_kb(O.server_pid, "VmHWM");
        rss = proc_status_kb(O.server_pid, "VmRSS");
    }

    size_t nlat = 0;
    long done = 0, total_done = 0, opened = 0;
    for (int i = 0; i < nw; i++) {
        nlat += ws[i].nlat;
        done += ws[i].done_window;
        total_done += ws[i].done_total;
        opened += ws[i].conns_opened;
    }
    double *lat = gen_xrealloc(NULL, nlat * sizeof *lat);
    size_t k = 0;
    for (int i = 0; i < nw; i++) {
        memcpy(lat + k, ws[i].lat, ws[i].nlat * sizeof *lat);
        k += ws[i].nlat;
    }
    qsort(lat, nlat, sizeof *lat, cmp_double);
    double mean = 0;
    for (size_t i = 0; i < nlat; i++)
        mean += lat[i];
    mean = nlat ? mean / (double)nlat : 0;
    double secs = tw1 - tw0;
    double scpu = cpu0 >= 0 && cpu1 >= 0 ? cpu1 - cpu0 : -1;
    double hcpu = h0 >= 0 && h1 >= 0 ? h1 - h0 : 0;
    /* CPU the rest of the machine used meanwhile, in cores: noise */
    double other = m0 >= 0 && m1 >= 0 && secs > 0
                       ? (m1 - m0 - (g1 - g0) - (scpu > 0 ? scpu : 0) - hcpu) /
                             secs
                       : -1;
    if (other < 0 && m0 >= 0)
        other = 0;
    printf("RESULT label=%s msgs=%ld total_msgs=%ld conns=%ld secs=%.3f "
           "rate=%.1f p50_ms=%.3f p99_ms=%.3f mean_ms=%.3f max_ms=%.3f "
           "srv_cpu=%.2f cpu_per_1k=%.4f srv_util=%.2f hwm_kb=%ld rss_kb=%ld "
           "gen_cpu=%.2f gen_util=%.2f other_util=%.2f helper_util=%.2f "
           "gen_threads=%d procs=%d protocol=0x%x",
           O.label, done, total_done, opened, secs,
           secs > 0 ? (double)done / secs : 0, pct(lat, nlat, 0.5) * 1e3,
           pct(lat, nlat, 0.99) * 1e3, mean * 1e3,
           nlat ? lat[nlat - 1] * 1e3 : 0, scpu,
           scpu >= 0 && done ? scpu / (double)done * 1000 : -1,
           scpu >= 0 && secs > 0 ? scpu / secs : -1, hwm, rss, g1 - g0,
           secs > 0 ? (g1 - g0) / secs : 0, other,
           secs > 0 ? hcpu / secs : 0, nw, nprocs,
           atomic_load(&g_neg_protocol));
    print_errors(ws, nw);
    printf("\n");
    if (O.total && total_done + atomic_load(&g_errors) < O.total &&
        !atomic_load(&g_errors))
        fprintf(stderr, "benchgen: only %ld of %ld messages ran\n", total_done,
                O.total);
    return atomic_load(&g_errors) ? 1 : 0;
}
