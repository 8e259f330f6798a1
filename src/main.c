/*
 * main: the command line.
 *
 *   luamilter [options] SCRIPT.lua     serve (super.c)
 *   luamilter check SCRIPT.lua         load the script, report, exit 0/1
 *   luamilter test SCRIPT.lua MSG.eml...  offline sessions (offline.c)
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
#include "dnsr.h"
#include "lb.h"
#include "log.h"
#include "mta.h"
#include "offline.h"
#include "rds.h"
#include "store.h"
#include "super.h"

#define VERSION "0.1.0"

static struct server srv;
static struct super_opts opt;

static void usage(FILE *f)
{
    fputs(
        "usage: luamilter [options] SCRIPT.lua        serve the milter\n"
        "       luamilter check SCRIPT.lua            check a script, exit 0/1\n"
        "       luamilter test SCRIPT.lua MESSAGE.eml... [--each-connection]\n"
        "                [--client IP] [--helo NAME]\n"
        "                [--from ADDR] [--rcpt ADDR]... [--macro NAME=VALUE]... "
        "[--json]\n"
        "       (check and test also take --set and --preload)\n"
        "       luamilter --version | --help\n"
        "\n"
        "options:\n"
        "  -l, --listen SPEC           inet:PORT@HOST, inet:HOST:PORT, "
        "inet:[ADDR]:PORT,\n"
        "                              inet6:PORT@HOST, unix:/path, "
        "local:/path, /path;\n"
        "                              inet:PORT (no host) listens on every "
        "IPv4\n"
        "                              interface (inet:8890@127.0.0.1)\n"
        "      --on-error ACTION       tempfail|accept|continue|reject when a "
        "handler\n"
        "                              fails or returns a bad verdict "
        "(tempfail)\n"
        "      --mta MTA               postfix|sendmail|stalwart|auto: whose "
        "header\n"
        "                              counting to use (auto: from the offer "
        "and macros)\n"
        "      --max-body BYTES        body bytes handed to Lua per message "
        "(64 MiB)\n"
        "      --timeout SECONDS       idle time between MTA commands (300)\n"
        "      --max-connections N     concurrent MTA connections per worker "
        "(10000)\n"
        "      --max-frame BYTES       largest MTA packet accepted (2 MiB)\n"
        "      --max-headers N         headers per message (10000)\n"
        "      --max-macros N          macros per MACRO packet (1000)\n"
        "      --max-message-bytes BYTES  envelope and headers of one "
        "message (64 MiB)\n"
        "      --max-connection-bytes BYTES  macros, client and HELO of a "
        "connection\n"
        "                              (16 MiB)\n"
        "      --max-write-queue BYTES  replies queued for a peer that "
        "does not read;\n"
        "                              its next command closes it (4 MiB)\n"
        "      --dns HOST[:PORT]       resolver for milter.dns (/etc/resolv.conf)\n"
        "      --store SPEC            milter.store: lmdb:PATH (default: an "
        "LMDB file at\n"
        "                              a default path, see README), or "
        "redis://HOST[:PORT][/DB]\n"
        "                              or unix:/PATH[?db=N] for a Redis "
        "server\n"
        "      --store-map-size BYTES  largest size of the LMDB store (64 "
        "MiB)\n"
        "      --log-level LEVEL       error|warn|info|debug (info)\n"
        "      --log-format FMT        text|json (text)\n"
        "      --metrics SPEC          serve GET /metrics (Prometheus) and "
        "GET /health\n"
        "                              over HTTP there, as -l spells it "
        "(inet:9101@127.0.0.1)\n"
        "      --shutdown-timeout SECONDS  wait for open conversations on "
        "SIGTERM (30)\n"
        "      --socket-mode MODE      permissions of a unix socket (0660)\n"
        "      --script-timeout SECONDS  wall-clock budget of one handler "
        "call (10)\n"
        "      --script-memory BYTES   memory of a worker's Lua state (256 "
        "MiB)\n"
        "      --set NAME=VALUE        milter.settings.NAME for the script "
        "(repeatable)\n"
        "      --preload FILE          Lua run before the script, in its state\n"
        "  -w, --workers N             worker processes (number of CPUs)\n"
        "      --pidfile PATH          write the supervisor's pid there\n"
        "      --user USER, --group GROUP  run as them after binding\n"
        "      --daemon                detach; log to syslog (mail facility)\n",
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

/* --set and --preload, before a command or after check's script. */
static int script_option(int set, const char *arg)
{
    char err[1200];
    if ((set ? lb_add_setting(arg, err, sizeof err)
             : lb_set_preload(arg, err, sizeof err)) < 0) {
        die_usage("%s", err);
        return -1;
    }
    return 0;
}

