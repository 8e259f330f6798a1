/*
 * offline: `luamilter test SCRIPT MESSAGE.eml...`, simulated sessions: the
 * messages one after the other on one connection, or each on its own
 * (--each-connection).
 *
 * An in-process MTA: it builds the packets Postfix would send, hands them
 * to the same session and Lua bridge the daemon uses (sess_handle, lb_call),
 * reads the reply packets back, behaves as Postfix does with each answer,
 * and applies the modifications with Postfix's rules (pfsim) to show the
 * message as it would be delivered.
 */
#define _GNU_SOURCE
#include "offline.h"

#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "aio.h"
#include "log.h"
#include "offline_int.h"


static void woken(void *ud)
{
    struct run *r = ud;
    r->woken = 1;
}

/*
 * A handler waits on a lookup: runs the loop (real lookups, as the daemon
 * does) until it is done; returns what sess_resume does.
 */
static int wait_handler(struct run *r)
{
    for (;;) {
        r->woken = 0;
        aio_run_until(&r->woken);
        struct verdict v;
        int rc = lb_resume(&r->lua, &r->s, &v);
        if (rc == LB_WAIT)
            continue;
        if (rc < 0)
            r->failed = 1;
        if (rc == 0 && r->s.wait.ev == SE_EOM)
            r->hlist = v.header_list;
        return sess_resume(&r->s, rc, &v, &r->out);
    }
}

static int call(void *ud, struct sess *s, int ev, const struct wire_cmd *cmd,
                struct verdict *v)
{
    struct run *r = ud;
    int rc = lb_call(&r->lua, s, ev, cmd, v);
    if (rc < 0)
        r->failed = 1;
    if (rc == 0 && ev == SE_EOM)
        r->hlist = v->header_list;
    return rc;
}

static const struct sess_ops ops = {call, NULL}; /* each header a call of its own */


/*
 * Sends one command through the session; reads back its reply (applying
 * modifications on the way). Returns -1 when the session closed.
 */
static int exchange(struct run *r, uint8_t cmd, const void *p, size_t n,
                    struct reply *rp)
{
    struct wire_frame f = {cmd, p, n};
    struct wire_cmd c;
    const char *err;
    memset(rp, 0, sizeof *rp);
    buf_reset(&r->out);
    if (wire_decode(&f, &c, &err) < 0) {
        fprintf(stderr, "luamilter: internal error: %s\n", err);
        return -1;
    }
    int rc = sess_handle(&r->s, &c, &r->out);
    while (rc == SESS_WAIT || rc == SESS_RETRY) {
        int again = rc == SESS_RETRY; /* its abort handler waited first */
        rc = wait_handler(r);
        if (again && rc == SESS_OK)
            rc = sess_handle(&r->s, &c, &r->out);
    }
    while (buf_len(&r->out)) {
        struct wire_frame rf;
        size_t used;
        if (wire_next_frame(buf_head(&r->out), buf_len(&r->out), SIZE_MAX,
                            &rf, &used, &err) != WIRE_FRAME)
            break;
        if (strchr("himeb+2-qp", rf.cmd)) {
            offline_take_mod(r, rf.cmd, rf.data, rf.len);
        } else {
            rp->cmd = rf.cmd;
            if (rf.cmd == WIRE_R_REPLYCODE)
                snprintf(rp->text, sizeof rp->text, "%.*s",
                         (int)(rf.len ? rf.len - 1 : 0), (const char *)rf.data);
        }
        buf_consume(&r->out, used);
    }
    return rc == SESS_CLOSE ? -1 : 0;
}

/* Packs NUL-terminated strings into buf (a command payload). */
static size_t pack(char *buf, size_t cap, const char *const *s, int n)
{
    size_t len = 0;
    for (int i = 0; i < n; i++) {
        size_t l = strlen(s[i]) + 1;
        if (len + l > cap)
            break;
        memcpy(buf + len, s[i], l);
        len += l;
    }
    return len;
}

