/*
 * Session tests, without a loop or a VM: a fake handler records the events
 * the state machine raises and answers with scripted verdicts.
 *  - every Postfix capture replays without a protocol error, and where the
 *    recorded filter answered every event, our replies are the same bytes;
 *  - negotiation for Postfix, Sendmail and Stalwart offers;
 *  - state rules: ABORT, HELO/MAIL mid-message, ended messages, QUIT_NC,
 *    out-of-order commands, no-reply events, body limits, macros;
 *  - header index translation (Postfix's hidden Received: header).
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fixture.h"
#include "log.h"
#include "mods.h"
#include "mta.h"
#include "sess.h"
#include "t.h"

struct fake {
    int events[64];
    int nevents;
    struct verdict reply[SE__COUNT]; /* what each event answers */
    int fail[SE__COUNT];             /* handler "raises" */
    int defer[SE__COUNT];            /* handler waits on a lookup */
    size_t body_seen;
};

static int fake_call(void *ud, struct sess *s, int ev,
                     const struct wire_cmd *cmd, struct verdict *v)
{
    (void)s;
    struct fake *f = ud;
    if (f->nevents < 64)
        f->events[f->nevents++] = ev;
    if (ev == SE_BODY)
        f->body_seen += cmd->body_len;
    *v = f->reply[ev];
    if (f->defer[ev])
        return SESS_CALL_WAIT;
    return f->fail[ev] ? -1 : 0;
}

static const struct sess_ops fake_ops = {fake_call, NULL};

/* The batch op (ops.headers): each batch's range is noted; header k (in
 * message order) answers batch_stop_action when k == batch_stop_at. */
static uint32_t batch_first[16], batch_n[16], batch_seen[16];
static int nbatches, batch_stop_at = -1, batch_stop_action;

static int fake_headers(void *ud, struct sess *s, uint32_t first, uint32_t n,
                        struct verdict *v)
{
    struct fake *f = ud;
    if (nbatches < 16) {
        batch_first[nbatches] = first;
        batch_n[nbatches] = n;
    }
    nbatches++;
    for (uint32_t k = first; k < first + n; k++) {
        s->hdrs_run = k + 1;
        if (f->nevents < 64)
            f->events[f->nevents++] = SE_HEADER;
        if (nbatches <= 16)
            batch_seen[nbatches - 1] = s->hdrs_run;
        if ((int)k == batch_stop_at) {
            v->action = batch_stop_action;
            return 0;
        }
    }
    return 0;
}

static const struct sess_ops batch_ops = {fake_call, fake_headers};
static const unsigned ALL = (1u << SE__COUNT) - 1;
/* Postfix's offer but for the content NR bits: every event is answered. */
#define OFFER_REPLY (0x1fffffu & ~SESS_NR_HELD)

struct rig {
    struct fake f;
    struct sess_cfg cfg;
    struct sess s;
    struct buf out;
};

static void rig_init(struct rig *r, unsigned handlers)
{
    memset(r, 0, sizeof *r);
    r->cfg.handlers = handlers;
    r->cfg.on_error = VA_TEMPFAIL;
    r->cfg.max_body = 1u << 30;
    sess_init(&r->s, &r->cfg, &fake_ops, &r->f, 1);
    buf_init(&r->out, 0);
}

static void rig_free(struct rig *r)
{
    sess_free(&r->s);
    buf_free(&r->out);
}

/* Sends one frame built from cmd + payload; returns sess_handle's result. */
static int send(struct rig *r, uint8_t cmd, const void *payload, size_t len)
{
    static uint8_t frame[128 * 1024]; /* a copy: nothing may point into payload */
    if (len > sizeof frame) {
        fprintf(stderr, "test bug: a %zu-byte frame\n", len);
        return -1;
    }
    struct wire_frame f = {cmd, frame, len};
    struct wire_cmd c;
    const char *err;
    memcpy(frame, payload, len);
    if (wire_decode(&f, &c, &err) < 0) {
        fprintf(stderr, "test bug: %s\n", err);
        return -1;
    }
    return sess_handle(&r->s, &c, &r->out);
}
#define SEND(r, cmd, lit) send((r), (cmd), (lit), sizeof(lit) - 1)

static void optneg(struct rig *r, uint32_t v, uint32_t a, uint32_t p)
{
    uint8_t b[12];
    uint32_t x[3] = {v, a, p};
    for (int i = 0; i < 3; i++) {
        b[4 * i] = (uint8_t)(x[i] >> 24);
        b[4 * i + 1] = (uint8_t)(x[i] >> 16);
        b[4 * i + 2] = (uint8_t)(x[i] >> 8);
        b[4 * i + 3] = (uint8_t)x[i];
    }
    send(r, 'O', b, 12);
}

/* The reply commands written since the last call, as a string ("cc y"). */
static const char *replies(struct rig *r)
{
    static char s[256];
    size_t n = 0;
    while (buf_len(&r->out) >= 5 && n + 1 < sizeof s) {
        const uint8_t *p = buf_head(&r->out);
        uint32_t len = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
                       (uint32_t)p[2] << 8 | p[3];
        s[n++] = (char)p[4];
        buf_consume(&r->out, 4 + len);
    }
    s[n] = '\0';
    return s;
}

static void connect_helo(struct rig *r)
{
    SEND(r, 'D', "Cv\0Postfix 3.7.11\0");
    SEND(r, 'C', "host\0004\x01\x02" "192.0.2.1\0");
    SEND(r, 'H', "client\0");
}

/*
 * Replays every capture. The recorded filter answered HEADER, EOH and BODY
 * (it asked for no NR bit): with held = 0 the offer is replayed without
 * NR_HDR/NR_EOH/NR_BODY, so that we answer every event too and the
 * replies of the all-continue captures must be the recorded bytes; with
 * held = 1 the offer is replayed as sent, and they are the recorded ones
 * but for the replies to HEADER, EOH and BODY, which go away.
 */
static void test_replay(const char *dir, int held)
{
    char **names = NULL;
    int n = fx_list(dir, &names), compared = 0;
    for (int i = 0; i < n; i++) {
        struct fixture fx;
        if (fx_load(names[i], &fx) < 0)
            continue;
        struct rig r;
        rig_init(&r, ALL);
        int closed = 0, bad = 0;
        uint8_t last = 0; /* the last MTA command */
        struct buf want;
        buf_init(&want, 0);
        int all_c = strstr(fx.name, "basic-") == fx.name;
        for (size_t k = 0; k < fx.n && !closed; k++) {
            struct fx_packet *p = &fx.p[k];
            if (p->conn != 1 || !p->cmd)
                continue;
            if (p->dir == '<') {
                if (p->cmd != 'O' &&
                    !(held && last && strchr("LNB", last)))
                    buf_append(&want, p->wire, p->wire_len);
                continue;
            }
            if (p->cmd != 'D')
                last = p->cmd;
            uint8_t opt[12];
            struct wire_frame f = {p->cmd, p->data, p->len};
            if (p->cmd == 'O' && p->len == 12 && !held) {
                uint32_t nr = SESS_NR_HELD;
                memcpy(opt, p->data, 12);
                for (int b = 0; b < 4; b++)
                    opt[8 + b] &= (uint8_t) ~(nr >> (24 - 8 * b));
                f.data = opt;
            }
            struct wire_cmd c;
            const char *err;
            if (wire_decode(&f, &c, &err) < 0) {
                bad = 1;
                break;
            }
            size_t mark = buf_len(&r.out);
            int rc = sess_handle(&r.s, &c, &r.out);
            if (p->cmd == 'O') /* compare what follows negotiation */
                buf_reset(&r.out), (void)mark;
            if (rc == SESS_CLOSE)
                closed = p->cmd == 'Q' ? 2 : 1;
        }
        CHECK(!bad && closed != 1, "%s: replay ended by a protocol error",
              fx.name);
        if (all_c) {
            CHECK_MEM(buf_head(&r.out), buf_len(&r.out), buf_head(&want),
                      buf_len(&want), "%s: replies differ from libmilter's%s",
                      fx.name, held ? " (held)" : "");
            compared++;
        }
        buf_free(&want);
        rig_free(&r);
        fx_free(&fx);
        free(names[i]);
    }
    free(names);
    CHECK(n >= 80 && compared >= 15, "replayed %d, compared %d", n, compared);
}

/* Negotiated bits for a handler set and an offer. */
static void neg(unsigned handlers, uint32_t v, uint32_t a, uint32_t p,
                uint32_t *rv, uint32_t *ra, uint32_t *rp)
{
    struct rig r;
    rig_init(&r, handlers);
    optneg(&r, v, a, p);
    const uint8_t *o = buf_head(&r.out);
    CHECK(buf_len(&r.out) >= 17 && o[4] == 'O', "OPTNEG reply of 12 bytes+");
    /* with an eom handler and SETSYMLIST offered: macro v asked at DATA */
    static const char sl[] = "\0\0\0\4i v";
    int lists = buf_len(&r.out) == 17 + sizeof sl && memcmp(o + 17, sl, sizeof sl) == 0;
    CHECK(buf_len(&r.out) == 17 || lists, "the DATA macro list: i v");
    uint32_t x[3];
    for (int i = 0; i < 3; i++)
        x[i] = (uint32_t)o[5 + 4 * i] << 24 | (uint32_t)o[6 + 4 * i] << 16 |
               (uint32_t)o[7 + 4 * i] << 8 | o[8 + 4 * i];
    *rv = x[0];
    *ra = x[1];
    *rp = x[2];
    rig_free(&r);
}