/* luamilter check SCRIPT [--set NAME=VALUE]... [--preload FILE] */
static int check(int argc, char **argv)
{
    static const struct option lo[] = {
        {"set", required_argument, 0, 's'},
        {"preload", required_argument, 0, 'p'},
        {0, 0, 0, 0}};
    int c;
    optind = 0; /* glibc: restart scanning on a new argv */
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1)
        if (c == '?' || script_option(c == 's', optarg) < 0)
            return 2;
    if (argc - optind != 1)
        return die_usage("%s", "check takes exactly one SCRIPT.lua");
    const char *path = argv[optind];
    char err[8192];
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

/* SIGHUP held, or let through again (test and check: their default). */
static void hold_hup(int how)
{
    sigset_t hup;
    sigemptyset(&hup);
    sigaddset(&hup, SIGHUP);
    sigprocmask(how, &hup, NULL);
}

int main(int argc, char **argv)
{
    /* A SIGHUP while the daemon starts (systemctl reload, a logrotate
     * hook) must not kill it, nor be lost: it stays pending until the
     * supervisor handles it (super_run), and reloads then. */
    hold_hup(SIG_BLOCK);
    enum { O_ONERR = 256, O_SET, O_PRELOAD, O_MAXBODY, O_TIMEOUT, O_LEVEL, O_FORMAT, O_SHUT,
           O_MODE, O_MAXCONN, O_VERSION, O_PIDFILE, O_USER,
           O_GROUP, O_DAEMON, O_STIMEOUT, O_SMEM, O_MAXFRAME, O_MAXHDRS,
           O_MAXMACROS, O_MTA, O_MAXMSG, O_MAXCONNB, O_MAXWQ, O_DNS, O_STORE,
           O_STOREMAP, O_METRICS };
    static const struct option longopts[] = {
        {"listen", required_argument, 0, 'l'},
        {"set", required_argument, 0, O_SET},
        {"preload", required_argument, 0, O_PRELOAD},
        {"on-error", required_argument, 0, O_ONERR},
        {"mta", required_argument, 0, O_MTA},
        {"max-body", required_argument, 0, O_MAXBODY},
        {"timeout", required_argument, 0, O_TIMEOUT},
        {"log-level", required_argument, 0, O_LEVEL},
        {"log-format", required_argument, 0, O_FORMAT},
        {"shutdown-timeout", required_argument, 0, O_SHUT},
        {"socket-mode", required_argument, 0, O_MODE},
        {"max-connections", required_argument, 0, O_MAXCONN},
        {"version", no_argument, 0, O_VERSION},
        {"workers", required_argument, 0, 'w'},
        {"pidfile", required_argument, 0, O_PIDFILE},
        {"user", required_argument, 0, O_USER},
        {"group", required_argument, 0, O_GROUP},
        {"daemon", no_argument, 0, O_DAEMON},
        {"script-timeout", required_argument, 0, O_STIMEOUT},
        {"script-memory", required_argument, 0, O_SMEM},
        {"max-frame", required_argument, 0, O_MAXFRAME},
        {"max-headers", required_argument, 0, O_MAXHDRS},
        {"max-macros", required_argument, 0, O_MAXMACROS},
        {"max-message-bytes", required_argument, 0, O_MAXMSG},
        {"max-connection-bytes", required_argument, 0, O_MAXCONNB},
        {"max-write-queue", required_argument, 0, O_MAXWQ},
        {"dns", required_argument, 0, O_DNS},
        {"store", required_argument, 0, O_STORE},
        {"store-map-size", required_argument, 0, O_STOREMAP},
        {"metrics", required_argument, 0, O_METRICS},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    double v;
    opt.listen = "inet:8890@127.0.0.1";
    opt.socket_mode = 0660;
    opt.shutdown_timeout = 30;
    opt.script_timeout = 10;
    opt.script_memory = (size_t)256 << 20;
    srv.cfg.on_error = VA_TEMPFAIL;
    srv.cfg.max_body = 64u << 20;
    srv.cfg.max_headers = 10000;
    srv.cfg.max_macros = 1000;
    srv.cfg.max_msg_bytes = (size_t)64 << 20;
    srv.cfg.max_conn_bytes = (size_t)16 << 20;
    srv.idle_timeout = 300;
    srv.max_frame = 2u << 20;
    srv.max_wqueue = 4u << 20;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    opt.workers = ncpu > 0 ? (int)(ncpu < 64 ? ncpu : 64) : 1;
    srv.max_conns = 10000;
    const char *store_spec = NULL;
    size_t store_map = 0;
    int c;
    while ((c = getopt_long(argc, argv, "+l:w:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'l': opt.listen = optarg; break;
        case O_SET:
        case O_PRELOAD:
            if (script_option(c == O_SET, optarg) < 0)
                return 2;
            break;
        case 'w':
            if (parse_num(optarg, 1, 256, &v) < 0 || v != (int)v)
                return die_usage("--workers: expected 1 to 256, not '%s'",
                                 optarg);
            opt.workers = (int)v;
            break;
        case O_STIMEOUT:
            if (parse_num(optarg, 0.001, 1e6, &v) < 0)
                return die_usage("--script-timeout: bad seconds '%s'", optarg);
            opt.script_timeout = v;
            break;
        case O_SMEM:
            if (parse_num(optarg, 1 << 20, 1e15, &v) < 0)
                return die_usage("--script-memory: bad byte count '%s' (at "
                                 "least 1 MiB)",
                                 optarg);
            opt.script_memory = (size_t)v;
            break;
        case O_MAXFRAME:
            if (parse_num(optarg, 1 << 20, 1 << 30, &v) < 0)
                return die_usage("--max-frame: bad byte count '%s' (1 MiB to "
                                 "1 GiB)",
                                 optarg);
            srv.max_frame = (size_t)v;
            break;
        case O_MAXWQ:
            if (parse_num(optarg, 64 << 10, 1e12, &v) < 0)
                return die_usage("--max-write-queue: bad byte count '%s' (at "
                                 "least 64 KiB)",
                                 optarg);
            srv.max_wqueue = (size_t)v;
            break;
        case O_MAXHDRS:
            if (parse_num(optarg, 1, 1e7, &v) < 0)
                return die_usage("--max-headers: bad count '%s'", optarg);
            srv.cfg.max_headers = (unsigned)v;
            break;
        case O_MAXMACROS:
            if (parse_num(optarg, 1, 1e7, &v) < 0)
                return die_usage("--max-macros: bad count '%s'", optarg);
            srv.cfg.max_macros = (unsigned)v;
            break;
        case O_MAXMSG:
        case O_MAXCONNB:
            /* the session's 32-bit offsets must never wrap: below 4 GiB */
            if (parse_num(optarg, 64 << 10, 2147483648.0, &v) < 0)
                return die_usage("%s: bad byte count (64 KiB to 2 GiB)",
                                 c == O_MAXMSG ? "--max-message-bytes"
                                               : "--max-connection-bytes");
            *(c == O_MAXMSG ? &srv.cfg.max_msg_bytes
                            : &srv.cfg.max_conn_bytes) = (size_t)v;
            break;
        case O_DNS: dnsr_set_server(optarg); break;
        case O_STORE: store_spec = optarg; break;
        case O_STOREMAP:
            if (parse_num(optarg, (double)STORE_MIN_MAP, 1e13, &v) < 0)
                return die_usage("--store-map-size: bad byte count '%s' (at "
                                 "least 32 KiB)",
                                 optarg);
            store_map = (size_t)v;
            break;
        case O_METRICS: opt.metrics = optarg; break;
        case O_PIDFILE: opt.pidfile = optarg; break;
        case O_USER: opt.user = optarg; break;
        case O_GROUP: opt.group = optarg; break;
        case O_DAEMON: opt.daemon = 1; break;
        case O_MTA:
            srv.cfg.mta = mta_parse(optarg);
            if (srv.cfg.mta < 0)
                return die_usage("--mta: expected postfix, sendmail, stalwart "
                                 "or auto, not '%s'",
                                 optarg);
            break;
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
        default: usage(stderr); return 2;
        }
    }
    lb_set_limits(opt.script_timeout, opt.script_memory);
    char serr[4200];
    if (store_config(store_spec, store_map, serr, sizeof serr) < 0)
        return die_usage("%s", serr);
    const char *rerr;
    if (store_redis_url() && !rds_get(store_redis_url(), &rerr)) {
        snprintf(serr, sizeof serr, "--store %s: %s", store_redis_url(), rerr);
        return die_usage("%s", serr);
    }
    if (optind < argc && (strcmp(argv[optind], "test") == 0 ||
                          strcmp(argv[optind], "check") == 0))
        hold_hup(SIG_UNBLOCK);
    if (optind < argc && strcmp(argv[optind], "test") == 0)
        return offline_main(argc - optind, argv + optind, &srv.cfg);
    if (optind < argc && strcmp(argv[optind], "check") == 0)
        return check(argc - optind, argv + optind);
    if (argc - optind != 1)
        return die_usage("%s", "expected one SCRIPT.lua to serve");
    opt.script = argv[optind];
    return super_run(&opt, &srv);
}