static void send_macros(struct run *r, char stage, const char *const *kv,
                        int n)
{
    char pkt[8192];
    struct reply rp;
    pkt[0] = stage;
    size_t len = 1 + pack(pkt + 1, sizeof pkt - 1, kv, n);
    exchange(r, WIRE_MACRO, pkt, len, &rp);
}


/* Ends the message with a refusal, discard or unfiltered acceptance. */
static int settle(struct run *r, const struct reply *rp, int per_rcpt)
{
    switch (rp->cmd) {
    case 0:
    case WIRE_R_CONTINUE:
    case WIRE_R_SKIP: return 0;
    case WIRE_R_ACCEPT:
        if (per_rcpt)
            return 0;
        r->final_action = "accept";
        return 1;
    default:
        if (per_rcpt && rp->cmd != WIRE_R_DISCARD)
            return 0;
        r->ok = 0;
        r->final_action = offline_action_of(rp);
        snprintf(r->final_reply, sizeof r->final_reply, "%s", rp->text);
        return 1;
    }
}

/* "Name <a@b>, c@d" -> appends "<a@b>", "<c@d>" to out. */
static int addresses(const char *v, char out[][512], int max)
{
    int n = 0;
    const char *p = v;
    while (*p && n < max) {
        const char *start = p;
        int quoted = 0, angle = 0;
        for (; *p && (quoted || angle || *p != ','); p++) {
            if (*p == '"')
                quoted = !quoted;
            else if (*p == '<' && !quoted)
                angle = 1;
            else if (*p == '>' && !quoted)
                angle = 0;
        }
        size_t len = (size_t)(p - start);
        char item[512];
        snprintf(item, sizeof item, "%.*s", (int)len, start);
        char *lt = strrchr(item, '<'), *gt = lt ? strchr(lt, '>') : NULL;
        char addr[500] = "";
        if (lt && gt) {
            snprintf(addr, sizeof addr, "%.*s", (int)(gt - lt - 1), lt + 1);
        } else {
            char *paren = strchr(item, '(');
            if (paren)
                *paren = '\0';
            sscanf(item, " %499s", addr);
        }
        if (strchr(addr, '@'))
            snprintf(out[n++], 512, "<%s>", addr);
        if (*p == ',')
            p++;
    }
    return n;
}

static void bracket(char *dst, size_t cap, const char *a)
{
    if (a[0] == '<')
        snprintf(dst, cap, "%s", a);
    else
        snprintf(dst, cap, "<%s>", a);
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    struct buf b;
    buf_init(&b, 0);
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        buf_append(&b, chunk, n);
    int bad = ferror(f);
    fclose(f);
    buf_append_byte(&b, 0);
    if (bad) {
        buf_free(&b);
        return NULL;
    }
    *len = buf_len(&b) - 1;
    return (char *)b.data;
}

struct topts {
    const char *client, *helo, *from;
    const char *rcpts[MAX_RCPTS];
    int nrcpts;
    const char *macros[2 * 64];
    int nmacros;
    int json;
    int each;      /* --each-connection */
    char **files;  /* the messages, nfiles >= 1 */
    int nfiles;
};

static int usage_error(const char *msg, const char *arg)
{
    fprintf(stderr, "luamilter test: ");
    fprintf(stderr, msg, arg);
    fprintf(stderr, "\n");
    return 2;
}