static void test_negotiation(void)
{
    uint32_t v, a, p;
    /* Postfix / Sendmail offer, eom only: envelope and headers reply-free,
     * no DATA, EOH, BODY or UNKNOWN at all. */
    neg(SE_BIT(SE_EOM), 6, 0x1ff, 0x1fffff, &v, &a, &p);
    CHECK(v == 6 && a == 0x1ff, "v=%u a=0x%x (SETSYMLIST for macro v)", v, a);
    CHECK(p == (SMFIP_NODATA | SMFIP_NOEOH | SMFIP_NOBODY | SMFIP_NOUNKNOWN |
                SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL |
                SMFIP_NR_RCPT | SMFIP_NR_HDR),
          "eom only: p=0x%x", p);
    /* Everything handled: nothing suppressed; HEADER, EOH and BODY
     * reply-free (their verdict is kept), so no SKIP either. */
    neg(ALL, 6, 0x1ff, 0x1fffff, &v, &a, &p);
    CHECK(p == SESS_NR_HELD && a == 0x1ff, "all: p=0x%x a=0x%x", p, a);
    /* Without the content NR bits: every event answered, SKIP for BODY. */
    neg(ALL, 6, 0x1ff, OFFER_REPLY, &v, &a, &p);
    CHECK(p == SMFIP_SKIP, "all, no NR offered: p=0x%x", p);
    /* Only NR_HDR (Postfix's no_header_reply on an old protocol): header
     * reply-free, EOH and BODY answered, SKIP kept. */
    neg(ALL, 6, 0x1ff, 0x7f | SMFIP_NR_HDR | SMFIP_SKIP, &v, &a, &p);
    CHECK(p == (SMFIP_NR_HDR | SMFIP_SKIP), "NR_HDR only: p=0x%x", p);
    /* A bare offer: nothing asked. */
    neg(ALL, 6, 0x1ff, 0, &v, &a, &p);
    CHECK(p == 0, "bare offer: p=0x%x", p);
    /* Connect only: no message events, no actions. */
    neg(SE_BIT(SE_CONNECT), 6, 0x1ff, 0x1fffff, &v, &a, &p);
    CHECK(a == 0, "no eom, no actions: 0x%x", a);
    CHECK(p == (SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NODATA | SMFIP_NOHDRS |
                SMFIP_NOEOH | SMFIP_NOBODY | SMFIP_NOUNKNOWN | SMFIP_NR_HELO),
          "connect only: p=0x%x", p);
    /* Stalwart: only NOHELO|NOEOH offered, actions without SETSYMLIST. */
    neg(SE_BIT(SE_EOM) | SE_BIT(SE_BODY), 6, 0xff, 0x42, &v, &a, &p);
    CHECK(v == 6 && a == 0xff && (p & ~0x42u) == 0 && p == SMFIP_NOEOH,
          "stalwart: v=%u a=0x%x p=0x%x", v, a, p);
    neg(ALL, 2, 0xff, 0x42, &v, &a, &p);
    CHECK(v == 2 && p == 0, "stalwart v2: v=%u p=0x%x", v, p);
    /* Postfix milter_protocol=2: only the v2 NO* bits exist. */
    neg(SE_BIT(SE_EOM), 2, 0x1ff, 0x7f, &v, &a, &p);
    CHECK(v == 2 && (p & ~0x7fu) == 0 && (p & SMFIP_NOBODY),
          "postfix v2: v=%u p=0x%x", v, p);
    /* Newer MTA: we answer 6. Actions never exceed the offer. */
    neg(ALL, 7, 0x3, 0x1fffff, &v, &a, &p);
    CHECK(v == 6 && a == 0x3, "v7 offer: v=%u a=0x%x", v, a);
    /* Version 1 is refused. */
    struct rig r;
    rig_init(&r, ALL);
    uint8_t b[12] = {0, 0, 0, 1, 0, 0, 0, 0xf, 0, 0, 0, 0x3f};
    CHECK(send(&r, 'O', b, 12) == SESS_CLOSE, "version 1 refused");
    rig_free(&r);
}

static void test_states(void)
{
    struct rig r;
    rig_init(&r, ALL);
    CHECK(SEND(&r, 'C', "h\0U") == SESS_CLOSE, "CONNECT before OPTNEG");
    rig_free(&r);

    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    replies(&r);
    CHECK(SEND(&r, 'H', "x\0") == SESS_OK && r.s.family == 0 &&
              r.f.events[0] == SE_HELO,
          "HELO without CONNECT is served, with no client");
    rig_free(&r);

    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    replies(&r);
    connect_helo(&r);
    SEND(&r, 'A', "");
    SEND(&r, 'A', ""); /* Postfix's ABORTs with no message: no abort event */
    SEND(&r, 'M', "<a@x>\0");
    SEND(&r, 'R', "<b@x>\0");
    SEND(&r, 'A', ""); /* RSET: abort */
    SEND(&r, 'A', "");
    SEND(&r, 'M', "<a@x>\0");
    SEND(&r, 'H', "again\0"); /* EHLO mid-transaction: abort first */
    SEND(&r, 'M', "<a@x>\0");
    SEND(&r, 'M', "<c@x>\0"); /* MAIL while open: abort first */
    int want[] = {SE_CONNECT, SE_HELO, SE_ENVFROM, SE_ENVRCPT, SE_ABORT,
                  SE_ENVFROM, SE_ABORT, SE_HELO, SE_ENVFROM, SE_ABORT,
                  SE_ENVFROM};
    CHECK(r.f.nevents == 11 && memcmp(r.f.events, want, sizeof want) == 0,
          "abort events: %d events", r.f.nevents);
    const char *rs = replies(&r);
    CHECK(strcmp(rs, "cccccccc") == 0, "one reply per event: %s", rs);
    CHECK(SEND(&r, 'L', "a\0b\0") == SESS_OK, "header after MAIL");
    CHECK(SEND(&r, 'B', "body") == SESS_OK, "body");
    CHECK(SEND(&r, 'L', "late\0x\0") == SESS_CLOSE, "header after body");
    rig_free(&r);

    /* Reject at RCPT is per recipient; reject at MAIL ends the message and
     * later events of it get the same answer. */
    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, OFFER_REPLY);
    connect_helo(&r);
    SEND(&r, 'M', "<a@x>\0");
    SEND(&r, 'R', "<ok@x>\0");
    r.f.reply[SE_ENVRCPT].action = VA_REJECT;
    SEND(&r, 'R', "<bad@x>\0");
    CHECK(r.s.nrcpts == 1, "rejected recipient dropped: %u", r.s.nrcpts);
    r.f.reply[SE_ENVRCPT].action = VA_CONTINUE;
    replies(&r);
    r.f.reply[SE_DATA].action = VA_TEMPFAIL;
    SEND(&r, 'T', "");
    r.f.nevents = 0;
    SEND(&r, 'L', "a\0b\0");
    SEND(&r, 'E', "");
    CHECK(r.f.nevents == 0, "no handler after the message ended");
    CHECK(strcmp(replies(&r), "ttt") == 0, "ended message repeats tempfail");
    r.f.reply[SE_DATA].action = VA_CONTINUE;
    SEND(&r, 'M', "<next@x>\0");
    CHECK(strcmp(replies(&r), "c") == 0 && r.s.nrcpts == 0 && r.s.msg == MSG_OPEN,
          "next message is fresh");
    rig_free(&r);

    /* Connection-level reject: every later command gets it. */
    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    replies(&r);
    r.f.reply[SE_CONNECT].action = VA_REJECT;
    SEND(&r, 'C', "h\0U");
    SEND(&r, 'H', "x\0");
    SEND(&r, 'M', "<a@x>\0");
    CHECK(strcmp(replies(&r), "rrr") == 0 && r.f.nevents == 1,
          "connect reject repeated");
    rig_free(&r);

    /* QUIT_NC: close, then a new CONNECT on the same session. */
    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    connect_helo(&r);
    uint32_t seq = r.s.conn_seq;
    CHECK(SEND(&r, 'K', "") == SESS_OK, "QUIT_NC keeps the socket");
    CHECK(r.f.events[r.f.nevents - 1] == SE_CLOSE && r.s.conn_seq == seq + 1,
          "close ran once for the first session");
    CHECK(sess_macro(&r.s, "v", 1, NULL) == NULL, "macros reset");
    CHECK(SEND(&r, 'C', "h2\0U") == SESS_OK, "second CONNECT");
    CHECK(SEND(&r, 'Q', "") == SESS_CLOSE, "QUIT");
    int closes = 0;
    for (int i = 0; i < r.f.nevents; i++)
        closes += r.f.events[i] == SE_CLOSE;
    sess_finish(&r.s); /* the socket closes after QUIT: no second close */
    int closes2 = 0;
    for (int i = 0; i < r.f.nevents; i++)
        closes2 += r.f.events[i] == SE_CLOSE;
    CHECK(closes == 2 && closes2 == 2, "close once per session: %d %d",
          closes, closes2);
    rig_free(&r);

    /* Handler failure: the on_error verdict with a generic text. */
    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    connect_helo(&r);
    replies(&r);
    r.f.fail[SE_ENVFROM] = 1;
    SEND(&r, 'M', "<a@x>\0");
    const uint8_t *o = buf_head(&r.out);
    CHECK(buf_len(&r.out) > 5 && o[4] == 'y' &&
              memcmp(o + 5, "451 4.3.0 ", 10) == 0,
          "on_error tempfail with a generic reply");
    rig_free(&r);
}

