/*
 * The header planners against each MTA's model (hmodel): random old and
 * new header lists (duplicates, names differing in case, empty and folded
 * values), planned by hplan for Postfix, Sendmail (with 1, 2 or 9 .cf
 * default headers above the message: the plan must not depend on it) and
 * Stalwart, applied by the model, must deliver exactly the new list below
 * the trace header; an unchanged list sends nothing. Then the index
 * modifications of the API (mods_put), translated per MTA, against a
 * plain oracle of what they mean.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hmodel.h"
#include "hplan.h"
#include "log.h"
#include "mods.h"
#include "mta.h"
#include "sess.h"
#include "t.h"

static uint64_t rng = 0x9e3779b97f4a7c15u;
static uint32_t rnd(uint32_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return n ? (uint32_t)(rng % n) : 0;
}

static const char *const NAMES[] = {"From", "To", "Subject", "X-Dup",
                                    "x-dup", "X-DUP", "Received", "Date",
                                    "Message-Id", "X-A"};
static const char *const VALUES[] = {"a", "b", "", "folded\n\tline",
                                     "two\n words\n\there", "c", " lead"};

static struct hp_hdr rnd_hdr(void)
{
    const char *n = NAMES[rnd(10)], *v = VALUES[rnd(7)];
    return (struct hp_hdr){{n, strlen(n)}, {v, strlen(v)}};
}

struct mta_case {
    int mta;
    unsigned slots;
    const char *label;
};
static const struct mta_case MTAS[] = {
    {MTA_POSTFIX, 0, "postfix"},   {MTA_SENDMAIL, 9, "sendmail/9"},
    {MTA_SENDMAIL, 2, "sendmail/2"}, {MTA_SENDMAIL, 1, "sendmail/1"},
    {MTA_STALWART, 0, "stalwart"}};
#define NMTAS (sizeof MTAS / sizeof MTAS[0])

static int hdr_is(const struct hm_entry *e, const struct hp_hdr *h)
{
    return strlen(e->name) == h->name.n &&
           memcmp(e->name, h->name.p, h->name.n) == 0 &&
           strlen(e->value) == h->value.n &&
           memcmp(e->value, h->value.p, h->value.n) == 0;
}

/* Applies out to a model holding o; the delivered list must be
 * [trace] + w. Returns 1 when it is. */
static int delivers(const struct mta_case *mc, const struct hp_hdr *o,
                    size_t n, const struct buf *out, const struct hp_hdr *w,
                    size_t m, const struct hp_hdr *tops, size_t ntop)
{
    struct hm h;
    hm_init(&h, mc->mta, mc->slots);
    for (size_t i = 0; i < n; i++)
        hm_add(&h, o[i].name.p, o[i].name.n, o[i].value.p, o[i].value.n);
    int ok = hm_apply_all(&h, buf_head(out), buf_len(out)) == 0;
    const struct hm_entry **d = malloc((h.n + 1) * sizeof *d);
    size_t nd, k = 0;
    hm_delivered(&h, d, &nd);
    for (size_t t = 0; ok && t < ntop; t++) /* above the trace, newest first */
        ok = k < nd && hdr_is(d[k], &tops[ntop - 1 - t]) && ++k;
    if (ok && mc->mta != MTA_STALWART) /* then the trace header */
        ok = k < nd && (d[k]->flags & HM_TRACE) && ++k;
    ok = ok && nd == k + m;
    for (size_t j = 0; ok && j < m; j++)
        ok = hdr_is(d[k + j], &w[j]);
    if (!ok) {
        fprintf(stderr, "%s: delivered:\n", mc->label);
        for (size_t j = 0; j < nd; j++)
            fprintf(stderr, "  %s: %s\n", d[j]->name, d[j]->value);
        fprintf(stderr, "wanted:\n");
        for (size_t j = 0; j < m; j++)
            fprintf(stderr, "  %.*s: %.*s\n", (int)w[j].name.n, w[j].name.p,
                    (int)w[j].value.n, w[j].value.p);
    }
    free(d);
    hm_free(&h);
    return ok;
}