static int parse_opts(int argc, char **argv, struct topts *o,
                      const char **script)
{
    static const struct option lo[] = {
        {"client", required_argument, 0, 'c'},
        {"helo", required_argument, 0, 'H'},
        {"from", required_argument, 0, 'f'},
        {"rcpt", required_argument, 0, 'r'},
        {"macro", required_argument, 0, 'm'},
        {"json", no_argument, 0, 'j'},
        {"set", required_argument, 0, 's'},
        {"preload", required_argument, 0, 'p'},
        {"each-connection", no_argument, 0, 'e'},
        {0, 0, 0, 0}};
    char err[1200];
    int c;
    optind = 0; /* glibc: restart scanning on a new argv */
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'c': o->client = optarg; break;
        case 'H': o->helo = optarg; break;
        case 'f': o->from = optarg; break;
        case 'r':
            if (o->nrcpts == MAX_RCPTS)
                return usage_error("%s", "too many --rcpt");
            o->rcpts[o->nrcpts++] = optarg;
            break;
        case 'm': {
            char *eq = strchr(optarg, '=');
            if (!eq || eq == optarg || o->nmacros == 2 * 64)
                return usage_error("--macro wants NAME=VALUE, not '%s'",
                                   optarg);
            *eq = '\0';
            o->macros[o->nmacros++] = optarg;
            o->macros[o->nmacros++] = eq + 1;
            break;
        }
        case 'j': o->json = 1; break;
        case 'e': o->each = 1; break;
        case 's':
            if (lb_add_setting(optarg, err, sizeof err) < 0)
                return usage_error("%s", err);
            break;
        case 'p':
            if (lb_set_preload(optarg, err, sizeof err) < 0)
                return usage_error("%s", err);
            break;
        default: return 2;
        }
    }
    if (argc - optind < 2)
        return usage_error("%s", "usage: luamilter test SCRIPT.lua "
                                 "MESSAGE.eml... [--each-connection] "
                                 "[--client IP] [--helo NAME] [--from ADDR] "
                                 "[--rcpt ADDR]... [--macro NAME=VALUE]... "
                                 "[--json] [--set NAME=VALUE]... "
                                 "[--preload FILE]");
    *script = argv[optind];
    o->files = argv + optind + 1;
    o->nfiles = argc - optind - 1;
    return 0;
}

/* The trace header Postfix writes (only the date differs from real mail). */
static void trace_header(char *out, size_t cap, const char *helo,
                         const char *name, const char *ip, const char *host,
                         const char *qid, const char *single_rcpt)
{
    char date[64];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S +0000 (UTC)", &tm);
    if (single_rcpt)
        snprintf(out, cap,
                 "Received: from %s (%s [%s])\n\tby %s (Postfix) with ESMTP "
                 "id %s\n\tfor %s; %s",
                 helo, name, ip, host, qid, single_rcpt, date);
    else
        snprintf(out, cap,
                 "Received: from %s (%s [%s])\n\tby %s (Postfix) with ESMTP "
                 "id %s;\n\t%s",
                 helo, name, ip, host, qid, date);
}

static void add_trace(struct run *r, const char *helo, const char *cname,
                      const char *ip, const char *mtahost, const char *qid)
{
    char trace[2048];
    if (r->traced)
        return;
    trace_header(trace, sizeof trace, helo, cname, ip, mtahost, qid,
                 r->msg.nrcpts == 1 ? r->msg.rcpts[0] : NULL);
    pf_add_trace(&r->msg, trace);
    r->traced = 1;
}