static void test_noreply_and_body(void)
{
    /* eom only: MAIL/RCPT/HEADER are reply-free, EOM is answered. */
    struct rig r;
    rig_init(&r, SE_BIT(SE_EOM));
    optneg(&r, 6, 0x1ff, 0x1fffff);
    replies(&r);
    connect_helo(&r);
    SEND(&r, 'M', "<a@x>\0");
    SEND(&r, 'R', "<b@x>\0");
    SEND(&r, 'L', "Subject\0hi\0");
    SEND(&r, 'E', "");
    CHECK(strcmp(replies(&r), "c") == 0, "only EOM answered");
    CHECK(r.s.nhdrs == 1 && r.s.nrcpts == 1 && r.s.has_sender,
          "envelope and headers recorded for eom");
    rig_free(&r);

    /* Body limit: the chunk crossing it is cut, then SKIP. */
    rig_init(&r, ALL);
    r.cfg.max_body = 10;
    optneg(&r, 6, 0x1ff, OFFER_REPLY);
    connect_helo(&r);
    SEND(&r, 'M', "<a@x>\0");
    replies(&r);
    SEND(&r, 'B', "12345678");
    CHECK(!r.s.truncated, "under the limit");
    SEND(&r, 'B', "abcdef");
    CHECK(r.f.body_seen == 10 && r.s.truncated, "cut at the limit: %zu",
          r.f.body_seen);
    SEND(&r, 'B', "more");
    CHECK(r.f.body_seen == 10, "no more body calls");
    CHECK(strcmp(replies(&r), "css") == 0, "skip once truncated");
    rig_free(&r);

    /* skip without SMFIP_SKIP offered: continue, and no more body calls. */
    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, OFFER_REPLY & ~SMFIP_SKIP);
    connect_helo(&r);
    SEND(&r, 'M', "<a@x>\0");
    replies(&r);
    r.f.reply[SE_BODY].action = VA_SKIP;
    SEND(&r, 'B', "one");
    SEND(&r, 'B', "two");
    CHECK(strcmp(replies(&r), "cc") == 0 && r.f.body_seen == 3,
          "unnegotiated skip");
    rig_free(&r);
}

static void test_macros(void)
{
    struct rig r;
    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    SEND(&r, 'D', "C{auth_authen}\0bob\0j\0mx\0");
    size_t n;
    const char *v = sess_macro(&r.s, "auth_authen", 11, &n);
    CHECK(v && n == 3 && memcmp(v, "bob", 3) == 0, "bare name finds {x}");
    v = sess_macro(&r.s, "{j}", 3, &n);
    CHECK(v && n == 2, "braced name finds j");
    /* A changing queue id must not grow the arena without bound. */
    char pkt[64];
    for (int i = 0; i < 20000; i++) {
        int len = snprintf(pkt, sizeof pkt, "Li%c%08d%c", 0, i, 0);
        send(&r, 'D', pkt, (size_t)len);
    }
    v = sess_qid(&r.s);
    CHECK(v && strcmp(v, "00019999") == 0, "last value wins");
    CHECK(r.s.carena.size < 64 * 1024, "arena bounded: %zu", r.s.carena.size);
    rig_free(&r);
}

/* The packets mods_put() writes for a verdict, as "i0:A m2:X-Dup ...". */
static const char *plan(struct rig *r, const struct mod *m, size_t n)
{
    static char s[512];
    struct verdict v = {0};
    v.mods = m;
    v.nmods = n;
    buf_reset(&r->out);
    mods_put(&r->s, &v, &r->out);
    size_t o = 0;
    while (buf_len(&r->out) >= 5) {
        const uint8_t *p = buf_head(&r->out);
        uint32_t len = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
                       (uint32_t)p[2] << 8 | p[3];
        if (p[4] == 'i' || p[4] == 'm')
            o += (size_t)snprintf(s + o, sizeof s - o, "%c%u:%s ", p[4],
                                  (unsigned)p[8], (const char *)p + 9);
        else
            o += (size_t)snprintf(s + o, sizeof s - o, "%c:%s ", p[4],
                                  (const char *)p + 5);
        buf_consume(&r->out, 4 + len);
    }
    if (o)
        s[o - 1] = '\0';
    else
        s[0] = '\0';
    return s;
}

#define HM(op, idx, name, val)                                             \
    {                                                                      \
        (op), (idx), {(name), sizeof(name) - 1}, { (val), sizeof(val) - 1 } \
    }

static void test_header_indexes(const char *mta)
{
    struct rig r;
    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    char mac[64];
    int ml = snprintf(mac, sizeof mac, "Cv%c%s%c", 0, mta, 0);
    send(&r, 'D', mac, (size_t)ml);
    SEND(&r, 'C', "h\0U");
    SEND(&r, 'M', "<a@x>\0");
    SEND(&r, 'L', "Subject\0s\0");
    SEND(&r, 'L', "X-Dup\0one\0");
    SEND(&r, 'L', "X-Dup\0two\0");
    SEND(&r, 'L', "To\0t\0");
    int pf = strncmp(mta, "Postfix", 7) == 0;

    struct mod ins[] = {HM(MOD_INSERT_HEADER, 0, "A", "1"),
                        HM(MOD_INSERT_HEADER, 2, "B", "2"),
                        HM(MOD_INSERT_HEADER, 9, "C", "3")};
    const char *got = plan(&r, ins, 3);
    /* Postfix: A above Received; "after X-Dup#1" is [A, Rcvd, S, X-Dup]
     * -> index 4; past the end appends (index = list length). */
    /* Sendmail: its .cf's slots make "after X-Dup#1" unknowable: the
     * headers after it are deleted (the slots stay) and appended again,
     * with INSHEADER past the end (ADDHEADER lands before a same name). */
    const char *want = pf ? "i0:A i4:B i7:C"
                          : "i0:A m2:X-Dup m1:To i255:B i255:X-Dup i255:To "
                            "i255:C";
    CHECK(strcmp(got, want) == 0, "%s inserts: %s (want %s)", mta, got, want);

    struct mod chg[] = {HM(MOD_ADD_HEADER, 0, "X-Dup", "new"),
                        HM(MOD_CHANGE_HEADER, 2, "x-dup", "TWO"),
                        HM(MOD_DELETE_HEADER, 1, "X-Dup", ""),
                        HM(MOD_DELETE_HEADER, 2, "X-DUP", ""),
                        HM(MOD_CHANGE_HEADER, 1, "X-None", "v"),
                        HM(MOD_DELETE_HEADER, 1, "X-Gone", "")};
    got = plan(&r, chg, 6);
    /* change #2 -> 2; delete #1 -> 1; the old #2 is now first -> 1; a
     * missing header is appended by the MTA (index 1), a missing delete is
     * not sent at all. */
    want = pf ? "h:X-Dup m2:x-dup m1:X-Dup m1:X-DUP m1:X-None"
              : "m1:X-Dup m2:X-Dup i255:X-Dup i255:X-None";
    CHECK(strcmp(got, want) == 0, "%s changes: %s (want %s)", mta, got, want);

    struct mod mix[] = {HM(MOD_INSERT_HEADER, 0, "X-Dup", "top"),
                        HM(MOD_CHANGE_HEADER, 1, "X-Dup", "first")};
    got = plan(&r, mix, 2);
    want = "i0:X-Dup m2:X-Dup"; /* the inserted one now comes first */
    CHECK(strcmp(got, want) == 0, "%s insert+change: %s", mta, got);
    rig_free(&r);
}

/* ---- hardening, round 2 ------------------------------------------------ */

/* The first reply frame in out, as text after the command byte. */
static const char *first_reply(struct rig *r, char *cmd)
{
    static char s[4096];
    const uint8_t *p = buf_head(&r->out);
    size_t n = buf_len(&r->out);
    *cmd = 0;
    s[0] = '\0';
    if (n < 5)
        return s;
    uint32_t len = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
                   (uint32_t)p[2] << 8 | p[3];
    *cmd = (char)p[4];
    size_t t = len > 1 ? len - 1 : 0;
    if (t >= sizeof s)
        t = sizeof s - 1;
    memcpy(s, p + 5, t);
    s[t] = '\0';
    return s;
}

static void open_message(struct rig *r)
{
    optneg(r, 6, 0x1ff, 0x1fffff);
    connect_helo(r);
    SEND(r, 'M', "<a@x>\0");
    buf_reset(&r->out);
}