/* A new list made from the old one by random edits. */
static size_t mutate(const struct hp_hdr *o, size_t n, struct hp_hdr *w)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (rnd(4))
            w[m++] = o[i];
    for (size_t e = rnd(5); e > 0; e--) {
        uint32_t what = rnd(5);
        if (what == 0 && m < 60) { /* insert somewhere */
            size_t at = rnd((uint32_t)m + 1);
            memmove(&w[at + 1], &w[at], (m - at) * sizeof *w);
            w[at] = rnd_hdr();
            m++;
        } else if (what == 1 && m) { /* change a value */
            w[rnd((uint32_t)m)].value = rnd_hdr().value;
        } else if (what == 2 && m) { /* change the name's case */
            struct hp_hdr *h = &w[rnd((uint32_t)m)];
            for (size_t k = 0; k < 10; k++)
                if (strcasecmp(NAMES[k], h->name.p) == 0 &&
                    strlen(NAMES[k]) == h->name.n && rnd(2))
                    h->name = (struct wire_str){NAMES[k], strlen(NAMES[k])};
        } else if (what == 3 && m > 1) { /* swap two */
            size_t a = rnd((uint32_t)m), b = rnd((uint32_t)m);
            struct hp_hdr t = w[a];
            w[a] = w[b];
            w[b] = t;
        } else if (what == 4 && m && m < 60) { /* duplicate one */
            w[m] = w[rnd((uint32_t)m)];
            m++;
        }
    }
    return m;
}

static void test_list_property(void)
{
    struct hp_hdr o[64], w[128];
    int bad = 0;
    for (int round = 0; round < 20000 && bad < 5; round++) {
        size_t n = rnd(12), m;
        for (size_t i = 0; i < n; i++)
            o[i] = rnd_hdr();
        m = round % 10 == 0 ? (memcpy(w, o, n * sizeof *o), n)
                            : mutate(o, n, w);
        if (round % 7 == 0) { /* unrelated lists too */
            m = rnd(12);
            for (size_t j = 0; j < m; j++)
                w[j] = rnd_hdr();
        }
        for (size_t k = 0; k < NMTAS; k++) {
            struct buf out;
            buf_init(&out, 0);
            int rc = hplan_put(MTAS[k].mta, NULL, 0, o, n, w, m, &out);
            int ok = rc == 0 && delivers(&MTAS[k], o, n, &out, w, m, NULL, 0);
            CHECK(ok, "round %d %s: n %zu m %zu", round, MTAS[k].label, n, m);
            int same = m == n;
            for (size_t j = 0; same && j < m; j++)
                same = o[j].name.n == w[j].name.n && o[j].value.n == w[j].value.n &&
                       !memcmp(o[j].name.p, w[j].name.p, o[j].name.n) &&
                       !memcmp(o[j].value.p, w[j].value.p, o[j].value.n);
            if (same)
                CHECK(buf_len(&out) == 0, "an equal list sends nothing (%s)",
                      MTAS[k].label);
            bad += !ok;
            buf_free(&out);
        }
    }
}

/* Counts packets of a plan. */
static int npackets(const struct buf *b)
{
    int n = 0;
    const uint8_t *p = buf_head(b);
    for (size_t off = 0; off + 4 <= buf_len(b); n++)
        off += 4 + ((uint32_t)p[off] << 24 | (uint32_t)p[off + 1] << 16 |
                    (uint32_t)p[off + 2] << 8 | p[off + 3]);
    return n;
}

static void test_list_cases(void)
{
    struct hp_hdr o[4] = {{{"From", 4}, {"a", 1}}, {{"To", 2}, {"b", 1}},
                          {{"Subject", 7}, {"s", 1}}, {{"X-Dup", 5}, {"d", 1}}};
    struct hp_hdr w[5];
    struct buf out;
    /* one insert in the middle: one INSHEADER on Postfix (after the
     * hidden Received: and From, To), the tail again on Sendmail */
    memcpy(w, o, 2 * sizeof *o);
    w[2] = (struct hp_hdr){{"X-Mid", 5}, {"m", 1}};
    memcpy(w + 3, o + 2, 2 * sizeof *o);
    buf_init(&out, 0);
    hplan_put(MTA_POSTFIX, NULL, 0, o, 4, w, 5, &out);
    CHECK(npackets(&out) == 1 && buf_head(&out)[4] == WIRE_R_INSHEADER &&
              buf_head(&out)[8] == 3,
          "postfix middle insert is INSHEADER 3");
    buf_reset(&out);
    hplan_put(MTA_SENDMAIL, NULL, 0, o, 4, w, 5, &out);
    CHECK(npackets(&out) == 5, "sendmail: 2 deletes, 3 appends (%d)",
          npackets(&out));
    /* a changed value is one CHGHEADER in place on both */
    memcpy(w, o, sizeof o);
    w[2].value = (struct wire_str){"new", 3};
    for (int k = 0; k < 2; k++) {
        buf_reset(&out);
        hplan_put(k ? MTA_SENDMAIL : MTA_POSTFIX, NULL, 0, o, 4, w, 4, &out);
        CHECK(npackets(&out) == 1 && buf_head(&out)[4] == WIRE_R_CHGHEADER,
              "a change is one CHGHEADER");
    }
    buf_free(&out);
}