/* Plays the message part of the session; returns when it is settled. */
static void play_message(struct run *r, const char *sender,
                         char rcpts[][512], int nrcpts, const char *qid,
                         const char *mtahost, const char *helo,
                         const char *cname, const char *ip)
{
    struct reply rp;
    char pkt[65536 + 16];
    const char *mm[] = {"{mail_addr}", sender};
    send_macros(r, 'M', mm, 2);
    exchange(r, WIRE_MAIL, sender, strlen(sender) + 1, &rp);
    offline_stage(r, SE_ENVFROM, sender, &rp);
    pf_set_sender(&r->msg, sender);
    if (settle(r, &rp, 0)) {
        for (int i = 0; r->ok && i < nrcpts; i++) /* accepted unfiltered */
            pf_add_rcpt(&r->msg, rcpts[i]);
        return;
    }
    int accepted = 0;
    for (int i = 0; i < nrcpts; i++) {
        const char *rm[] = {"{rcpt_addr}", rcpts[i], "i", qid};
        send_macros(r, 'R', rm, accepted ? 4 : 2);
        exchange(r, WIRE_RCPT, rcpts[i], strlen(rcpts[i]) + 1, &rp);
        offline_stage(r, SE_ENVRCPT, rcpts[i], &rp);
        if (settle(r, &rp, 1))
            return;
        if (rp.cmd == WIRE_R_ACCEPT) { /* the rest goes unfiltered */
            for (int k = i; k < nrcpts; k++)
                pf_add_rcpt(&r->msg, rcpts[k]);
            r->final_action = "accept";
            return;
        }
        if (rp.cmd == 0 || rp.cmd == WIRE_R_CONTINUE) {
            pf_add_rcpt(&r->msg, rcpts[i]);
            accepted++;
        }
    }
    if (!accepted) {
        r->ok = 0;
        r->final_action = "reject";
        snprintf(r->final_reply, sizeof r->final_reply,
                 "every recipient was rejected");
        return;
    }
    add_trace(r, helo, cname, ip, mtahost, qid);
    const char *im[] = {"i", qid};
    send_macros(r, 'T', im, 2);
    exchange(r, WIRE_DATA, "", 0, &rp);
    offline_stage(r, SE_DATA, NULL, &rp);
    if (settle(r, &rp, 0))
        return;
    for (size_t i = 0; i < r->msg.nh; i++) {
        const struct pf_hdr *h = &r->msg.h[i];
        if (h->hidden)
            continue; /* Postfix does not show milters its own header */
        send_macros(r, 'L', im, 2);
        const char *hv[] = {h->name, h->value};
        size_t n = pack(pkt, sizeof pkt, hv, 2);
        exchange(r, WIRE_HEADER, pkt, n, &rp);
        offline_stage(r, SE_HEADER, h->name, &rp);
        if (settle(r, &rp, 0))
            return;
    }
    send_macros(r, 'N', im, 2);
    exchange(r, WIRE_EOH, "", 0, &rp);
    offline_stage(r, SE_EOH, NULL, &rp);
    if (settle(r, &rp, 0))
        return;
    const uint8_t *b = buf_head(&r->msg.body);
    for (size_t off = 0, len = buf_len(&r->msg.body); off < len;) {
        size_t n = len - off > WIRE_MAX_CHUNK ? WIRE_MAX_CHUNK : len - off;
        send_macros(r, 'B', im, 2);
        exchange(r, WIRE_BODY, b + off, n, &rp);
        offline_stage(r, SE_BODY, NULL, &rp);
        off += n;
        if (rp.cmd == WIRE_R_SKIP)
            break;
        if (settle(r, &rp, 0))
            return;
    }
    offline_headers_before(r);
    send_macros(r, 'E', im, 2);
    exchange(r, WIRE_BODYEOB, "", 0, &rp);
    offline_stage(r, SE_EOM, NULL, &rp);
    if (!settle(r, &rp, 0))
        r->final_action = "continue";
}

/* What the connection's first message settled for all of them. */
enum { CONN_OPEN, CONN_ACCEPTED, CONN_REFUSED };

/* The connection identity of every message (Postfix-style macros). */
struct client {
    char cname[256], ip[256], host[300], underscore[600];
    const char *helo, *mtahost, *qid; /* qid: from --macro i, or NULL */
};

static void client_init(struct client *cl, const struct topts *o)
{
    const char *client = o->client ? o->client : "127.0.0.1";
    snprintf(cl->cname, sizeof cl->cname, "unknown");
    const char *lb_ = strchr(client, '[');
    if (lb_ && client[strlen(client) - 1] == ']') {
        snprintf(cl->cname, sizeof cl->cname, "%.*s", (int)(lb_ - client),
                 client);
        snprintf(cl->ip, sizeof cl->ip, "%.*s", (int)(strlen(lb_) - 2),
                 lb_ + 1);
    } else {
        snprintf(cl->ip, sizeof cl->ip, "%s", client);
    }
    cl->helo = o->helo ? o->helo : "localhost";
    cl->mtahost = "localhost";
    cl->qid = NULL;
    for (int i = 0; i < o->nmacros; i += 2) {
        if (!strcmp(o->macros[i], "j"))
            cl->mtahost = o->macros[i + 1];
        if (!strcmp(o->macros[i], "i"))
            cl->qid = o->macros[i + 1];
    }
    if (strcmp(cl->cname, "unknown") == 0)
        snprintf(cl->host, sizeof cl->host, "[%s]", cl->ip);
    else
        snprintf(cl->host, sizeof cl->host, "%s", cl->cname);
    snprintf(cl->underscore, sizeof cl->underscore, "%s [%s]", cl->cname,
             cl->ip);
}