/* A reply always carries an enhanced code, so a text starting with a
 * digit cannot be taken for one (Postfix then disables the milter). */
static void test_reply_xcode(void)
{
    struct rig r;
    char cmd;
    rig_init(&r, ALL);
    open_message(&r);
    static const struct wire_str twofa = {"2FA required", 12};
    r.f.reply[SE_ENVRCPT].action = VA_REJECT;
    r.f.reply[SE_ENVRCPT].lines[0] = twofa;
    r.f.reply[SE_ENVRCPT].nlines = 1;
    SEND(&r, 'R', "<b@x>\0");
    const char *t = first_reply(&r, &cmd);
    CHECK(cmd == 'y' && strcmp(t, "550 5.7.1 2FA required") == 0,
          "reject text gets 5.7.1: %c '%s'", cmd, t);
    buf_reset(&r.out);
    static const struct wire_str two[2] = {{"first", 5}, {"2nd line", 8}};
    r.f.reply[SE_ENVRCPT].action = VA_TEMPFAIL;
    r.f.reply[SE_ENVRCPT].lines[0] = two[0];
    r.f.reply[SE_ENVRCPT].lines[1] = two[1];
    r.f.reply[SE_ENVRCPT].nlines = 2;
    SEND(&r, 'R', "<c@x>\0");
    t = first_reply(&r, &cmd);
    CHECK(strcmp(t, "451-4.7.1 first\r\n451 4.7.1 2nd line") == 0,
          "every line gets 4.7.1: '%s'", t);
    buf_reset(&r.out);
    r.f.reply[SE_ENVRCPT].code = 421;
    r.f.reply[SE_ENVRCPT].nlines = 0;
    SEND(&r, 'R', "<d@x>\0");
    t = first_reply(&r, &cmd);
    CHECK(strncmp(t, "421 4.7.1 ", 10) == 0, "code only: '%s'", t);
    buf_reset(&r.out);
    r.f.reply[SE_ENVRCPT].code = 0;
    SEND(&r, 'R', "<e@x>\0");
    CHECK(strcmp(replies(&r), "t") == 0, "no fields: the MTA's own text");
    rig_free(&r);
}

/* --on-error accept at envrcpt lets that recipient through only. */
static void test_on_error_stages(void)
{
    struct rig r;
    rig_init(&r, ALL);
    r.cfg.on_error = VA_ACCEPT;
    open_message(&r);
    r.f.fail[SE_ENVRCPT] = 1;
    SEND(&r, 'R', "<b@x>\0");
    CHECK(strcmp(replies(&r), "c") == 0 && r.s.msg == MSG_OPEN &&
              r.s.nrcpts == 1,
          "envrcpt failure with accept: that recipient continues");
    r.f.fail[SE_ENVRCPT] = 0;
    r.f.nevents = 0;
    SEND(&r, 'L', "Subject\0s\0");
    SEND(&r, 'E', "");
    CHECK(r.f.nevents == 2 && r.f.events[1] == SE_EOM,
          "the message goes on being filtered: %d events", r.f.nevents);
    replies(&r);
    r.f.fail[SE_ENVFROM] = 1;
    SEND(&r, 'M', "<a2@x>\0");
    CHECK(strcmp(replies(&r), "a") == 0, "envfrom failure: message accepted");
    rig_free(&r);

    rig_init(&r, ALL);
    r.cfg.on_error = VA_REJECT;
    open_message(&r);
    r.f.fail[SE_ENVRCPT] = 1;
    SEND(&r, 'R', "<b@x>\0");
    char cmd;
    const char *t = first_reply(&r, &cmd);
    CHECK(strncmp(t, "550 5.7.1 ", 10) == 0 && r.s.nrcpts == 0 &&
              r.s.msg == MSG_OPEN,
          "envrcpt failure with reject: that recipient refused: '%s'", t);
    rig_free(&r);
}

/* A verdict whose packets cannot all be encoded sends none of them: the
 * on-error reply goes instead. */
static void test_verdict_all_or_nothing(void)
{
    struct rig r;
    rig_init(&r, ALL);
    open_message(&r);
    buf_free(&r.out);
    buf_init(&r.out, 2000); /* room for two headers, not three */
    static char big[700];
    memset(big, 'v', sizeof big);
    struct mod m[3];
    for (int i = 0; i < 3; i++)
        m[i] = (struct mod){MOD_ADD_HEADER, 0, {"X-Big", 5},
                            {big, sizeof big}};
    r.f.reply[SE_EOM].action = VA_ACCEPT;
    r.f.reply[SE_EOM].mods = m;
    r.f.reply[SE_EOM].nmods = 3;
    CHECK(SEND(&r, 'E', "") == SESS_OK, "the session goes on");
    char cmd;
    const char *t = first_reply(&r, &cmd);
    CHECK(cmd == 'y' && strncmp(t, "451 4.3.0 ", 10) == 0,
          "on-error reply instead of a partial verdict: %c '%s'", cmd, t);
    CHECK(strcmp(replies(&r), "y") == 0, "and nothing else");
    rig_free(&r);
}

static int count_ev(const struct fake *f, int ev)
{
    int n = 0;
    for (int i = 0; i < f->nevents; i++)
        n += f->events[i] == ev;
    return n;
}

/* Every way a protocol error ends a session runs abort (open message)
 * and close, once. */