/* Thousands of headers: the cheap pairing for big differing lists. */
static void test_list_big(void)
{
    size_t n = 3000;
    struct hp_hdr *o = malloc(n * sizeof *o), *w = malloc(2 * n * sizeof *w);
    char (*vals)[16] = malloc(n * sizeof *vals);
    for (size_t i = 0; i < n; i++) {
        snprintf(vals[i], sizeof vals[i], "v%zu", i);
        o[i] = (struct hp_hdr){{i % 2 ? "X-Odd" : "X-Even", i % 2 ? 5 : 6},
                               {vals[i], strlen(vals[i])}};
    }
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (i % 7 == 3)
            continue; /* deleted */
        if (i % 11 == 5)
            w[m++] = (struct hp_hdr){{"X-New", 5}, {"n", 1}};
        w[m++] = o[i];
        if (i % 13 == 0)
            w[m - 1].value = (struct wire_str){"changed", 7};
    }
    for (size_t k = 0; k < NMTAS; k++) {
        if (MTAS[k].mta == MTA_SENDMAIL && MTAS[k].slots != 9)
            continue;
        struct buf out;
        buf_init(&out, 0);
        int rc = hplan_put(MTAS[k].mta, NULL, 0, o, n, w, m, &out);
        CHECK(rc == 0 && delivers(&MTAS[k], o, n, &out, w, m, NULL, 0),
              "3000 headers (%s)", MTAS[k].label);
        buf_free(&out);
    }
    free(o);
    free(w);
    free(vals);
}

/* ---- index modifications (mods_put) against their meaning ---- */

struct ent {
    struct hp_hdr h;
    int orig; /* 1-based original, 0 added */
};

/*
 * What the API says index modifications do: inserts at 0 above the trace
 * header (newest first), at k right after original k, past the end and
 * adds appended; change/delete the nth original of a name still there
 * (an absent one changed is appended); Postfix writes the changer's
 * spelling of the name, the others keep the message's.
 */
static size_t oracle(int mta, const struct hp_hdr *o, size_t n,
                     const struct mod *mods, size_t nm, struct ent *l,
                     struct hp_hdr *tops, size_t *ntop)
{
    size_t len = 0;
    *ntop = 0;
    for (size_t i = 0; i < n; i++)
        l[len++] = (struct ent){o[i], (int)i + 1};
    for (size_t i = 0; i < nm; i++) {
        const struct mod *d = &mods[i];
        struct ent e = {{d->a, d->b}, 0};
        if (d->op == MOD_ADD_HEADER ||
            (d->op == MOD_INSERT_HEADER && d->index > n)) {
            l[len++] = e;
        } else if (d->op == MOD_INSERT_HEADER && d->index == 0) {
            tops[(*ntop)++] = e.h;
        } else if (d->op == MOD_INSERT_HEADER) {
            size_t at = 0;
            while (l[at].orig != (int)d->index)
                at++;
            memmove(&l[at + 2], &l[at + 1], (len - at - 1) * sizeof *l);
            l[at + 1] = e;
            len++;
        } else {
            uint32_t nth = d->index, seen = 0;
            long at = -1;
            for (size_t k = 0; k < n && at < 0; k++)
                if (o[k].name.n == d->a.n &&
                    strncasecmp(o[k].name.p, d->a.p, d->a.n) == 0 &&
                    ++seen == nth)
                    for (size_t x = 0; x < len; x++)
                        if (l[x].orig == (int)k + 1)
                            at = (long)x;
            int del = d->op == MOD_DELETE_HEADER || d->b.n == 0;
            if (at >= 0 && del) {
                memmove(&l[at], &l[at + 1], (len - (size_t)at - 1) * sizeof *l);
                len--;
            } else if (at >= 0) {
                l[at].h.value = d->b;
                if (mta == MTA_POSTFIX)
                    l[at].h.name = d->a;
            } else if (!del) {
                seen = 0;
                for (size_t k = 0; k < n; k++) /* deleted: gone for good */
                    seen += o[k].name.n == d->a.n &&
                            !strncasecmp(o[k].name.p, d->a.p, d->a.n);
                l[len++] = e;
            }
        }
    }
    return len;
}

