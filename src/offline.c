/*
 * offline: `luamilter test SCRIPT MESSAGE.eml`, one simulated session.
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
#include "lb.h"
#include "log.h"
#include "pfsim.h"

#define MAX_RCPTS 256

struct run {
    struct lb_state *st;
    struct lb_conn lua;
    struct sess_cfg cfg;
    struct sess s;
    struct buf out;   /* reply packets of the current command */
    struct buf json;  /* stages, as JSON objects */
    struct buf text;  /* stages, as text lines */
    int nstages;
    int failed;       /* a handler raised or returned a bad verdict */
    int json_mode;
    struct pf_msg msg;
    struct buf mods_json, mods_text;
    int nmods;
    int ok;           /* 1 while the message is still on its way */
    int traced;       /* the MTA's trace header was added */
    const char *final_action;
    char final_reply[1024];
    volatile int woken; /* a waiting handler's lookup is done */
};

struct reply {
    uint8_t cmd;      /* 0: the MTA was told not to wait for one */
    char text[1024];  /* REPLYCODE text */
};

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
    return rc;
}

static const struct sess_ops ops = {call};

static void jstr(struct buf *o, const char *p, size_t n)
{
    buf_append_byte(o, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            buf_append(o, esc, 2);
        } else if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            buf_append(o, esc, 6);
        } else {
            buf_append_byte(o, c);
        }
    }
    buf_append_byte(o, '"');
}
#define JS(o, s) jstr((o), (s), strlen(s))

static void put(struct buf *o, const char *s) { buf_append(o, s, strlen(s)); }