static void test_proto_error_finishes(void)
{
    static const struct {
        const char *what;
        uint8_t cmd;
        const char *payload;
        size_t len;
        int open;
    } cases[] = {
        {"second OPTNEG", 'O', "\0\0\0\6\0\0\0\0\0\0\0\0", 12, 1},
        {"CONNECT mid-session", 'C', "h\0U", 3, 1},
        {"out of order", 'T', "", 0, 2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct rig r;
        rig_init(&r, ALL);
        open_message(&r);
        if (cases[i].open == 2) { /* DATA after the body is out of order */
            SEND(&r, 'B', "x");
        }
        r.f.nevents = 0;
        CHECK(send(&r, cases[i].cmd, cases[i].payload, cases[i].len) ==
                  SESS_CLOSE,
              "%s closes", cases[i].what);
        sess_finish(&r.s); /* the connection going away after it */
        CHECK(count_ev(&r.f, SE_ABORT) == 1 && count_ev(&r.f, SE_CLOSE) == 1,
              "%s: abort %d close %d", cases[i].what,
              count_ev(&r.f, SE_ABORT), count_ev(&r.f, SE_CLOSE));
        rig_free(&r);
    }
    /* too many headers, too many macros */
    struct rig r;
    rig_init(&r, ALL);
    r.cfg.max_headers = 2;
    open_message(&r);
    SEND(&r, 'L', "A\0a\0");
    SEND(&r, 'L', "B\0b\0");
    CHECK(SEND(&r, 'L', "C\0c\0") == SESS_CLOSE, "max headers");
    sess_finish(&r.s);
    CHECK(count_ev(&r.f, SE_ABORT) == 1 && count_ev(&r.f, SE_CLOSE) == 1,
          "max headers: abort and close once");
    rig_free(&r);
    rig_init(&r, ALL);
    r.cfg.max_macros = 1;
    optneg(&r, 6, 0x1ff, 0x1fffff);
    connect_helo(&r);
    CHECK(SEND(&r, 'D', "Ma\0\x31\0b\0\x32\0") == SESS_CLOSE, "max macros");
    sess_finish(&r.s);
    CHECK(count_ev(&r.f, SE_ABORT) == 0 && count_ev(&r.f, SE_CLOSE) == 1,
          "max macros: close once, no message to abort");
    rig_free(&r);
}

/* QUIT_NC: the next session starts with nothing of the old one. */
static void test_quit_nc_fresh(void)
{
    struct rig r;
    rig_init(&r, ALL);
    open_message(&r);
    SEND(&r, 'R', "<b@x>\0");
    SEND(&r, 'L', "Subject\0old\0");
    uint32_t seq = r.s.msg_seq;
    SEND(&r, 'K', "");
    SEND(&r, 'C', "h2\0U");
    CHECK(!r.s.has_sender && r.s.nrcpts == 0 && r.s.nhdrs == 0 &&
              r.s.msg == MSG_NONE && r.s.msg_seq != seq,
          "no sender, recipients or headers after QUIT_NC: %d %u %u",
          r.s.has_sender, r.s.nrcpts, r.s.nhdrs);
    rig_free(&r);
}

/* A stage's next packet replaces its macros (as libmilter keeps them);
 * a name is looked up in the stage sent last first. */
static void test_macro_stages(void)
{
    struct rig r;
    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    size_t n;
    SEND(&r, 'D', "Cj\0one\0{k}\0kept\0");
    SEND(&r, 'D', "Hj\0two\0");
    const char *v = sess_macro(&r.s, "j", 1, &n);
    CHECK(v && n == 3 && strcmp(v, "two") == 0, "the later stage's value");
    SEND(&r, 'D', "Cj\0three\0");
    v = sess_macro(&r.s, "{j}", 3, &n);
    CHECK(v && n == 5 && strcmp(v, "three") == 0, "a stage sent again comes first");
    CHECK(sess_macro(&r.s, "k", 1, NULL) == NULL,
          "its next packet replaced the stage's macros");
    SEND(&r, 'D', "H");
    CHECK(sess_macro(&r.s, "j", 1, &n) && n == 5, "an empty packet: no macros");
    /* 16 stages are kept; more are ignored, never a failure */
    char pkt[8];
    for (int i = 0; i < 40; i++) {
        int len = snprintf(pkt, sizeof pkt, "%cx%c%c", 'a' + i % 26, 0, 'a' + i % 26);
        CHECK(send(&r, 'D', pkt, (size_t)len + 1) == SESS_OK, "stage %d taken", i);
    }
    CHECK(sess_macro(&r.s, "x", 1, NULL) != NULL, "some stage has x");
    rig_free(&r);
}

/* Message-stage macros are cleared when the next message starts;
 * connect- and helo-stage macros stay. */
static void test_message_macros(void)
{
    struct rig r;
    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    SEND(&r, 'D', "Cj\0mx.example\0");
    SEND(&r, 'C', "h\0U");
    SEND(&r, 'D', "H{tls_version}\0TLSv1.3\0");
    SEND(&r, 'H', "client\0");
    SEND(&r, 'D', "M{mail_addr}\0a@x\0");
    SEND(&r, 'M', "<a@x>\0");
    SEND(&r, 'D', "Ri\0Q1\0");
    SEND(&r, 'R', "<b@x>\0");
    SEND(&r, 'E', "");
    CHECK(sess_qid(&r.s) && strcmp(sess_qid(&r.s), "Q1") == 0,
          "message 1's queue id");
    SEND(&r, 'A', "");
    CHECK(sess_qid(&r.s) != NULL, "kept until the next message starts");
    SEND(&r, 'D', "M{mail_addr}\0c@x\0");
    CHECK(sess_qid(&r.s) == NULL, "gone at message 2's MAIL macros");
    SEND(&r, 'M', "<c@x>\0");
    CHECK(sess_qid(&r.s) == NULL, "not in message 2's envfrom");
    CHECK(sess_macro(&r.s, "j", 1, NULL) &&
              sess_macro(&r.s, "tls_version", 11, NULL),
          "connect and helo macros stay");
    size_t n;
    const char *a = sess_macro(&r.s, "mail_addr", 9, &n);
    CHECK(a && n == 3 && memcmp(a, "c@x", 3) == 0, "message 2's own macros");
    SEND(&r, 'D', "Ri\0Q2\0");
    CHECK(strcmp(sess_qid(&r.s), "Q2") == 0, "message 2's queue id");
    SEND(&r, 'E', "");
    /* an MTA that skips MAIL: the first message-stage macros start anew */
    SEND(&r, 'D', "Ri\0Q3\0");
    SEND(&r, 'R', "<d@x>\0");
    CHECK(strcmp(sess_qid(&r.s), "Q3") == 0 &&
              !sess_macro(&r.s, "mail_addr", 9, NULL),
          "new message without MAIL: its macros only");
    rig_free(&r);
}

/* Bytes per message and per connection are bounded. */
static void test_data_limits(void)
{
    struct rig r;
    rig_init(&r, ALL);
    r.cfg.max_msg_bytes = 64 << 10;
    sess_free(&r.s); /* the arenas take their caps at init */
    sess_init(&r.s, &r.cfg, &fake_ops, &r.f, 1);
    open_message(&r);
    static char rcpt[3002];
    memset(rcpt, 'r', 3000);
    rcpt[3000] = '\0';
    int rc = SESS_OK, sent = 0;
    while (rc == SESS_OK && sent < 1000) {
        rc = send(&r, 'R', rcpt, 3001);
        sent++;
    }
    CHECK(rc == SESS_CLOSE && sent > 15 && sent < 25,
          "message bytes bounded: closed after %d recipients", sent);
    CHECK(count_ev(&r.f, SE_CLOSE) == 1, "close ran");
    rig_free(&r);

    rig_init(&r, ALL);
    r.cfg.max_conn_bytes = 64 << 10;
    sess_free(&r.s);
    sess_init(&r.s, &r.cfg, &fake_ops, &r.f, 1);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    /* each stage keeps its last packet: stages of 4 KB values add up */
    static char mac[4100];
    static const char stages[] = "CHMRTLNEBU";
    rc = SESS_OK;
    sent = 0;
    while (rc == SESS_OK && stages[sent]) {
        int n = snprintf(mac, sizeof mac, "%cm%02d", stages[sent], sent);
        memset(mac + n + 1, 'v', 4000);
        mac[n + 1 + 4000] = '\0';
        rc = send(&r, 'D', mac, (size_t)n + 4002);
        sent++;
    }
    CHECK(rc == SESS_OK, "ten stages of 4 KB fit in 64 KiB");
    /* and one packet over the whole budget closes the connection */
    static char big[20 * 4010];
    size_t len = 1;
    big[0] = 'C';
    for (int i = 0; i < 20; i++) {
        len += (size_t)snprintf(big + len, 8, "b%02d", i) + 1;
        memset(big + len, 'v', 4000);
        len += 4000;
        big[len++] = '\0';
    }
    CHECK(send(&r, 'D', big, len) == SESS_CLOSE,
          "connection bytes bounded: an 80 KB macro packet closes");
    rig_free(&r);
}

/*
 * The header planner against the model it replaced: a list edited in
 * place, one modification at a time (quadratic, but obviously right).
 */
struct oentry {
    const char *name;
    size_t nlen;
    uint32_t orig;
    int hidden;
};

static int oracle_same(const struct oentry *e, struct wire_str n)
{
    return !e->hidden && e->nlen == n.n && strncasecmp(e->name, n.p, n.n) == 0;
}

static void oracle(const struct sess *s, const struct mod *m, size_t nm,
                   struct buf *out)
{
    struct oentry *e = malloc((1 + s->nhdrs + nm) * sizeof *e);
    uint32_t n = 0;
    if (s->mta == MTA_POSTFIX)
        e[n++] = (struct oentry){"Received", 8, 0, 1};
    for (uint32_t i = 0; i < s->nhdrs; i++)
        e[n++] = (struct oentry){sess_cstr(s, s->hdrs[i].name, 1),
                                 s->hdrs[i].name.len, i + 1, 0};
    for (size_t i = 0; i < nm; i++) {
        const struct mod *d = &m[i];
        struct oentry add = {d->a.p, d->a.n, 0, 0};
        if (d->op == MOD_ADD_HEADER) {
            wire_put_strs(out, WIRE_R_ADDHEADER, &d->a, 2);
            e[n++] = add;
        } else if (d->op == MOD_INSERT_HEADER) {
            uint32_t pos = n;
            if (d->index == 0)
                pos = 0;
            else
                for (uint32_t k = 0; k < n; k++)
                    if (e[k].orig == d->index) {
                        pos = k + 1;
                        break;
                    }
            wire_put_idx_header(out, WIRE_R_INSHEADER, pos, d->a, d->b);
            memmove(&e[pos + 1], &e[pos], (n - pos) * sizeof *e);
            e[pos] = add;
            n++;
        } else {
            uint32_t orig = 0, seen = 0, count = 0;
            long at = -1;
            for (uint32_t k = 0; k < s->nhdrs && !orig; k++)
                if (s->hdrs[k].name.len == d->a.n &&
                    strncasecmp(sess_cstr(s, s->hdrs[k].name, 1), d->a.p,
                                d->a.n) == 0 &&
                    ++seen == d->index)
                    orig = k + 1;
            uint32_t idx = 0;
            for (uint32_t k = 0; k < n; k++) {
                if (orig && e[k].orig == orig) {
                    at = k;
                    idx = count + 1;
                    break;
                }
                count += oracle_same(&e[k], d->a);
            }
            if (at < 0)
                idx = count + 1;
            int del = d->op == MOD_DELETE_HEADER || d->b.n == 0;
            if (at < 0 && del)
                continue;
            wire_put_idx_header(out, WIRE_R_CHGHEADER, idx, d->a,
                                del ? (struct wire_str){"", 0} : d->b);
            if (at < 0)
                e[n++] = add;
            else if (del) {
                memmove(&e[at], &e[at + 1], (n - (uint32_t)at - 1) * sizeof *e);
                n--;
            }
        }
    }
    free(e);
}

static uint32_t rnd_state = 12345;
static uint32_t rnd(uint32_t n)
{
    rnd_state = rnd_state * 1103515245u + 12345u;
    return (rnd_state >> 8) % n;
}

static void test_planner_property(void)
{
    static const struct wire_str names[] = {
        {"A", 1}, {"a", 1}, {"B", 1}, {"X-Dup", 5}, {"x-dup", 5},
        {"Subject", 7}, {"Received", 8}};
    const uint32_t nnames = sizeof names / sizeof names[0];
    int same = 0, runs = 3000;
    for (int run = 0; run < runs; run++) {
        struct rig r;
        rig_init(&r, ALL);
        optneg(&r, 6, 0x1ff, 0x1fffff);
        /* Postfix only: Sendmail's plans are checked against its model
         * in test_hplan.c */
        SEND(&r, 'D', "Cv\0Postfix 3.7.11\0");
        SEND(&r, 'C', "h\0U");
        SEND(&r, 'M', "<a@x>\0");
        uint32_t nh = rnd(12);
        for (uint32_t i = 0; i < nh; i++) {
            char h[32];
            const struct wire_str *nm = &names[rnd(nnames)];
            int len = snprintf(h, sizeof h, "%s%c%s", nm->p, 0,
                               rnd(3) ? "v" : "");
            send(&r, 'L', h, (size_t)len + 1);
        }
        struct mod m[40];
        size_t nmods = rnd(40), k = 0;
        size_t nfirst = nmods ? rnd((uint32_t)nmods + 1) : 0;
        for (; k < nmods; k++) {
            const struct wire_str *nm = &names[rnd(nnames)];
            struct wire_str val = rnd(4) ? (struct wire_str){"x", 1}
                                         : (struct wire_str){"", 0};
            int op = k < nfirst ? (rnd(2) ? MOD_ADD_HEADER : MOD_INSERT_HEADER)
                                : (rnd(2) ? MOD_CHANGE_HEADER
                                          : MOD_DELETE_HEADER);
            uint32_t idx = op == MOD_INSERT_HEADER ? rnd(nh + 3) : 1 + rnd(4);
            m[k] = (struct mod){(uint8_t)op, idx, *nm, val};
        }
        struct verdict v = {0};
        v.mods = m;
        v.nmods = nmods;
        struct buf want;
        buf_init(&want, 0);
        oracle(&r.s, m, nmods, &want);
        buf_reset(&r.out);
        int rc = mods_put(&r.s, &v, &r.out);
        int ok = rc == 0 && buf_len(&want) == buf_len(&r.out) &&
                 memcmp(buf_head(&want), buf_head(&r.out), buf_len(&want)) == 0;
        if (!ok && same == run)
            fprintf(stderr, "planner differs on run %d (%u headers, %zu mods)\n",
                    run, nh, nmods);
        same += ok;
        buf_free(&want);
        rig_free(&r);
    }
    CHECK(same == runs, "planner matches the model: %d of %d", same, runs);

    /* 150,000 inserts and changes: planned at once (it was quadratic) */
    struct rig r;
    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    connect_helo(&r);
    SEND(&r, 'M', "<a@x>\0");
    SEND(&r, 'L', "Subject\0s\0");
    SEND(&r, 'L', "X-Dup\0one\0");
    size_t big = 150000;
    struct mod *bm = malloc(big * sizeof *bm);
    for (size_t i = 0; i < big; i++)
        bm[i] = (struct mod){i < big - 2 ? MOD_INSERT_HEADER
                                         : MOD_CHANGE_HEADER,
                             i < big - 2 ? (uint32_t)(i % 3) : 1,
                             {"X-Dup", 5}, {"v", 1}};
    struct verdict v = {0};
    v.mods = bm;
    v.nmods = big;
    buf_reset(&r.out);
    CHECK(mods_put(&r.s, &v, &r.out) == 0, "150,000 modifications planned");
    /* inserts after X-Dup (index 2) are below it; those after Subject
     * (index 1) or at the top (0) are above it */
    const uint8_t *p = buf_head(&r.out) + buf_len(&r.out);
    size_t last = 5 + 4 + 6 + 2; /* the last CHGHEADER packet */
    const uint8_t *q = p - last;
    uint32_t idx = (uint32_t)q[5] << 24 | (uint32_t)q[6] << 16 |
                   (uint32_t)q[7] << 8 | q[8];
    uint32_t above = 0;
    for (size_t i = 0; i < big - 2; i++)
        above += i % 3 != 2;
    CHECK(q[4] == 'm' && idx == above + 1,
          "change of the original X-Dup lands at %u", idx);
    free(bm);
    rig_free(&r);
}

/* Handlers that wait on a lookup: the session takes no command until
 * sess_resume, and the reply is the same as without the wait. */
static void test_waiting_handlers(void)
{
    struct rig r;
    rig_init(&r, ALL);
    open_message(&r);
    r.f.defer[SE_ENVRCPT] = 1;
    CHECK(SEND(&r, 'R', "<b@x>\0") == SESS_WAIT && sess_waiting(&r.s) &&
              buf_len(&r.out) == 0,
          "envrcpt waits, nothing sent yet");
    struct verdict v;
    verdict_clear(&v);
    v.action = VA_REJECT;
    CHECK(sess_resume(&r.s, 0, &v, &r.out) == SESS_OK && !sess_waiting(&r.s),
          "resumed");
    CHECK(strcmp(replies(&r), "r") == 0 && r.s.nrcpts == 0,
          "the recipient's reply after the wait, and it is dropped");
    r.f.defer[SE_ENVRCPT] = 0;

    /* a failed handler after its wait gets the on-error verdict */
    r.f.defer[SE_EOM] = 1;
    CHECK(SEND(&r, 'E', "") == SESS_WAIT, "eom waits");
    verdict_clear(&v);
    sess_resume(&r.s, -1, &v, &r.out);
    char cmd;
    const char *t = first_reply(&r, &cmd);
    CHECK(cmd == 'y' && strncmp(t, "451 4.3.0", 9) == 0, "on-error: '%s'", t);
    rig_free(&r);

    /* MAIL mid-message: abort waits, then MAIL is handled again */
    rig_init(&r, ALL);
    open_message(&r);
    r.f.defer[SE_ABORT] = 1;
    r.f.nevents = 0;
    CHECK(SEND(&r, 'M', "<a2@x>\0") == SESS_RETRY, "abort waits: retry MAIL");
    verdict_clear(&v);
    sess_resume(&r.s, 0, &v, &r.out);
    CHECK(SEND(&r, 'M', "<a2@x>\0") == SESS_OK && r.f.nevents == 2 &&
              r.f.events[0] == SE_ABORT && r.f.events[1] == SE_ENVFROM &&
              strcmp(replies(&r), "c") == 0,
          "then envfrom runs once: %d events", r.f.nevents);
    r.f.defer[SE_ABORT] = 0;

    /* QUIT: close waits, the connection ends after it */
    r.f.defer[SE_CLOSE] = 1;
    CHECK(SEND(&r, 'Q', "") == SESS_WAIT && count_ev(&r.f, SE_ABORT) == 2,
          "abort of the open message, then close waits");
    verdict_clear(&v);
    CHECK(sess_resume(&r.s, 0, &v, &r.out) == SESS_CLOSE, "QUIT ends it");
    CHECK(count_ev(&r.f, SE_CLOSE) == 1 && sess_finish(&r.s) == 0 &&
              count_ev(&r.f, SE_CLOSE) == 1,
          "close ran once");
    rig_free(&r);

    /* the connection drops while abort waits: finish goes on after it */
    rig_init(&r, ALL);
    open_message(&r);
    r.f.defer[SE_ABORT] = 1;
    CHECK(sess_finish(&r.s) == SESS_WAIT, "abort waits");
    CHECK(sess_finish(&r.s) == SESS_WAIT, "still waiting: nothing new runs");
    verdict_clear(&v);
    sess_resume(&r.s, 0, &v, &r.out);
    CHECK(sess_finish(&r.s) == 0 && count_ev(&r.f, SE_CLOSE) == 1,
          "then close");
    rig_free(&r);

    /* the MTA aborts mid-wait: abandoned, no reply, abort runs */
    rig_init(&r, ALL);
    open_message(&r);
    r.f.defer[SE_EOM] = 1;
    CHECK(SEND(&r, 'E', "") == SESS_WAIT, "eom waits");
    sess_abandon(&r.s);
    r.f.defer[SE_EOM] = 0;
    CHECK(SEND(&r, 'A', "") == SESS_OK && count_ev(&r.f, SE_ABORT) == 1 &&
              buf_len(&r.out) == 0,
          "abandoned: no reply; abort runs");
    rig_free(&r);
}

/* ---- held verdicts (SMFIP_NR_HDR/NR_EOH/NR_BODY) ------------------------ */

/* Opens a message with a recipient and DATA under the given offer. */
static void held_open(struct rig *r, uint32_t offer)
{
    optneg(r, 6, 0x1ff, offer);
    connect_helo(r);
    SEND(r, 'M', "<a@x>\0");
    SEND(r, 'R', "<b@x>\0");
    SEND(r, 'T', "");
    buf_reset(&r->out);
    r->f.nevents = 0;
}

/* The rest of a message as Postfix pipelines it, headers to EOM. */
static void held_rest(struct rig *r)
{
    SEND(r, 'D', "Li\0QID1\0");
    SEND(r, 'L', "Subject\0s\0");
    SEND(r, 'D', "Li\0QID1\0");
    SEND(r, 'L', "To\0t\0");
    SEND(r, 'D', "Ni\0QID1\0");
    SEND(r, 'N', "");
    SEND(r, 'D', "Bi\0QID1\0");
    SEND(r, 'B', "one\r\n");
    SEND(r, 'B', "two\r\n");
    SEND(r, 'D', "Ei\0QID1\0");
    SEND(r, 'E', "");
}

/*
 * Every message-ending verdict at header, eoh and body under Postfix's
 * offer: no reply until EOM, EOM gets the verdict's bytes, no later
 * handler runs, and the ABORT after the message is a no-op.
 */
static void test_held_verdicts(void)
{
    static const int stages[] = {SE_HEADER, SE_EOH, SE_BODY};
    static const struct {
        int action, code;
        const char *want; /* the reply commands at EOM */
    } vs[] = {{VA_REJECT, 0, "r"}, {VA_TEMPFAIL, 0, "t"},
              {VA_REJECT, 554, "y"}, {VA_TEMPFAIL, 452, "y"},
              {VA_DISCARD, 0, "d"}, {VA_ACCEPT, 0, "a"}};
    for (size_t si = 0; si < 3; si++) {
        for (size_t vi = 0; vi < sizeof vs / sizeof vs[0]; vi++) {
            int st = stages[si];
            struct rig r;
            rig_init(&r, ALL);
            held_open(&r, 0x1fffff);
            r.f.reply[st].action = vs[vi].action;
            r.f.reply[st].code = vs[vi].code;
            held_rest(&r);
            const char *name = sess_event_names[st];
            CHECK(strcmp(replies(&r), vs[vi].want) == 0,
                  "%s %d/%d: only EOM answered, with the kept verdict",
                  name, vs[vi].action, vs[vi].code);
            CHECK(r.f.nevents >= 1 && r.f.events[r.f.nevents - 1] == st &&
                      count_ev(&r.f, st) == 1 && count_ev(&r.f, SE_EOM) == 0,
                  "%s %d: no handler after the deciding one (%d events)",
                  name, vs[vi].action, r.f.nevents);
            SEND(&r, 'A', "");
            SEND(&r, 'A', "");
            CHECK(count_ev(&r.f, SE_ABORT) == 0 && r.s.msg == MSG_NONE,
                  "%s: the ABORTs after the message run no abort", name);
            /* the next message is filtered again, from scratch */
            r.f.reply[st].action = VA_CONTINUE;
            r.f.reply[st].code = 0;
            r.f.nevents = 0;
            SEND(&r, 'M', "<a2@x>\0");
            SEND(&r, 'R', "<b@x>\0");
            held_rest(&r);
            CHECK(strcmp(replies(&r), "ccc") == 0 && r.s.kept == 0 &&
                      count_ev(&r.f, SE_EOM) == 1 &&
                      count_ev(&r.f, SE_HEADER) == 2,
                  "%s: next message runs every handler: %d events", name,
                  r.f.nevents);
            rig_free(&r);
        }
    }

    /* The text of a kept reply is encoded when decided: the verdict's
     * strings belong to the handler (the Lua state) only until it returns. */
    struct rig r;
    rig_init(&r, ALL);
    held_open(&r, 0x1fffff);
    char text[] = "no thanks";
    r.f.reply[SE_HEADER].action = VA_REJECT;
    r.f.reply[SE_HEADER].lines[0] = (struct wire_str){text, 9};
    r.f.reply[SE_HEADER].nlines = 1;
    SEND(&r, 'L', "Subject\0s\0");
    memcpy(text, "XXXXXXXXX", 9);
    SEND(&r, 'E', "");
    char cmd;
    const char *t = first_reply(&r, &cmd);
    CHECK(cmd == 'y' && strcmp(t, "550 5.7.1 no thanks") == 0,
          "kept text: %c '%s'", cmd, t);
    rig_free(&r);
}

/* Where the MTA waits before EOM, the kept verdict goes there. */
static void test_held_next_reply(void)
{
    /* NR_HDR only (no NR_EOH/NR_BODY): a header reject is given at EOH,
     * and any later event of the ended message gets it again. */
    struct rig r;
    rig_init(&r, ALL);
    held_open(&r, 0x1fffff & ~(SMFIP_NR_EOH | SMFIP_NR_BODY));
    r.f.reply[SE_HEADER].action = VA_REJECT;
    SEND(&r, 'L', "Subject\0s\0");
    SEND(&r, 'L', "To\0t\0");
    CHECK(buf_len(&r.out) == 0, "headers: no reply");
    SEND(&r, 'N', "");
    CHECK(strcmp(replies(&r), "r") == 0, "EOH gets the kept reject");
    SEND(&r, 'B', "x");
    SEND(&r, 'E', "");
    CHECK(strcmp(replies(&r), "rr") == 0 && r.f.nevents == 1,
          "then every reply-due event, no handler");
    rig_free(&r);

    /* Stalwart (0x42) and a bare offer: nothing kept, the reply per event
     * as ever. */
    static const uint32_t offers[] = {0x42, 0};
    for (int i = 0; i < 2; i++) {
        rig_init(&r, ALL);
        held_open(&r, offers[i]);
        r.f.reply[SE_HEADER].action = VA_REJECT;
        SEND(&r, 'L', "Subject\0s\0");
        CHECK(strcmp(replies(&r), "r") == 0 && r.s.kept == 0,
              "offer 0x%x: the header is answered with its verdict",
              offers[i]);
        SEND(&r, 'L', "To\0t\0");
        SEND(&r, 'E', "");
        CHECK(strcmp(replies(&r), "rr") == 0 && r.f.nevents == 1,
              "offer 0x%x: ended message as before", offers[i]);
        rig_free(&r);
    }
}

/* skip and max_body in a reply-free body: nothing sent, no more calls. */
static void test_held_skip(void)
{
    struct rig r;
    rig_init(&r, ALL);
    held_open(&r, 0x1fffff);
    r.f.reply[SE_BODY].action = VA_SKIP;
    SEND(&r, 'L', "Subject\0s\0");
    SEND(&r, 'N', "");
    SEND(&r, 'B', "one");
    SEND(&r, 'B', "two");
    SEND(&r, 'B', "three");
    CHECK(buf_len(&r.out) == 0 && r.f.body_seen == 3 && r.s.skip_body,
          "skip: no reply, no second body call (%zu bytes seen)",
          r.f.body_seen);
    SEND(&r, 'E', "");
    CHECK(strcmp(replies(&r), "c") == 0 && count_ev(&r.f, SE_EOM) == 1,
          "eom runs after a kept skip");
    rig_free(&r);

    rig_init(&r, ALL);
    r.cfg.max_body = 4;
    held_open(&r, 0x1fffff);
    SEND(&r, 'B', "123");
    SEND(&r, 'B', "456");
    SEND(&r, 'B', "789");
    SEND(&r, 'E', "");
    CHECK(strcmp(replies(&r), "c") == 0 && r.f.body_seen == 4 &&
              r.s.truncated && count_ev(&r.f, SE_BODY) == 2,
          "max_body: cut, no SKIP sent, eom answered");
    rig_free(&r);
}

/* A handler that fails in a reply-free stage: the --on-error verdict is
 * kept like any other (continue lets the message go on). */
static void test_held_on_error(void)
{
    static const struct {
        int on_error;
        const char *want;
        int eom_runs;
    } cs[] = {{VA_TEMPFAIL, "y", 0}, {VA_REJECT, "y", 0},
              {VA_ACCEPT, "a", 0}, {VA_CONTINUE, "c", 1}};
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        struct rig r;
        rig_init(&r, ALL);
        r.cfg.on_error = cs[i].on_error;
        held_open(&r, 0x1fffff);
        r.f.fail[SE_HEADER] = 1;
        held_rest(&r);
        char cmd;
        const char *t = first_reply(&r, &cmd);
        CHECK(cmd == cs[i].want[0] &&
                  (cmd != 'y' || strncmp(t, cs[i].on_error == VA_REJECT
                                                ? "550 5.7.1"
                                                : "451 4.3.0",
                                         9) == 0) &&
                  count_ev(&r.f, SE_EOM) == cs[i].eom_runs,
              "on-error %d: EOM gets '%c' (%s), eom ran %d", cs[i].on_error,
              cmd, t, count_ev(&r.f, SE_EOM));
        rig_free(&r);
    }
}

