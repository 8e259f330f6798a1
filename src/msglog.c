/* msglog: see msglog.h. */
#include "msglog.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#include "log.h"

/* Recipients listed per line (accepted and refused each); more are only
 * counted (rcpt_count, refused_count). */
#define LIST_MAX 100

const char *const msglog_verdict_names[MV__COUNT] = {
    "accept", "reject", "tempfail", "discard", "abort"};

void msglog_init(struct msglog *m)
{
    memset(m, 0, sizeof *m);
    m->last_ev = -1;
    buf_init(&m->refused, 1 << 20);
}

void msglog_free(struct msglog *m) { buf_free(&m->refused); }

double msglog_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void msglog_touch(struct msglog *m, const struct sess *s)
{
    if (m->msg_seq != s->msg_seq) {
        m->msg_seq = s->msg_seq;
        m->handler_s = m->lookup_s = 0;
        m->last_ev = m->last_rc = -1;
        m->qid[0] = '\0';
        m->nrefused = m->nlisted = 0;
        buf_reset(&m->refused);
        buf_shrink(&m->refused, 4096);
    }
    /* A message's queue id does not change once the MTA has sent it: it
     * is looked up (a macro search) until then, not at every call, and
     * only for a line that will be logged. */
    if (!m->qid[0] && log_enabled(LL_INFO)) {
        size_t n;
        const char *q = sess_macro(s, "i", 1, &n);
        if (q && n) {
            if (n >= sizeof m->qid)
                n = sizeof m->qid - 1;
            memcpy(m->qid, q, n);
            m->qid[n] = '\0';
        }
    }
}

void msglog_handler(struct msglog *m, int ev, int rc, double secs)
{
    m->handler_s += secs;
    m->last_ev = ev;
    m->last_rc = rc;
}

static int verdict_of(int action)
{
    switch (action) {
    case VA_REJECT: return MV_REJECT;
    case VA_TEMPFAIL: return MV_TEMPFAIL;
    case VA_DISCARD: return MV_DISCARD;
    default: return MV_ACCEPT; /* accept, continue (at eom), skip */
    }
}

/* The reply a reject or tempfail verdict sent, as put_reply builds it:
 * its code, and "XCODE text" (lines joined by newlines) unless the bare
 * 'r'/'t' let the MTA say its own. */
static int reply_of(const struct verdict *v, struct buf *text)
{
    int rej = v->action == VA_REJECT;
    int code = v->code ? v->code : rej ? 550 : 451;
    if (!v->code && !v->nlines && !v->xcode.n)
        return code;
    struct wire_str x = v->xcode.n ? v->xcode : wire_default_xcode(code);
    buf_append(text, x.p, x.n);
    if (!v->nlines) {
        const char *d =
            rej ? "Command rejected" : "Service unavailable - try again later";
        buf_append_byte(text, ' ');
        buf_append(text, d, strlen(d));
    }
    for (int i = 0; i < v->nlines; i++) {
        buf_append_byte(text, i ? '\n' : ' ');
        buf_append(text, v->lines[i].p, v->lines[i].n);
    }
    return code;
}

/* Appends the strings of parts to out[0..n) at *pos, cut to fit (as
 * snprintf would cut them, without its cost). */
static void cat(char *out, size_t n, size_t *pos, const char *const *parts,
                int count)
{
    for (int i = 0; i < count; i++)
        for (const char *c = parts[i]; *c && *pos + 1 < n; c++)
            out[(*pos)++] = *c;
    out[*pos] = '\0';
}

/* Appends ",name:count" (no comma first). */
static void mods_put(char *out, size_t n, size_t *pos, const char *name,
                     size_t count)
{
    char num[24];
    num[sizeof num - 1] = '\0';
    const char *parts[4] = {*pos ? "," : "", name, ":",
                            log_digits(num + sizeof num - 1, count)};
    cat(out, n, pos, parts, 4);
}

/* "add_header:2,change_header:1,change_from:1" from an eom verdict. */
static void mods_of(const struct verdict *v, char *out, size_t n)
{
    static const char *const names[] = {"add_header",    "insert_header",
                                        "change_header", "delete_header",
                                        "add_rcpt",      "del_rcpt"};
    size_t count[6] = {0};
    for (size_t i = 0; i < v->nmods; i++)
        if (v->mods[i].op < 6)
            count[v->mods[i].op]++;
    size_t pos = 0;
    *out = '\0';
    for (int k = 0; k < 6; k++)
        if (count[k])
            mods_put(out, n, &pos, names[k], count[k]);
    const char *one[] = {v->from.p ? "change_from" : NULL,
                         v->body.p ? "replace_body" : NULL,
                         v->quarantine.p ? "quarantine" : NULL};
    for (int k = 0; k < 3; k++)
        if (one[k])
            mods_put(out, n, &pos, one[k], 1);
}