static void putf(struct buf *o, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void putf(struct buf *o, const char *fmt, ...)
{
    char tmp[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    buf_append(o, tmp, n < (int)sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static const char *action_of(const struct reply *rp)
{
    switch (rp->cmd) {
    case 0:
    case WIRE_R_CONTINUE: return "continue";
    case WIRE_R_ACCEPT: return "accept";
    case WIRE_R_REJECT: return "reject";
    case WIRE_R_TEMPFAIL: return "tempfail";
    case WIRE_R_DISCARD: return "discard";
    case WIRE_R_SKIP: return "skip";
    case WIRE_R_REPLYCODE: return rp->text[0] == '4' ? "tempfail" : "reject";
    default: return "other";
    }
}

/* Records one modification packet for the report and applies it. */
static void take_mod(struct run *r, uint8_t cmd, const uint8_t *p, size_t n)
{
    const char *err = NULL;
    if (pf_apply(&r->msg, cmd, p, n, &err) < 0)
        fprintf(stderr, "luamilter: the MTA would refuse a modification: %s\n",
                err ? err : "?");
    const char *s[3] = {"", "", ""};
    size_t pos = 0, off = 0;
    uint32_t idx = 0;
    if (cmd == WIRE_R_INSHEADER || cmd == WIRE_R_CHGHEADER) {
        idx = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
              (uint32_t)p[2] << 8 | p[3];
        off = 4;
    }
    for (int i = 0; i < 3 && cmd != WIRE_R_REPLBODY; i++) {
        struct wire_str w = wire_list_next((const char *)p + off, n - off, &pos);
        if (w.p)
            s[i] = w.p;
    }
    struct buf *j = &r->mods_json, *t = &r->mods_text;
    if (r->nmods++)
        put(j, ",");
    switch (cmd) {
    case WIRE_R_ADDHEADER:
        put(j, "{\"op\":\"add_header\",\"name\":");
        JS(j, s[0]);
        put(j, ",\"value\":");
        JS(j, s[1]);
        putf(t, "  add_header %s: %s\n", s[0], s[1]);
        break;
    case WIRE_R_INSHEADER:
        putf(j, "{\"op\":\"insert_header\",\"index\":%u,\"name\":", idx);
        JS(j, s[0]);
        put(j, ",\"value\":");
        JS(j, s[1]);
        putf(t, "  insert_header at %u: %s: %s\n", idx, s[0], s[1]);
        break;
    case WIRE_R_CHGHEADER:
        putf(j, "{\"op\":\"%s\",\"index\":%u,\"name\":",
             *s[1] ? "change_header" : "delete_header", idx);
        JS(j, s[0]);
        if (*s[1]) {
            put(j, ",\"value\":");
            JS(j, s[1]);
            putf(t, "  change_header %s #%u: %s\n", s[0], idx, s[1]);
        } else {
            putf(t, "  delete_header %s #%u\n", s[0], idx);
        }
        break;
    case WIRE_R_ADDRCPT:
    case WIRE_R_ADDRCPT_PAR:
        put(j, "{\"op\":\"add_rcpt\",\"rcpt\":");
        JS(j, s[0]);
        if (*s[1]) {
            put(j, ",\"args\":");
            JS(j, s[1]);
        }
        putf(t, "  add_rcpt %s%s%s\n", s[0], *s[1] ? " " : "", s[1]);
        break;
    case WIRE_R_DELRCPT:
        put(j, "{\"op\":\"del_rcpt\",\"rcpt\":");
        JS(j, s[0]);
        putf(t, "  del_rcpt %s\n", s[0]);
        break;
    case WIRE_R_CHGFROM:
        put(j, "{\"op\":\"change_from\",\"sender\":");
        JS(j, s[0]);
        if (*s[1]) {
            put(j, ",\"args\":");
            JS(j, s[1]);
        }
        putf(t, "  change_from %s%s%s\n", s[0], *s[1] ? " " : "", s[1]);
        break;
    case WIRE_R_REPLBODY:
        putf(j, "{\"op\":\"replace_body\",\"bytes\":%zu", n);
        putf(t, "  replace_body (%zu bytes)\n", n);
        break;
    case WIRE_R_QUARANTINE:
        put(j, "{\"op\":\"quarantine\",\"reason\":");
        JS(j, s[0]);
        putf(t, "  quarantine: %s\n", s[0]);
        break;
    default:
        put(j, "{\"op\":\"progress\"");
        break;
    }
    put(j, "}");
}

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
            take_mod(r, rf.cmd, rf.data, rf.len);
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

/* Records a stage of a handled event: its argument and the reply. */
static void stage(struct run *r, int ev, const char *arg,
                  const struct reply *rp)
{
    if (!(r->cfg.handlers & SE_BIT(ev)))
        return;
    const char *act = action_of(rp);
    if (r->nstages++)
        put(&r->json, ",");
    put(&r->json, "{\"event\":");
    JS(&r->json, sess_event_names[ev]);
    if (arg) {
        put(&r->json, ",\"arg\":");
        JS(&r->json, arg);
    }
    put(&r->json, ",\"verdict\":{\"action\":");
    JS(&r->json, act);
    if (rp->text[0]) {
        put(&r->json, ",\"reply\":");
        JS(&r->json, rp->text);
    }
    put(&r->json, "}}");
    putf(&r->text, "%s%s%s%s: %s%s%s\n", sess_event_names[ev],
         arg ? "(" : "", arg ? arg : "", arg ? ")" : "", act,
         rp->text[0] ? ": " : "", rp->text);
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
        r->final_action = action_of(rp);
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
};

static int usage_error(const char *msg, const char *arg)
{
    fprintf(stderr, "luamilter test: ");
    fprintf(stderr, msg, arg);
    fprintf(stderr, "\n");
    return 2;
}

static int parse_opts(int argc, char **argv, struct topts *o,
                      const char **script, const char **message)
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
    if (argc - optind != 2)
        return usage_error("%s", "usage: luamilter test SCRIPT.lua MESSAGE.eml "
                                 "[--client IP] [--helo NAME] [--from ADDR] "
                                 "[--rcpt ADDR]... [--macro NAME=VALUE]... "
                                 "[--json] [--set NAME=VALUE]... "
                                 "[--preload FILE]");
    *script = argv[optind];
    *message = argv[optind + 1];
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
    stage(r, SE_ENVFROM, sender, &rp);
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
        stage(r, SE_ENVRCPT, rcpts[i], &rp);
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
    stage(r, SE_DATA, NULL, &rp);
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
        stage(r, SE_HEADER, h->name, &rp);
        if (settle(r, &rp, 0))
            return;
    }
    send_macros(r, 'N', im, 2);
    exchange(r, WIRE_EOH, "", 0, &rp);
    stage(r, SE_EOH, NULL, &rp);
    if (settle(r, &rp, 0))
        return;
    const uint8_t *b = buf_head(&r->msg.body);
    for (size_t off = 0, len = buf_len(&r->msg.body); off < len;) {
        size_t n = len - off > WIRE_MAX_CHUNK ? WIRE_MAX_CHUNK : len - off;
        send_macros(r, 'B', im, 2);
        exchange(r, WIRE_BODY, b + off, n, &rp);
        stage(r, SE_BODY, NULL, &rp);
        off += n;
        if (rp.cmd == WIRE_R_SKIP)
            break;
        if (settle(r, &rp, 0))
            return;
    }
    send_macros(r, 'E', im, 2);
    exchange(r, WIRE_BODYEOB, "", 0, &rp);
    stage(r, SE_EOM, NULL, &rp);
    if (!settle(r, &rp, 0))
        r->final_action = "continue";
}

int offline_main(int argc, char **argv, const struct sess_cfg *base)
{
    struct topts o = {0};
    const char *script, *message;
    int rc = parse_opts(argc, argv, &o, &script, &message);
    if (rc)
        return rc;
    char err[8192];
    struct run r;
    memset(&r, 0, sizeof r);
    r.st = lb_load(script, err, sizeof err);
    if (!r.st) {
        fprintf(stderr, "luamilter: %s\n", err);
        return 2;
    }
    size_t mlen;
    char *mdata = read_file(message, &mlen);
    if (!mdata || pf_parse(&r.msg, mdata, mlen) < 0) {
        fprintf(stderr, "luamilter test: cannot read %s\n", message);
        free(mdata);
        lb_state_release(r.st);
        return 2;
    }
    free(mdata);

    /* Envelope: options first, then the message's From:, To: and Cc:. */
    char sender[512] = "<>", rcpts[MAX_RCPTS][512];
    int nrcpts = 0;
    if (o.from) {
        bracket(sender, sizeof sender, o.from);
    } else {
        for (size_t i = 0; i < r.msg.nh; i++)
            if (strcasecmp(r.msg.h[i].name, "From") == 0 &&
                addresses(r.msg.h[i].value, rcpts, 1) == 1) {
                snprintf(sender, sizeof sender, "%s", rcpts[0]);
                break;
            }
    }
    for (int i = 0; i < o.nrcpts; i++)
        bracket(rcpts[nrcpts++], sizeof rcpts[0], o.rcpts[i]);
    for (size_t i = 0; !o.nrcpts && i < r.msg.nh; i++)
        if (strcasecmp(r.msg.h[i].name, "To") == 0 ||
            strcasecmp(r.msg.h[i].name, "Cc") == 0)
            nrcpts += addresses(r.msg.h[i].value, rcpts + nrcpts,
                                MAX_RCPTS - nrcpts);
    if (!nrcpts) {
        fprintf(stderr, "luamilter test: no recipients in To:/Cc:, give "
                        "--rcpt ADDR\n");
        pf_free(&r.msg);
        lb_state_release(r.st);
        return 2;
    }

    /* Connection identity, Postfix-style macros. */
    const char *client = o.client ? o.client : "127.0.0.1";
    char cname[256] = "unknown", ip[256];
    const char *lb_ = strchr(client, '[');
    if (lb_ && client[strlen(client) - 1] == ']') {
        snprintf(cname, sizeof cname, "%.*s", (int)(lb_ - client), client);
        snprintf(ip, sizeof ip, "%.*s", (int)(strlen(lb_) - 2), lb_ + 1);
    } else {
        snprintf(ip, sizeof ip, "%s", client);
    }
    const char *helo = o.helo ? o.helo : "localhost";
    const char *mtahost = "localhost", *qid = "4TEST000001";
    for (int i = 0; i < o.nmacros; i += 2) {
        if (!strcmp(o.macros[i], "j"))
            mtahost = o.macros[i + 1];
        if (!strcmp(o.macros[i], "i"))
            qid = o.macros[i + 1];
    }
    char host[300], underscore[600];
    if (strcmp(cname, "unknown") == 0)
        snprintf(host, sizeof host, "[%s]", ip);
    else
        snprintf(host, sizeof host, "%s", cname);
    snprintf(underscore, sizeof underscore, "%s [%s]", cname, ip);

    r.cfg = *base;
    r.cfg.handlers = lb_handlers(r.st);
    r.ok = 1;
    r.final_action = "continue";
    r.json_mode = o.json;
    buf_init(&r.out, 0);
    buf_init(&r.json, 0);
    buf_init(&r.text, 0);
    buf_init(&r.mods_json, 0);
    buf_init(&r.mods_text, 0);
    sess_init(&r.s, &r.cfg, &ops, &r, 1);
    lb_conn_init(&r.lua, r.st);
    r.lua.wake = woken;
    r.lua.wake_ud = &r;
    aio_use_default_loop();

    struct reply rp;
    uint8_t neg[12] = {0, 0, 0, 6, 0, 0, 1, 0xff, 0, 0x1f, 0xff, 0xff};
    exchange(&r, WIRE_OPTNEG, neg, 12, &rp);
    const char *cm[4 * 2 + 2 * 64] = {
        "j", mtahost, "{daemon_name}", mtahost, "v",
        "Postfix (luamilter test)", "_", underscore};
    for (int i = 0; i < o.nmacros; i++)
        cm[8 + i] = o.macros[i];
    send_macros(&r, 'C', cm, 8 + o.nmacros);
    char conn[700];
    const char *cv[] = {host};
    size_t n = pack(conn, sizeof conn, cv, 1);
    conn[n++] = strchr(ip, ':') ? '6' : '4';
    conn[n++] = 0;
    conn[n++] = 0; /* port 0 */
    memcpy(conn + n, ip, strlen(ip) + 1);
    n += strlen(ip) + 1;
    exchange(&r, WIRE_CONNECT, conn, n, &rp);
    stage(&r, SE_CONNECT, host, &rp);
    if (!settle(&r, &rp, 0)) {
        send_macros(&r, 'H', NULL, 0);
        exchange(&r, WIRE_HELO, helo, strlen(helo) + 1, &rp);
        stage(&r, SE_HELO, helo, &rp);
        if (!settle(&r, &rp, 0))
            play_message(&r, sender, rcpts, nrcpts, qid, mtahost, helo,
                         cname, ip);
        else if (r.ok) /* accepted at helo: the message goes unfiltered */
            for (int i = 0; i < nrcpts; i++)
                pf_add_rcpt(&r.msg, rcpts[i]);
    } else if (r.ok) {
        for (int i = 0; i < nrcpts; i++)
            pf_add_rcpt(&r.msg, rcpts[i]);
    }
    if (!r.msg.sender)
        pf_set_sender(&r.msg, sender);
    if (r.ok)
        add_trace(&r, helo, cname, ip, mtahost, qid);
    exchange(&r, WIRE_ABORT, "", 0, &rp);
    exchange(&r, WIRE_QUIT, "", 0, &rp);

    struct buf msgout;
    buf_init(&msgout, 0);
    if (r.ok)
        pf_render(&r.msg, &msgout);
    if (o.json) {
        struct buf j;
        buf_init(&j, 0);
        put(&j, "{\"stages\":[");
        buf_append(&j, buf_head(&r.json), buf_len(&r.json));
        put(&j, "],\"final\":{\"action\":");
        JS(&j, r.final_action);
        putf(&j, ",\"delivered\":%s", r.ok ? "true" : "false");
        if (r.final_reply[0]) {
            put(&j, ",\"reply\":");
            JS(&j, r.final_reply);
        }
        putf(&j, ",\"error\":%s},\"modifications\":[",
             r.failed ? "true" : "false");
        buf_append(&j, buf_head(&r.mods_json), buf_len(&r.mods_json));
        put(&j, "],\"envelope\":{\"sender\":");
        JS(&j, r.msg.sender ? r.msg.sender : sender);
        put(&j, ",\"rcpts\":[");
        for (size_t i = 0; i < r.msg.nrcpts; i++) {
            if (i)
                put(&j, ",");
            JS(&j, r.msg.rcpts[i]);
        }
        put(&j, "]},\"quarantine\":");
        if (r.msg.quarantine)
            JS(&j, r.msg.quarantine);
        else
            put(&j, "null");
        put(&j, ",\"message\":");
        if (r.ok)
            jstr(&j, (const char *)buf_head(&msgout), buf_len(&msgout));
        else
            put(&j, "null");
        put(&j, "}\n");
        fwrite(buf_head(&j), 1, buf_len(&j), stdout);
        buf_free(&j);
    } else {
        fwrite(buf_head(&r.text), 1, buf_len(&r.text), stdout);
        fwrite(buf_head(&r.mods_text), 1, buf_len(&r.mods_text), stdout);
        printf("final: %s%s%s (%s)\n", r.final_action,
               r.final_reply[0] ? ": " : "", r.final_reply,
               r.ok ? "delivered" : "not delivered");
        printf("envelope: from %s to", r.msg.sender ? r.msg.sender : sender);
        for (size_t i = 0; i < r.msg.nrcpts; i++)
            printf("%s %s", i ? "," : "", r.msg.rcpts[i]);
        printf("\n");
        if (r.msg.quarantine)
            printf("quarantine: %s (held in the MTA's hold queue)\n",
                   r.msg.quarantine);
        if (r.ok) {
            printf("--- message ---\n");
            fwrite(buf_head(&msgout), 1, buf_len(&msgout), stdout);
        }
    }
    rc = r.failed ? 2 : r.ok ? 0 : 1;
    buf_free(&msgout);
    sess_free(&r.s);
    lb_conn_free(&r.lua);
    lb_state_release(r.st);
    pf_free(&r.msg);
    buf_free(&r.out);
    buf_free(&r.json);
    buf_free(&r.text);
    buf_free(&r.mods_json);
    buf_free(&r.mods_text);
    return rc;
}