/* ABORT, EHLO, QUIT and QUIT_NC between a kept verdict and EOM; a
 * reply-free handler that waits on a lookup. */
static void test_held_between(void)
{
    struct rig r;
    rig_init(&r, ALL);
    held_open(&r, 0x1fffff);
    r.f.reply[SE_HEADER].action = VA_REJECT;
    SEND(&r, 'L', "Subject\0s\0");
    SEND(&r, 'A', ""); /* the client went away mid-DATA */
    CHECK(count_ev(&r.f, SE_ABORT) == 0 && r.s.msg == MSG_NONE &&
              buf_len(&r.out) == 0,
          "ABORT drops the kept verdict, no abort handler (as after a "
          "reply)");
    r.f.reply[SE_HEADER].action = VA_CONTINUE;
    SEND(&r, 'M', "<a2@x>\0");
    SEND(&r, 'R', "<b@x>\0");
    held_rest(&r);
    CHECK(strcmp(replies(&r), "ccc") == 0 && r.s.kept == 0,
          "the next message is not touched by it");

    /* EHLO mid-message, then QUIT */
    r.f.reply[SE_EOH].action = VA_DISCARD;
    SEND(&r, 'M', "<a3@x>\0");
    SEND(&r, 'L', "Subject\0s\0");
    SEND(&r, 'N', "");
    r.f.nevents = 0;
    SEND(&r, 'H', "again\0");
    CHECK(r.f.nevents == 1 && r.f.events[0] == SE_HELO &&
              strcmp(replies(&r), "cc") == 0,
          "EHLO after a kept verdict: helo only, no abort");
    CHECK(SEND(&r, 'Q', "") == SESS_CLOSE && count_ev(&r.f, SE_CLOSE) == 1 &&
              count_ev(&r.f, SE_ABORT) == 0,
          "QUIT: close, no abort");
    rig_free(&r);

    /* QUIT_NC after a kept verdict: the next session starts clean */
    rig_init(&r, ALL);
    held_open(&r, 0x1fffff);
    r.f.reply[SE_BODY].action = VA_TEMPFAIL;
    SEND(&r, 'B', "x");
    SEND(&r, 'K', "");
    SEND(&r, 'C', "h2\0U");
    SEND(&r, 'M', "<a@x>\0");
    r.f.reply[SE_BODY].action = VA_CONTINUE;
    SEND(&r, 'B', "y");
    SEND(&r, 'E', "");
    CHECK(strcmp(replies(&r), "ccc") == 0, "after QUIT_NC: nothing kept");
    rig_free(&r);

    /* a reply-free header that waits: nothing sent when it resumes, the
     * verdict is kept, the frames behind it are read and dropped */
    rig_init(&r, ALL);
    held_open(&r, 0x1fffff);
    r.f.defer[SE_HEADER] = 1;
    CHECK(SEND(&r, 'L', "Subject\0s\0") == SESS_WAIT, "header waits");
    struct verdict v;
    verdict_clear(&v);
    v.action = VA_TEMPFAIL;
    CHECK(sess_resume(&r.s, 0, &v, &r.out) == SESS_OK && buf_len(&r.out) == 0,
          "resumed: no reply");
    r.f.defer[SE_HEADER] = 0;
    SEND(&r, 'L', "To\0t\0");
    SEND(&r, 'N', "");
    SEND(&r, 'B', "x");
    SEND(&r, 'E', "");
    CHECK(strcmp(replies(&r), "t") == 0 && r.f.nevents == 1,
          "EOM gets the tempfail decided after the wait");
    /* and one that fails after its wait gets the on-error verdict, kept */
    SEND(&r, 'M', "<a@x>\0");
    r.f.defer[SE_EOH] = 1;
    CHECK(SEND(&r, 'N', "") == SESS_WAIT, "eoh waits");
    verdict_clear(&v);
    sess_resume(&r.s, -1, &v, &r.out);
    replies(&r);
    SEND(&r, 'E', "");
    char cmd;
    const char *t = first_reply(&r, &cmd);
    CHECK(cmd == 'y' && strncmp(t, "451 4.3.0", 9) == 0,
          "on-error after a wait, kept: '%s'", t);
    rig_free(&r);
}