/* Envelope: options first, then the message's From:, To: and Cc:. */
static int envelope(const struct topts *o, const struct pf_msg *m,
                    char *sender, size_t cap, char rcpts[][512])
{
    int nrcpts = 0;
    snprintf(sender, cap, "<>");
    if (o->from) {
        bracket(sender, cap, o->from);
    } else {
        for (size_t i = 0; i < m->nh; i++)
            if (strcasecmp(m->h[i].name, "From") == 0 &&
                addresses(m->h[i].value, rcpts, 1) == 1) {
                snprintf(sender, cap, "%.511s", rcpts[0]);
                break;
            }
    }
    for (int i = 0; i < o->nrcpts; i++)
        bracket(rcpts[nrcpts++], 512, o->rcpts[i]);
    for (size_t i = 0; !o->nrcpts && i < m->nh; i++)
        if (strcasecmp(m->h[i].name, "To") == 0 ||
            strcasecmp(m->h[i].name, "Cc") == 0)
            nrcpts += addresses(m->h[i].value, rcpts + nrcpts,
                                MAX_RCPTS - nrcpts);
    return nrcpts;
}

/* Opens the connection: negotiation, connect and helo (the stages go to
 * the current message's report). Returns what they settled. */
static int open_connection(struct run *r, const struct topts *o,
                           const struct client *cl)
{
    sess_init(&r->s, &r->cfg, &ops, r, 1);
    lb_conn_init(&r->lua, r->st);
    r->lua.wake = woken;
    r->lua.wake_ud = r;
    struct reply rp;
    /* Postfix's offer without NR_HDR/NR_EOH/NR_BODY: every content event
     * is answered, so each stage reports the verdict it decided (the
     * daemon keeps such a verdict for eom, with the same outcome) */
    uint32_t offer = 0x1fffffu & ~(uint32_t)SESS_NR_HELD;
    uint8_t neg[12] = {0, 0, 0, 6, 0, 0, 1, 0xff, (uint8_t)(offer >> 24),
                       (uint8_t)(offer >> 16), (uint8_t)(offer >> 8),
                       (uint8_t)offer};
    exchange(r, WIRE_OPTNEG, neg, 12, &rp);
    const char *cm[4 * 2 + 2 * 64] = {
        "j", cl->mtahost, "{daemon_name}", cl->mtahost, "v",
        "Postfix (luamilter test)", "_", cl->underscore};
    for (int i = 0; i < o->nmacros; i++)
        cm[8 + i] = o->macros[i];
    send_macros(r, 'C', cm, 8 + o->nmacros);
    char conn[700];
    const char *cv[] = {cl->host};
    size_t n = pack(conn, sizeof conn, cv, 1);
    conn[n++] = strchr(cl->ip, ':') ? '6' : '4';
    conn[n++] = 0;
    conn[n++] = 0; /* port 0 */
    memcpy(conn + n, cl->ip, strlen(cl->ip) + 1);
    n += strlen(cl->ip) + 1;
    exchange(r, WIRE_CONNECT, conn, n, &rp);
    offline_stage(r, SE_CONNECT, cl->host, &rp);
    if (!settle(r, &rp, 0)) {
        send_macros(r, 'H', NULL, 0);
        exchange(r, WIRE_HELO, cl->helo, strlen(cl->helo) + 1, &rp);
        offline_stage(r, SE_HELO, cl->helo, &rp);
        if (!settle(r, &rp, 0))
            return CONN_OPEN;
    }
    return r->ok ? CONN_ACCEPTED : CONN_REFUSED;
}

static void close_connection(struct run *r)
{
    struct reply rp;
    exchange(r, WIRE_QUIT, "", 0, &rp);
    sess_free(&r->s);
    lb_conn_free(&r->lua);
}