static void str_field(struct log_field *f, const char *key, const char *s,
                      size_t n)
{
    *f = (struct log_field){.key = key, .type = LF_STR, .s = s, .n = n};
}

int msglog_note(struct msglog *m, const struct sess *s, int what, int ev,
                const struct verdict *v,
                const char *(*site_of)(void *ud, int ev), void *ud)
{
    msglog_touch(m, s);
    if (what == SN_RCPT_REFUSED) {
        if (s->nrcpts) {
            struct sess_str r = s->rcpts[s->nrcpts - 1];
            /* listed while there is room, counted always */
            if (m->nlisted < LIST_MAX &&
                buf_append(&m->refused, sess_cstr(s, r, 1), r.len + 1) == 0)
                m->nlisted++;
            m->nrefused++;
        }
        return -1;
    }
    int mv = MV_ABORT, stage = ev;
    if (what == SN_MSG_END) {
        mv = verdict_of(v->action);
    } else if (s->nrcpts == 0 && m->nrefused > 0) {
        mv = MV_REJECT; /* every recipient refused: the MTA gave up */
        stage = SE_ENVRCPT;
    }
    if (!log_enabled(LL_INFO))
        return mv; /* the line would be dropped: build none of it */
    struct log_field f[16];
    size_t nf = 0;
    char client[600] = "", mods[256] = "";
    struct buf rcpts, reply;
    buf_init(&rcpts, 0);
    buf_init(&reply, 0);
    if (s->family) {
        const char *parts[4] = {sess_cstr(s, s->host, 0), "[",
                                s->family == 'L' ? "unix"
                                                 : sess_cstr(s, s->addr, 0),
                                "]"};
        size_t k = 0;
        cat(client, sizeof client, &k, parts, 4); /* "host[addr]" */
        str_field(&f[nf++], "client", client, k);
    }
    if (s->has_sender)
        str_field(&f[nf++], "from", sess_cstr(s, s->sender, 1), s->sender.len);
    uint32_t shown = s->nrcpts < LIST_MAX ? s->nrcpts : LIST_MAX;
    for (uint32_t i = 0; i < shown; i++)
        if (buf_append(&rcpts, sess_cstr(s, s->rcpts[i], 1),
                       s->rcpts[i].len + 1) < 0)
            shown = i; /* out of memory: list fewer */
    f[nf++] = (struct log_field){.key = "rcpts", .type = LF_LIST,
                                 .s = (const char *)buf_head(&rcpts),
                                 .n = shown};
    if (shown < s->nrcpts)
        f[nf++] = (struct log_field){.key = "rcpt_count", .type = LF_INT,
                                     .i = s->nrcpts};
    if (m->nrefused) {
        f[nf++] = (struct log_field){
            .key = "refused", .type = LF_LIST,
            .s = (const char *)buf_head(&m->refused),
            .n = m->nlisted};
        if (m->nrefused > m->nlisted)
            f[nf++] = (struct log_field){.key = "refused_count",
                                         .type = LF_INT, .i = m->nrefused};
    }
    const char *vname = msglog_verdict_names[mv];
    str_field(&f[nf++], "verdict", vname, strlen(vname));
    if (mv != MV_ABORT)
        str_field(&f[nf++], "stage", sess_event_names[stage],
                  strlen(sess_event_names[stage]));
    if (v && (v->action == VA_REJECT || v->action == VA_TEMPFAIL)) {
        f[nf++] = (struct log_field){.key = "code", .type = LF_INT,
                                     .i = reply_of(v, &reply)};
        if (buf_len(&reply))
            str_field(&f[nf++], "reply", (const char *)buf_head(&reply),
                      buf_len(&reply));
    }
    if (mv != MV_ABORT && m->last_ev == stage &&
        (s->cfg->handlers & SE_BIT(stage))) {
        const char *h = sess_event_names[stage];
        const char *at = site_of ? site_of(ud, stage) : NULL;
        str_field(&f[nf++], "handler", h, strlen(h));
        if (at && *at)
            str_field(&f[nf++], "at", at, strlen(at));
        if (m->last_rc < 0)
            f[nf++] = (struct log_field){.key = "on_error", .type = LF_BOOL,
                                         .i = 1};
    }
    if (v && ev == SE_EOM) {
        mods_of(v, mods, sizeof mods);
        if (*mods)
            str_field(&f[nf++], "mods", mods, strlen(mods));
    }
    f[nf++] = (struct log_field){.key = "handler_seconds", .type = LF_SECS,
                                 .num = m->handler_s};
    f[nf++] = (struct log_field){.key = "lookup_seconds", .type = LF_SECS,
                                 .num = m->lookup_s};
    const char *q = sess_qid(s);
    log_fields(LL_INFO, s->id, q && *q ? q : m->qid, "message", f, nf);
    buf_free(&rcpts);
    buf_free(&reply);
    return mv;
}