/* Held headers run in batches where the session has ops.headers: before
 * the next other command, at sess_flush, before a header the limits
 * would refuse; a stop ends the batch and drops the later headers. */
static void test_held_batches(void)
{
    struct rig r;
    rig_init(&r, ALL);
    sess_free(&r.s);
    sess_init(&r.s, &r.cfg, &batch_ops, &r.f, 1);
    nbatches = 0;
    batch_stop_at = -1;
    held_open(&r, 0x1fffff);
    SEND(&r, 'D', "Li\0QID1\0");
    SEND(&r, 'L', "Subject\0s\0");
    SEND(&r, 'D', "Li\0QID1\0"); /* the same macros: no batch yet */
    SEND(&r, 'L', "To\0t\0");
    CHECK(nbatches == 0 && r.s.nhdrs == 2 && r.s.hdrs_run == 0,
          "headers held: %d batches, %u recorded, %u run", nbatches,
          r.s.nhdrs, r.s.hdrs_run);
    SEND(&r, 'D', "Li\0QID2\0"); /* other macros: the batch runs first */
    CHECK(nbatches == 1 && batch_first[0] == 0 && batch_n[0] == 2 &&
              r.s.hdrs_run == 2,
          "a changed MACRO runs the held ones: %d batches", nbatches);
    SEND(&r, 'L', "X-A\0a\0");
    SEND(&r, 'L', "X-B\0b\0");
    CHECK(sess_flush(&r.s, &r.out) == SESS_OK && nbatches == 2 &&
              batch_first[1] == 2 && batch_n[1] == 2 && r.s.hdrs_run == 4,
          "sess_flush runs them: %d batches", nbatches);
    CHECK(sess_flush(&r.s, &r.out) == SESS_OK && nbatches == 2,
          "nothing held: no call");
    SEND(&r, 'N', "");
    SEND(&r, 'E', "");
    CHECK(strcmp(replies(&r), "c") == 0 && count_ev(&r.f, SE_HEADER) == 4,
          "EOM answered, every header handled once: %d",
          count_ev(&r.f, SE_HEADER));
    rig_free(&r);

    /* A stop at the second of four: the rest reach no handler, are not
     * kept, and the limit on headers cannot close the connection for
     * headers of an ended message (the batch runs before the refused one). */
    rig_init(&r, ALL);
    r.cfg.max_headers = 4;
    sess_free(&r.s);
    sess_init(&r.s, &r.cfg, &batch_ops, &r.f, 1);
    nbatches = 0;
    batch_stop_at = 1;
    batch_stop_action = VA_REJECT;
    held_open(&r, 0x1fffff);
    SEND(&r, 'L', "A\0a\0");
    SEND(&r, 'L', "B\0b\0");
    SEND(&r, 'L', "C\0c\0");
    SEND(&r, 'L', "D\0d\0");
    int rc = SEND(&r, 'L', "E\0e\0"); /* the fifth: over the limit */
    CHECK(rc == SESS_OK && nbatches == 1 && batch_n[0] == 4 &&
              batch_seen[0] == 2 && r.s.nhdrs == 2 && r.s.msg == MSG_ENDED,
          "stop at 2 of 4: rc %d, %d batches, %u kept, msg %d", rc, nbatches,
          r.s.nhdrs, r.s.msg);
    SEND(&r, 'E', "");
    CHECK(strcmp(replies(&r), "r") == 0 && count_ev(&r.f, SE_EOM) == 0,
          "the kept reject at EOM, no eom handler");
    rig_free(&r);
}