int offline_main(int argc, char **argv, const struct sess_cfg *base)
{
    struct topts o = {0};
    const char *script = NULL;
    int rc = parse_opts(argc, argv, &o, &script);
    if (rc)
        return rc;
    char err[8192];
    static struct run r;
    memset(&r, 0, sizeof r);
    r.st = lb_load(script, err, sizeof err);
    if (!r.st) {
        fprintf(stderr, "luamilter: %s\n", err);
        return 2;
    }
    struct client cl;
    client_init(&cl, &o);
    r.cfg = *base;
    r.cfg.handlers = lb_handlers(r.st);
    buf_init(&r.out, 0);
    aio_use_default_loop();

    struct buf docs; /* the JSON documents, one per message */
    buf_init(&docs, 0);
    int worst = 0, conn = -1; /* -1: no connection open */
    const char *conn_action = "continue";
    char conn_reply[1024] = "";
    static char rcpts[MAX_RCPTS][512];
    for (int k = 0; k < o.nfiles; k++) {
        offline_msg_reset(&r);
        size_t mlen;
        char *mdata = read_file(o.files[k], &mlen);
        if (!mdata || pf_parse(&r.msg, mdata, mlen) < 0) {
            fprintf(stderr, "luamilter test: cannot read %s\n", o.files[k]);
            free(mdata);
            rc = 2;
            break;
        }
        free(mdata);
        char sender[512];
        int nrcpts = envelope(&o, &r.msg, sender, sizeof sender, rcpts);
        if (!nrcpts) {
            fprintf(stderr, "luamilter test: %s: no recipients in To:/Cc:, "
                            "give --rcpt ADDR\n", o.files[k]);
            rc = 2;
            break;
        }
        char qid[64];
        snprintf(qid, sizeof qid, "%s", cl.qid ? cl.qid : "4TEST000001");
        if (!cl.qid)
            snprintf(qid, sizeof qid, "4TEST%06d", k + 1);
        if (conn < 0) {
            conn = open_connection(&r, &o, &cl);
            conn_action = r.final_action;
            snprintf(conn_reply, sizeof conn_reply, "%s", r.final_reply);
        } else if (conn != CONN_OPEN) { /* as the first message ended */
            r.ok = conn == CONN_ACCEPTED;
            r.final_action = conn_action;
            snprintf(r.final_reply, sizeof r.final_reply, "%s", conn_reply);
        }
        if (conn == CONN_OPEN)
            play_message(&r, sender, rcpts, nrcpts, qid, cl.mtahost, cl.helo,
                         cl.cname, cl.ip);
        else if (r.ok) /* accepted at connect or helo: unfiltered */
            for (int i = 0; i < nrcpts; i++)
                pf_add_rcpt(&r.msg, rcpts[i]);
        if (!r.msg.sender)
            pf_set_sender(&r.msg, sender);
        if (r.ok)
            add_trace(&r, cl.helo, cl.cname, cl.ip, cl.mtahost, qid);
        struct reply rp;
        exchange(&r, WIRE_ABORT, "", 0, &rp); /* Postfix, after each one */
        if (o.each || k == o.nfiles - 1) {
            close_connection(&r);
            conn = -1;
        }
        if (o.nfiles > 1 && !o.json)
            printf("%s=== message %d: %s ===\n", k ? "\n" : "", k + 1,
                   o.files[k]);
        if (k)
            buf_append_byte(&docs, ',');
        offline_report(&r, sender, o.nfiles > 1 ? o.files[k] : NULL, &docs,
                       o.json);
        int status = r.failed ? 2 : r.ok ? 0 : 1;
        if (status > worst)
            worst = status;
    }
    if (conn >= 0)
        close_connection(&r);
    if (!rc && o.json) {
        if (o.nfiles > 1)
            printf("{\"messages\":[%.*s]}\n", (int)buf_len(&docs),
                   (const char *)buf_head(&docs));
        else
            printf("%.*s\n", (int)buf_len(&docs),
                   (const char *)buf_head(&docs));
    }
    buf_free(&docs);
    offline_msg_free(&r);
    lb_state_release(r.st);
    buf_free(&r.out);
    return rc ? rc : worst;
}
