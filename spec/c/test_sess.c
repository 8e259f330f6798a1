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

#include "fixture.h"
#include "log.h"
#include "mods.h"
#include "sess.h"
#include "t.h"

struct fake {
    int events[64];
    int nevents;
    struct verdict reply[SE__COUNT]; /* what each event answers */
    int fail[SE__COUNT];             /* handler "raises" */
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
    return f->fail[ev] ? -1 : 0;
}

static const struct sess_ops fake_ops = {fake_call};
static const unsigned ALL = (1u << SE__COUNT) - 1;

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
    uint8_t frame[4096];
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

static void test_replay(const char *dir)
{
    char **names;
    int n = fx_list(dir, &names), compared = 0;
    for (int i = 0; i < n; i++) {
        struct fixture fx;
        if (fx_load(names[i], &fx) < 0)
            continue;
        struct rig r;
        rig_init(&r, ALL);
        int closed = 0, bad = 0;
        struct buf want;
        buf_init(&want, 0);
        int all_c = strstr(fx.name, "basic-") == fx.name;
        for (size_t k = 0; k < fx.n && !closed; k++) {
            struct fx_packet *p = &fx.p[k];
            if (p->conn != 1 || !p->cmd)
                continue;
            if (p->dir == '<') {
                if (p->cmd != 'O')
                    buf_append(&want, p->wire, p->wire_len);
                continue;
            }
            struct wire_frame f = {p->cmd, p->data, p->len};
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
                      buf_len(&want), "%s: replies differ from libmilter's",
                      fx.name);
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
    CHECK(buf_len(&r.out) == 17 && o[4] == 'O', "OPTNEG reply of 12 bytes");
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
    CHECK(v == 6 && a == 0xff, "v=%u a=0x%x", v, a);
    CHECK(p == (SMFIP_NODATA | SMFIP_NOEOH | SMFIP_NOBODY | SMFIP_NOUNKNOWN |
                SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL |
                SMFIP_NR_RCPT | SMFIP_NR_HDR),
          "eom only: p=0x%x", p);
    /* Everything handled: nothing suppressed, SKIP for the body. */
    neg(ALL, 6, 0x1ff, 0x1fffff, &v, &a, &p);
    CHECK(p == SMFIP_SKIP && a == 0xff, "all: p=0x%x a=0x%x", p, a);
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
    optneg(&r, 6, 0x1ff, 0x1fffff);
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
    optneg(&r, 6, 0x1ff, 0x1fffff);
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
    optneg(&r, 6, 0x1ff, 0x1fffff & ~SMFIP_SKIP);
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
    const char *want = pf ? "i0:A i4:B i7:C" : "i0:A i3:B i6:C";
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
    want = "h:X-Dup m2:x-dup m1:X-Dup m1:X-DUP m1:X-None";
    CHECK(strcmp(got, want) == 0, "%s changes: %s (want %s)", mta, got, want);

    struct mod mix[] = {HM(MOD_INSERT_HEADER, 0, "X-Dup", "top"),
                        HM(MOD_CHANGE_HEADER, 1, "X-Dup", "first")};
    got = plan(&r, mix, 2);
    want = "i0:X-Dup m2:X-Dup"; /* the inserted one now comes first */
    CHECK(strcmp(got, want) == 0, "%s insert+change: %s", mta, got);
    rig_free(&r);
}

int main(int argc, char **argv)
{
    char dir[1024];
    log_level = LL_ERR - 1; /* quiet: protocol errors are expected here */
    snprintf(dir, sizeof dir, "%s/postfix",
             argc > 1 ? argv[1] : "../shared/fixtures");
    test_replay(dir);
    test_negotiation();
    test_states();
    test_noreply_and_body();
    test_macros();
    test_header_indexes("Postfix 3.7.11");
    test_header_indexes("8.17.1");
    return t_done("test_sess");
}