/* A MACRO frame that repeats the stored front stage byte for byte need
 * not be decoded; anything that would change the macros is no repeat. */
static void test_macro_repeats(void)
{
    struct rig r;
    rig_init(&r, ALL);
    optneg(&r, 6, 0x1ff, 0x1fffff);
    connect_helo(&r);
    static const uint8_t l1[] = "Li\0Q1\0", l2[] = "Li\0Q2\0",
                         m1[] = "Mi\0Q1\0";
    struct wire_frame f1 = {'D', l1, sizeof l1 - 1},
                      f2 = {'D', l2, sizeof l2 - 1},
                      fm = {'D', m1, sizeof m1 - 1},
                      hdr = {'L', (const uint8_t *)"A\0a\0", 4};
    CHECK(!sess_macro_repeats(&r.s, &f1), "nothing stored: no repeat");
    SEND(&r, 'M', "<a@x>\0");
    SEND(&r, 'D', "Li\0Q1\0");
    CHECK(sess_macro_repeats(&r.s, &f1), "the same L again: a repeat");
    CHECK(!sess_macro_repeats(&r.s, &f2), "another value: no repeat");
    CHECK(!sess_macro_repeats(&r.s, &hdr), "not a MACRO: no repeat");
    CHECK(!sess_macro_repeats(&r.s, &fm), "MAIL's macros clear: no repeat");
    SEND(&r, 'D', "Ri\0Q1\0"); /* R in front now */
    CHECK(!sess_macro_repeats(&r.s, &f1), "L no longer in front: no repeat");
    rig_free(&r);
}

int main(int argc, char **argv)
{
    char dir[1024];
    log_level = LL_ERR - 1; /* quiet: protocol errors are expected here */
    snprintf(dir, sizeof dir, "%s/postfix",
             argc > 1 ? argv[1] : "../shared/fixtures");
    test_replay(dir, 0);
    test_replay(dir, 1);
    test_negotiation();
    test_states();
    test_noreply_and_body();
    test_macros();
    test_header_indexes("Postfix 3.7.11");
    test_header_indexes("8.17.1");
    test_reply_xcode();
    test_on_error_stages();
    test_verdict_all_or_nothing();
    test_proto_error_finishes();
    test_quit_nc_fresh();
    test_message_macros();
    test_macro_stages();
    test_data_limits();
    test_planner_property();
    test_waiting_handlers();
    test_held_verdicts();
    test_held_next_reply();
    test_held_skip();
    test_held_on_error();
    test_held_between();
    test_held_batches();
    test_macro_repeats();
    return t_done("test_sess");
}
