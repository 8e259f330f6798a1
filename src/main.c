/*
 * main: command line, signals, script reload and the event loop.
 *
 *   luamilter [options] SCRIPT.lua     serve
 *   luamilter check SCRIPT.lua         load the script, report, exit 0/1
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conn.h"
#include "lb.h"
#include "listen.h"
#include "log.h"
#include "offline.h"

#define VERSION "0.1.0"

struct opts {
    const char *listen;
    const char *script;
    unsigned socket_mode;
    double shutdown_timeout;
};

static struct server srv;
static struct listener lst;
static struct opts opt;
static ev_timer shutdown_timer;

static void usage(FILE *f)
{
    fputs(
        "usage: luamilter [options] SCRIPT.lua        serve the milter\n"
        "       luamilter check SCRIPT.lua            check a script, exit 0/1\n"
        "       luamilter --version | --help\n"
        "\n"
        "options:\n"
        "  -l, --listen SPEC           inet:PORT@HOST, inet:HOST:PORT, "
        "inet6:PORT@HOST,\n"
        "                              unix:/path or local:/path "
        "(inet:8890@127.0.0.1)\n"
        "      --on-error ACTION       tempfail|accept|continue|reject when a "
        "handler\n"
        "                              fails or returns a bad verdict "
        "(tempfail)\n"
        "      --max-body BYTES        body bytes handed to Lua per message "
        "(64 MiB)\n"
        "      --timeout SECONDS       idle time between MTA commands (300)\n"
        "      --max-connections N     concurrent MTA connections (10000)\n"
        "      --log-level LEVEL       error|warn|info|debug (info)\n"
        "      --log-format FMT        text|json (text)\n"
        "      --shutdown-timeout SECONDS  wait for open conversations on "
        "SIGTERM (30)\n"
        "      --socket-mode MODE      permissions of a unix socket (0660)\n",
        f);
}

static int die_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "luamilter: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nTry 'luamilter --help'.\n");
    return 2;
}

static int parse_num(const char *s, double min, double max, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

static void on_reload(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    char err[1024];
    struct lb_state *st = lb_load(opt.script, err, sizeof err);
    if (!st) {
        log_msg(LL_ERR, 0, NULL,
                "reload failed, generation %u keeps serving: %s", srv.gen, err);
        return;
    }
    lb_state_release(srv.script); /* open connections hold their own refs */
    srv.script = st;
    srv.cfg.handlers = lb_handlers(st);
    srv.gen++;
    log_msg(LL_INFO, 0, NULL, "reloaded %s: generation %u", opt.script,
            srv.gen);
}

static void on_shutdown_timeout(struct ev_loop *loop, ev_timer *w, int rev)
{
    (void)w;
    (void)rev;
    log_msg(LL_WARN, 0, NULL,
            "shutdown timeout: dropping %u open connection(s)", srv.nconns);
    while (srv.conns)
        conn_drop(srv.conns, "server shutting down");
    ev_break(loop, EVBREAK_ALL);
}

static void on_stop(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    if (srv.stopping) {
        log_msg(LL_WARN, 0, NULL, "second signal %d: exiting now",
                w->signum);
        listen_close(&lst);
        exit(0);
    }
    srv.stopping = 1;
    listen_close(&lst);
    log_msg(LL_INFO, 0, NULL,
            "signal %d: not accepting; waiting for %u connection(s)",
            w->signum, srv.nconns);
    if (!srv.conns) {
        ev_break(loop, EVBREAK_ALL);
        return;
    }
    ev_timer_init(&shutdown_timer, on_shutdown_timeout, opt.shutdown_timeout,
                  0);
    ev_timer_start(loop, &shutdown_timer);
}

static int check(const char *path)
{
    char err[1024];
    struct lb_state *st = lb_load(path, err, sizeof err);
    if (!st) {
        fprintf(stderr, "luamilter: %s\n", err);
        return 1;
    }
    unsigned h = lb_handlers(st);
    printf("%s: OK, handlers:", path);
    for (int i = 0; i < SE__COUNT; i++)
        if (h & SE_BIT(i))
            printf(" %s", sess_event_names[i]);
    printf("\n");
    lb_state_release(st);
    return 0;
}

static int serve(void)
{
    char err[1024];
    srv.script = lb_load(opt.script, err, sizeof err);
    if (!srv.script) {
        fprintf(stderr, "luamilter: %s\n", err);
        return 1;
    }
    srv.cfg.handlers = lb_handlers(srv.script);
    srv.gen = 1;
    srv.loop = ev_default_loop(EVFLAG_AUTO);
    signal(SIGPIPE, SIG_IGN);
    if (listen_open(&lst, &srv, opt.listen, opt.socket_mode, err,
                    sizeof err) < 0) {
        fprintf(stderr, "luamilter: cannot listen on %s: %s\n", opt.listen,
                err);
        return 1;
    }
    listen_start(&lst);
    ev_signal hup, term, intr;
    ev_signal_init(&hup, on_reload, SIGHUP);
    ev_signal_init(&term, on_stop, SIGTERM);
    ev_signal_init(&intr, on_stop, SIGINT);
    ev_signal_start(srv.loop, &hup);
    ev_signal_start(srv.loop, &term);
    ev_signal_start(srv.loop, &intr);
    log_msg(LL_INFO, 0, NULL, "luamilter %s serving %s on %s (generation 1)",
            VERSION, opt.script, opt.listen);
    ev_run(srv.loop, 0);
    listen_close(&lst);
    lb_state_release(srv.script);
    log_msg(LL_INFO, 0, NULL, "stopped");
    return 0;
}