static void test_index_mods(void)
{
    struct sess_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    int bad = 0;
    for (int round = 0; round < 6000 && bad < 5; round++) {
        size_t n = rnd(8), nm = 0;
        struct hp_hdr o[8];
        struct mod mods[16];
        for (size_t i = 0; i < n; i++)
            o[i] = rnd_hdr();
        /* lverdict's order: adds, inserts, changes, deletes */
        static const uint8_t order[] = {MOD_ADD_HEADER, MOD_INSERT_HEADER,
                                        MOD_CHANGE_HEADER, MOD_DELETE_HEADER};
        for (int k = 0; k < 4; k++)
            for (uint32_t c = rnd(3); c > 0; c--) {
                struct hp_hdr h = rnd_hdr();
                struct mod *d = &mods[nm++];
                memset(d, 0, sizeof *d);
                d->op = order[k];
                d->a = h.name;
                d->b = h.value;
                if (d->op == MOD_INSERT_HEADER)
                    d->index = rnd((uint32_t)n + 3);
                else if (d->op != MOD_ADD_HEADER)
                    d->index = 1 + rnd(3);
                if (d->op == MOD_DELETE_HEADER)
                    d->b = (struct wire_str){NULL, 0};
            }
        for (size_t k = 0; k < NMTAS; k++) {
            const struct mta_case *mc = &MTAS[k];
            if (mc->mta == MTA_SENDMAIL && mc->slots < 2)
                continue; /* INSHEADER 0 lands after the first .cf slot */
            cfg.mta = mc->mta;
            struct sess s;
            sess_init(&s, &cfg, NULL, NULL, 1);
            s.hdrs = malloc((n + 1) * sizeof *s.hdrs);
            for (size_t i = 0; i < n; i++) {
                s.hdrs[i].name = (struct sess_str){(uint32_t)buf_len(&s.marena),
                                                   (uint32_t)o[i].name.n};
                buf_append(&s.marena, o[i].name.p, o[i].name.n);
                buf_append_byte(&s.marena, 0);
                s.hdrs[i].value = (struct sess_str){
                    (uint32_t)buf_len(&s.marena), (uint32_t)o[i].value.n};
                buf_append(&s.marena, o[i].value.p, o[i].value.n);
                buf_append_byte(&s.marena, 0);
            }
            s.nhdrs = (uint32_t)n;
            struct verdict v;
            verdict_clear(&v);
            v.mods = mods;
            v.nmods = nm;
            struct buf out;
            buf_init(&out, 0);
            int rc = mods_put(&s, &v, &out);
            struct ent l[32];
            struct hp_hdr w[32], tops[16];
            size_t ntop, m = oracle(mc->mta, o, n, mods, nm, l, tops, &ntop);
            for (size_t j = 0; j < m; j++)
                w[j] = l[j].h;
            int ok = rc == 0 && delivers(mc, o, n, &out, w, m, tops, ntop);
            CHECK(ok, "index mods round %d (%s)", round, mc->label);
            if (!ok)
                for (size_t i = 0; i < nm; i++)
                    fprintf(stderr, "  mod op %d idx %u %.*s: %.*s\n",
                            mods[i].op, mods[i].index, (int)mods[i].a.n,
                            mods[i].a.p, (int)mods[i].b.n,
                            mods[i].b.p ? mods[i].b.p : "");
            bad += !ok;
            buf_free(&out);
            free(s.hdrs);
            s.hdrs = NULL;
            sess_free(&s);
        }
    }
}

int main(void)
{
    log_level = LL_WARN;
    test_list_cases();
    test_list_property();
    test_list_big();
    test_index_mods();
    return t_done("test_hplan");
}