int main(int argc, char **argv)
{
    enum { O_ONERR = 256, O_MAXBODY, O_TIMEOUT, O_LEVEL, O_FORMAT, O_SHUT,
           O_MODE, O_MAXCONN, O_VERSION, O_LATER };
    static const struct option longopts[] = {
        {"listen", required_argument, 0, 'l'},
        {"on-error", required_argument, 0, O_ONERR},
        {"max-body", required_argument, 0, O_MAXBODY},
        {"timeout", required_argument, 0, O_TIMEOUT},
        {"log-level", required_argument, 0, O_LEVEL},
        {"log-format", required_argument, 0, O_FORMAT},
        {"shutdown-timeout", required_argument, 0, O_SHUT},
        {"socket-mode", required_argument, 0, O_MODE},
        {"max-connections", required_argument, 0, O_MAXCONN},
        {"version", no_argument, 0, O_VERSION},
        {"workers", required_argument, 0, O_LATER},
        {"pidfile", required_argument, 0, O_LATER},
        {"user", required_argument, 0, O_LATER},
        {"group", required_argument, 0, O_LATER},
        {"script-timeout", required_argument, 0, O_LATER},
        {"daemon", no_argument, 0, O_LATER},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    double v;
    opt.listen = "inet:8890@127.0.0.1";
    opt.socket_mode = 0660;
    opt.shutdown_timeout = 30;
    srv.cfg.on_error = VA_TEMPFAIL;
    srv.cfg.max_body = 64u << 20;
    srv.idle_timeout = 300;
    srv.max_frame = 2u << 20;
    srv.max_conns = 10000;
    int c, li = 0;
    while ((c = getopt_long(argc, argv, "+l:h", longopts, &li)) != -1) {
        switch (c) {
        case 'l': opt.listen = optarg; break;
        case O_ONERR:
            srv.cfg.on_error = lb_parse_action(optarg);
            if (srv.cfg.on_error < 0)
                return die_usage("--on-error: expected tempfail, accept, "
                                 "continue or reject, not '%s'",
                                 optarg);
            break;
        case O_MAXBODY:
            if (parse_num(optarg, 0, 1e15, &v) < 0)
                return die_usage("--max-body: bad byte count '%s'", optarg);
            srv.cfg.max_body = (size_t)v;
            break;
        case O_TIMEOUT:
            if (parse_num(optarg, 0.001, 1e9, &v) < 0)
                return die_usage("--timeout: bad number of seconds '%s'",
                                 optarg);
            srv.idle_timeout = v;
            break;
        case O_SHUT:
            if (parse_num(optarg, 0, 1e9, &v) < 0)
                return die_usage("--shutdown-timeout: bad seconds '%s'",
                                 optarg);
            opt.shutdown_timeout = v;
            break;
        case O_MAXCONN:
            if (parse_num(optarg, 1, 1e7, &v) < 0)
                return die_usage("--max-connections: bad count '%s'", optarg);
            srv.max_conns = (unsigned)v;
            break;
        case O_LEVEL: {
            int lvl;
            if (log_parse_level(optarg, &lvl) < 0)
                return die_usage("--log-level: expected error, warn, info or "
                                 "debug, not '%s'",
                                 optarg);
            log_level = lvl;
            break;
        }
        case O_FORMAT:
            if (log_set_format(optarg) < 0)
                return die_usage("--log-format: expected text or json, not "
                                 "'%s'",
                                 optarg);
            break;
        case O_MODE: {
            char *end;
            unsigned long m = strtoul(optarg, &end, 8);
            if (*end || end == optarg || m > 0777)
                return die_usage("--socket-mode: bad octal mode '%s'", optarg);
            opt.socket_mode = (unsigned)m;
            break;
        }
        case O_VERSION: printf("luamilter %s\n", VERSION); return 0;
        case 'h': usage(stdout); return 0;
        case O_LATER:
            return die_usage("--%s is not supported by this version yet",
                             longopts[li].name);
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc && strcmp(argv[optind], "test") == 0)
        return offline_main(argc - optind, argv + optind, &srv.cfg);
    if (optind < argc && strcmp(argv[optind], "check") == 0) {
        if (argc - optind != 2)
            return die_usage("%s", "check takes exactly one SCRIPT.lua");
        return check(argv[optind + 1]);
    }
    if (argc - optind != 1)
        return die_usage("%s", "expected one SCRIPT.lua to serve");
    opt.script = argv[optind];
    return serve();
}
