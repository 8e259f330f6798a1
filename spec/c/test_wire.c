/*
 * Codec tests against the Postfix captures in ../shared/fixtures:
 *  - every MTA packet decodes, and its decoded fields, printed the way the
 *    fixture annotator prints them, equal the recorded annotation;
 *  - the stream splits into the same frames fed whole and byte by byte;
 *  - for every recorded filter packet, our encoder given the same decision
 *    produces the identical bytes;
 *  - hostile frames are refused.
 */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "fixture.h"
#include "t.h"
#include "wire.h"

/* Appends s escaped like the fixture annotator (milterfmt.escape), quoted. */
static void q(struct buf *o, const char *s, size_t n)
{
    buf_append_byte(o, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char tmp[8];
        if (c == '\\' || c == '"') {
            tmp[0] = '\\';
            tmp[1] = (char)c;
            buf_append(o, tmp, 2);
        } else if (c == '\r' || c == '\n' || c == '\t') {
            tmp[0] = '\\';
            tmp[1] = c == '\r' ? 'r' : c == '\n' ? 'n' : 't';
            buf_append(o, tmp, 2);
        } else if (c >= 0x20 && c < 0x7f) {
            buf_append_byte(o, c);
        } else {
            snprintf(tmp, sizeof tmp, "\\x%02x", c);
            buf_append(o, tmp, 4);
        }
    }
    buf_append_byte(o, '"');
}

static void pr(struct buf *o, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void pr(struct buf *o, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    buf_append(o, tmp, (size_t)n);
}

static const char *smfif[] = {"ADDHDRS", "CHGBODY", "ADDRCPT", "DELRCPT",
                              "CHGHDRS", "QUARANTINE", "CHGFROM",
                              "ADDRCPT_PAR", "SETSYMLIST"};
static const char *smfip[32] = {
    "NOCONNECT", "NOHELO", "NOMAIL", "NORCPT", "NOBODY", "NOHDRS", "NOEOH",
    "NR_HDR", "NOUNKNOWN", "NODATA", "SKIP", "RCPT_REJ", "NR_CONN",
    "NR_HELO", "NR_MAIL", "NR_RCPT", "NR_DATA", "NR_UNKN", "NR_EOH",
    "NR_BODY", "HDR_LEADSPC", [28] = "MDS_256K", [29] = "MDS_1M"};

static void bits(struct buf *o, uint32_t v, const char **names, int nnames)
{
    int any = 0;
    for (int i = 0; i < 32; i++) {
        if (!(v & (1u << i)))
            continue;
        if (any++)
            buf_append_byte(o, '|');
        if (i < nnames && names[i])
            pr(o, "%s", names[i]);
        else
            pr(o, "bit%d", i);
    }
    if (!any)
        buf_append_byte(o, '0');
}

static void list(struct buf *o, const char *l, size_t len)
{
    size_t pos = 0;
    for (;;) {
        struct wire_str s = wire_list_next(l, len, &pos);
        if (!s.p)
            return;
        buf_append_byte(o, ' ');
        q(o, s.p, s.n);
    }
}

/* Describes a decoded command in the annotator's words. */
static void describe(struct buf *o, const struct wire_cmd *c)
{
    static const char *names[128] = {
        ['A'] = "SMFIC_ABORT", ['B'] = "SMFIC_BODY", ['C'] = "SMFIC_CONNECT",
        ['D'] = "SMFIC_MACRO", ['E'] = "SMFIC_BODYEOB", ['H'] = "SMFIC_HELO",
        ['K'] = "SMFIC_QUIT_NC", ['L'] = "SMFIC_HEADER", ['M'] = "SMFIC_MAIL",
        ['N'] = "SMFIC_EOH", ['O'] = "SMFIC_OPTNEG", ['Q'] = "SMFIC_QUIT",
        ['R'] = "SMFIC_RCPT", ['T'] = "SMFIC_DATA", ['U'] = "SMFIC_UNKNOWN"};
    pr(o, "%s", names[c->cmd & 0x7f]);
    switch (c->cmd) {
    case WIRE_OPTNEG:
        pr(o, " version=%u actions=0x%x(", c->version, c->actions);
        bits(o, c->actions, smfif, 9);
        pr(o, ") protocol=0x%x(", c->protocol);
        bits(o, c->protocol, smfip, 32);
        pr(o, ")");
        break;
    case WIRE_MACRO: {
        pr(o, " for '%c' ", c->macro_for);
        if (!c->list_count)
            pr(o, "(no macros)");
        size_t pos = 0;
        for (unsigned i = 0; i < c->list_count; i += 2) {
            struct wire_str k = wire_list_next(c->list, c->list_len, &pos);
            struct wire_str v = wire_list_next(c->list, c->list_len, &pos);
            if (i)
                buf_append_byte(o, ' ');
            buf_append(o, k.p, k.n);
            buf_append_byte(o, '=');
            q(o, v.p, v.n);
        }
        break;
    }
    case WIRE_CONNECT:
        pr(o, " hostname=");
        q(o, c->s1.p, c->s1.n);
        pr(o, " family='%c'", c->family);
        if (c->family != 'U') {
            pr(o, " port=%u address=", c->port);
            q(o, c->s2.p, c->s2.n);
        }
        break;
    case WIRE_HELO:
    case WIRE_UNKNOWN:
        buf_append_byte(o, ' ');
        q(o, c->s1.p, c->s1.n);
        break;
    case WIRE_MAIL:
    case WIRE_RCPT:
        buf_append_byte(o, ' ');
        q(o, c->s1.p, c->s1.n);
        list(o, c->list, c->list_len);
        break;
    case WIRE_HEADER:
        pr(o, " name=");
        q(o, c->s1.p, c->s1.n);
        pr(o, " value=");
        q(o, c->s2.p, c->s2.n);
        break;
    case WIRE_BODY: pr(o, " %zu bytes", c->body_len); break;
    default: break;
    }
}

static int decoded, described, encoded, split_checked;

static void check_decode(const struct fixture *fx)
{
    struct buf o;
    buf_init(&o, 0);
    for (size_t i = 0; i < fx->n; i++) {
        const struct fx_packet *p = &fx->p[i];
        if (p->dir != '>' || !p->cmd)
            continue;
        struct wire_frame f;
        struct wire_cmd c;
        size_t used;
        const char *err = NULL;
        int rc = wire_next_frame(p->wire, p->wire_len, 1u << 20, &f, &used,
                                 &err);
        CHECK(rc == WIRE_FRAME && used == p->wire_len, "%s packet %zu",
              fx->name, i);
        if (rc != WIRE_FRAME)
            continue;
        rc = wire_decode(&f, &c, &err);
        CHECK(rc == 0, "%s packet %zu '%c': %s", fx->name, i, p->cmd,
              err ? err : "");
        if (rc)
            continue;
        decoded++;
        if (!p->note)
            continue;
        buf_reset(&o);
        describe(&o, &c);
        buf_append_byte(&o, 0);
        CHECK(strcmp((char *)buf_head(&o), p->note) == 0,
              "%s packet %zu:\n  decoded:  %s\n  recorded: %s", fx->name, i,
              (char *)buf_head(&o), p->note);
        described++;
    }
    buf_free(&o);
}

/* Feeds one connection's MTA stream in pieces of `step` bytes. */
static void check_split(const struct fixture *fx, size_t step)
{
    struct buf in, all;
    buf_init(&in, 0);
    buf_init(&all, 0);
    size_t want = 0, got = 0;
    for (size_t i = 0; i < fx->n; i++)
        if (fx->p[i].dir == '>' && fx->p[i].cmd && fx->p[i].conn == 1) {
            buf_append(&all, fx->p[i].wire, fx->p[i].wire_len);
            want++;
        }
    size_t next = 0; /* index of the packet the next frame must equal */
    for (size_t off = 0; off < buf_len(&all); off += step) {
        size_t n = buf_len(&all) - off < step ? buf_len(&all) - off : step;
        buf_append(&in, buf_head(&all) + off, n);
        for (;;) {
            struct wire_frame f;
            size_t used;
            const char *err;
            int rc = wire_next_frame(buf_head(&in), buf_len(&in), 1u << 20,
                                     &f, &used, &err);
            if (rc != WIRE_FRAME) {
                CHECK(rc == WIRE_NEED_MORE, "%s split %zu", fx->name, step);
                break;
            }
            while (next < fx->n && !(fx->p[next].dir == '>' &&
                                     fx->p[next].cmd && fx->p[next].conn == 1))
                next++;
            CHECK(next < fx->n && f.cmd == fx->p[next].cmd &&
                      f.len == fx->p[next].len &&
                      memcmp(f.data, fx->p[next].data, f.len) == 0,
                  "%s split %zu: frame %zu differs", fx->name, step, got);
            next++;
            got++;
            buf_consume(&in, used);
        }
    }
    CHECK(got == want && buf_len(&in) == 0, "%s split %zu: %zu of %zu frames",
          fx->name, step, got, want);
    split_checked++;
    buf_free(&in);
    buf_free(&all);
}

/* Parses a REPLYCODE text into code, xcode and lines (undoing %%). */
static int parse_reply(const uint8_t *d, size_t n, int *code,
                       struct wire_str *xcode, struct wire_str *lines,
                       int *nlines, char *store)
{
    if (n == 0 || d[n - 1] != 0)
        return -1;
    const char *p = (const char *)d, *end = p + n - 1;
    char *w = store;
    *nlines = 0;
    *xcode = (struct wire_str){"", 0};
    while (p < end) {
        if (end - p < 4 || sscanf(p, "%3d", code) != 1 ||
            (p[3] != ' ' && p[3] != '-'))
            return -1;
        p += 4;
        const char *sp = memchr(p, ' ', (size_t)(end - p));
        if (sp && sp - p >= 5 && p[1] == '.' && p[0] >= '2' && p[0] <= '5') {
            *xcode = (struct wire_str){p, (size_t)(sp - p)};
            p = sp + 1;
        }
        const char *eol = strstr(p, "\r\n");
        const char *e = eol && eol < end ? eol : end;
        lines[*nlines].p = w;
        for (const char *s = p; s < e; s++) {
            if (*s == '%') {
                if (s + 1 >= e || s[1] != '%')
                    return -1; /* a lone %: not something we would send */
                s++;
            }
            *w++ = *s;
        }
        lines[*nlines].n = (size_t)(w - lines[*nlines].p);
        (*nlines)++;
        p = e == end ? end : e + 2;
    }
    return 0;
}

/* Re-encodes the recorded filter packets from their decoded decisions. */
static void check_encode(const struct fixture *fx)
{
    struct buf want, got;
    buf_init(&want, 0);
    buf_init(&got, 0);
    for (size_t i = 0; i < fx->n; i++) {
        const struct fx_packet *p = &fx->p[i];
        if (p->dir != '<' || !p->cmd)
            continue;
        buf_reset(&got);
        buf_reset(&want);
        buf_append(&want, p->wire, p->wire_len);
        const char *d = (const char *)p->data;
        struct wire_str s[3];
        int ok = 0;
        switch (p->cmd) {
        case WIRE_OPTNEG: {
            if (p->len < 12)
                break; /* neg-short-optneg: deliberately broken */
            const uint8_t *u = p->data;
            uint32_t v[3];
            for (int k = 0; k < 3; k++)
                v[k] = (uint32_t)u[4 * k] << 24 | (uint32_t)u[4 * k + 1] << 16 |
                       (uint32_t)u[4 * k + 2] << 8 | u[4 * k + 3];
            struct wire_symlist sl[8];
            int nsl = 0;
            size_t pos = 12;
            while (pos + 4 < p->len && nsl < 8) {
                sl[nsl].stage = (uint32_t)u[pos] << 24 |
                                (uint32_t)u[pos + 1] << 16 |
                                (uint32_t)u[pos + 2] << 8 | u[pos + 3];
                sl[nsl].names.p = d + pos + 4;
                sl[nsl].names.n = strlen(d + pos + 4);
                pos += 4 + sl[nsl++].names.n + 1;
            }
            ok = wire_put_optneg(&got, v[0], v[1], v[2], sl, nsl) == 0;
            break;
        }
        case 'c': case 'a': case 'r': case 't': case 'd': case 's':
        case 'p': case '4': case 'f':
            ok = wire_put(&got, p->cmd, NULL, 0) == 0 && p->len == 0;
            break;
        case 'h': case '2': case 'e': case '+': case '-': case 'q': {
            int n = 0;
            size_t pos = 0;
            while (n < 3 && pos < p->len) {
                s[n] = wire_list_next(d, p->len, &pos);
                n++;
            }
            ok = wire_put_strs(&got, p->cmd, s, n) == 0;
            break;
        }
        case 'i': case 'm': {
            uint32_t idx = (uint32_t)p->data[0] << 24 |
                           (uint32_t)p->data[1] << 16 |
                           (uint32_t)p->data[2] << 8 | p->data[3];
            size_t pos = 4;
            s[0] = wire_list_next(d, p->len, &pos);
            s[1] = wire_list_next(d, p->len, &pos);
            ok = wire_put_idx_header(&got, p->cmd, idx, s[0], s[1]) == 0;
            break;
        }
        case 'b': {
            /* the whole run of REPLBODY packets, encoded from the body */
            struct buf body;
            buf_init(&body, 0);
            buf_reset(&want);
            size_t j = i;
            for (; j < fx->n && fx->p[j].dir == '<' && fx->p[j].cmd == 'b'; j++) {
                buf_append(&body, fx->p[j].data, fx->p[j].len);
                buf_append(&want, fx->p[j].wire, fx->p[j].wire_len);
            }
            ok = wire_put_body(&got, buf_head(&body), buf_len(&body)) == 0;
            buf_free(&body);
            i = j - 1;
            break;
        }
        case 'y': {
            int code, nl;
            struct wire_str xcode, lines[WIRE_MAX_REPLY_LINES];
            char store[4096];
            if (p->len > sizeof store ||
                parse_reply(p->data, p->len, &code, &xcode, lines, &nl,
                            store) < 0)
                continue; /* lone '%' or invalid on purpose */
            ok = wire_put_replycode(&got, code, xcode, lines, nl) == 0;
            break;
        }
        default: break;
        }
        if (!ok)
            continue;
        CHECK_MEM(buf_head(&got), buf_len(&got), buf_head(&want),
                  buf_len(&want), "%s packet %zu '%c': encoding differs",
                  fx->name, i, p->cmd);
        encoded++;
    }
    buf_free(&want);
    buf_free(&got);
}

static void check_hostile(void)
{
    struct wire_frame f;
    struct wire_cmd c;
    size_t used;
    const char *err = NULL;
    static const uint8_t zero[] = {0, 0, 0, 0, 'A'};
    static const uint8_t huge[] = {0xff, 0xff, 0xff, 0xff, 'B'};
    static const uint8_t just_over[] = {0, 0x10, 0, 2, 'B'};
    CHECK(wire_next_frame(zero, 4, 1u << 20, &f, &used, &err) == WIRE_ERROR,
          "zero length is refused from the length alone");
    CHECK(wire_next_frame(huge, 5, 1u << 20, &f, &used, &err) == WIRE_ERROR,
          "2^32-1");
    CHECK(wire_next_frame(just_over, 5, 1u << 20, &f, &used, &err) ==
              WIRE_ERROR,
          "1 MiB + 1 payload over a 1 MiB limit");
    CHECK(wire_next_frame(huge, 3, 1u << 20, &f, &used, &err) ==
              WIRE_NEED_MORE,
          "three bytes are not a length yet");

    struct {
        const char *bytes;
        size_t len;
        const char *why;
    } bad[] = {
        {"\0\0\0\x05H\x61\x62\x63\x64", 9, "HELO without NUL"},
        {"\0\0\0\x01Z", 5, "unknown command"},
        {"\0\0\0\x09O\0\0\0\6\0\0\1\xff", 13, "short OPTNEG"},
        {"\0\0\0\x04L\x61\0b", 8, "HEADER value without NUL"},
        {"\0\0\0\x05" "C\x61\0" "4\0", 9, "CONNECT cut after the family"},
        {"\0\0\0\x06" "C\x61\0" "9\0\0", 10, "bad family"},
        {"\0\0\0\x05" "DCa\0b", 9, "MACRO value without NUL"},
        {"\0\0\0\x04" "DCa\0", 8, "MACRO name without value"},
        {"\0\0\0\x01" "D", 5, "MACRO without command byte"},
        {"\0\0\0\x01" "M", 5, "MAIL without sender"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = wire_next_frame((const uint8_t *)bad[i].bytes, bad[i].len,
                                 1u << 20, &f, &used, &err);
        CHECK(rc == WIRE_FRAME, "%s: frames", bad[i].why);
        if (rc == WIRE_FRAME)
            CHECK(wire_decode(&f, &c, &err) < 0, "%s: must not decode",
                  bad[i].why);
    }
    /* A 1 MiB payload is accepted. */
    size_t big = 1u << 20;
    uint8_t *p = calloc(1, big + 5);
    p[0] = 0;
    p[1] = 0x10;
    p[2] = 0;
    p[3] = 1;
    p[4] = 'B';
    CHECK(wire_next_frame(p, big + 5, 1u << 20, &f, &used, &err) ==
                  WIRE_FRAME &&
              f.len == big,
          "1 MiB BODY frame");
    free(p);
}

static void check_replycode(void)
{
    struct buf o;
    buf_init(&o, 0);
    struct wire_str lines[3] = {{"first 100%", 10}, {"second", 6},
                                {"third", 5}};
    wire_put_replycode(&o, 550, (struct wire_str){"5.7.1", 5}, lines, 3);
    static const char want[] = "550-5.7.1 first 100%%\r\n550-5.7.1 second\r\n"
                               "550 5.7.1 third";
    CHECK(buf_len(&o) == 5 + sizeof want && buf_head(&o)[4] == 'y' &&
              memcmp(buf_head(&o) + 5, want, sizeof want) == 0,
          "multi-line reply with %% escaped: %.*s", (int)buf_len(&o) - 5,
          buf_head(&o) + 5);
    buf_reset(&o);
    wire_put_replycode(&o, 451, (struct wire_str){"", 0}, lines + 1, 1);
    CHECK(buf_len(&o) == 5 + 11 && memcmp(buf_head(&o) + 5, "451 second", 11) == 0,
          "reply without xcode");
    buf_free(&o);
}

/* Enhanced status codes: "C.S.D", S and D of 1 to 3 digits, class C. */
static void check_xcode(void)
{
    static const struct {
        const char *x;
        int cls, ok;
    } t[] = {
        {"5.7.1", 5, 1},    {"4.7.1", 4, 1},    {"5.123.456", 5, 1},
        {"2.0.0", 2, 1},    {"5.7.1", 4, 0},    {" 5.7.1", 5, 0},
        {"5. 7. 1", 5, 0},  {"5.-7.+1", 5, 0},  {"5.7.1 ", 5, 0},
        {"5.1234.1", 5, 0}, {"5.7.1234", 5, 0}, {"5..1", 5, 0},
        {"5.7.", 5, 0},     {"5.7", 5, 0},      {"57.1.1", 5, 0},
        {"5.7.1.1", 5, 0},  {"", 5, 0},         {"5.x.1", 5, 0},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        CHECK(wire_xcode_valid(t[i].x, strlen(t[i].x), t[i].cls) == t[i].ok,
              "xcode '%s' class %d", t[i].x, t[i].cls);
}

/* No packet above 65535 payload bytes goes out: strict MTAs refuse them. */
static void check_packet_limit(void)
{
    struct buf o;
    buf_init(&o, 0);
    static char big[70000];
    memset(big, 'x', sizeof big);
    struct wire_str name = {"X-Big", 5}, fit = {big, 65535 - 4 - 5 - 2},
                    over = {big, 65535 - 4 - 5 - 1};
    CHECK(wire_put_idx_header(&o, 'i', 0, name, fit) == 0, "65535 fits");
    CHECK(wire_put_idx_header(&o, 'm', 0, name, over) < 0 &&
              buf_len(&o) == 65540,
          "65536 refused, nothing written");
    struct wire_str strs[2] = {name, {big, 65535 - 5 - 2 + 1}};
    CHECK(wire_put_strs(&o, 'h', strs, 2) < 0, "ADDHEADER over the limit");
    /* 32 lines of 980 '%' (each sent as "%%") still fit; longer ones,
     * which the verdict reader refuses, must not reach the wire either */
    static char pcts[1100];
    memset(pcts, '%', sizeof pcts);
    struct wire_str lines[32];
    for (int i = 0; i < 32; i++)
        lines[i] = (struct wire_str){pcts, 980};
    size_t len = wire_replycode_len((struct wire_str){"5.7.1", 5}, lines, 32);
    CHECK(len == 32 * (4 + 6 + 1960) + 31 * 2 + 1 && len <= 65535,
          "32 lines of 980 '%%' need %zu bytes", len);
    for (int i = 0; i < 32; i++)
        lines[i] = (struct wire_str){pcts, 1100};
    CHECK(wire_put_replycode(&o, 550, (struct wire_str){"5.7.1", 5}, lines,
                             32) < 0,
          "an oversized reply is refused");
    buf_reset(&o);
    struct wire_str pct = {"100% full", 9};
    CHECK(wire_put_replycode(&o, 550, (struct wire_str){"5.7.1", 5}, &pct,
                             1) == 0 &&
              buf_len(&o) - 5 ==
                  wire_replycode_len((struct wire_str){"5.7.1", 5}, &pct, 1),
          "the computed length is the written one (with %% escaped)");
    buf_free(&o);
}

/* A list's count of NUL-terminated strings, at every length and offset
 * (the count runs sixteen bytes at a time with SSE2, summing its lanes
 * every 255 blocks, then eight at a time, then byte by byte), and at
 * lengths around those 255 blocks. */
static void check_list_count(void)
{
    static const size_t longer[] = {4079, 4080, 4081, 4095, 4096, 4097,
                                    8159, 8160, 8161, 9001};
    static uint8_t frame[5 + 9100];
    size_t lens[72 + sizeof longer / sizeof longer[0]], nlens = 0;
    for (size_t len = 1; len <= 72; len++)
        lens[nlens++] = len;
    for (size_t k = 0; k < sizeof longer / sizeof longer[0]; k++)
        lens[nlens++] = longer[k];
    int bad = 0;
    /* seed 0: every byte a NUL, so that a lane's count passes 255 */
    for (unsigned seed = 0; seed < 200; seed++) {
        for (size_t li = 0; li < nlens; li++) {
            size_t len = lens[li];
            size_t nul = 0;
            unsigned r = seed;
            for (size_t i = 0; i < len; i++) {
                r = r * 1103515245u + 12345u;
                /* some runs of NULs, some bytes with the high bit set */
                uint8_t b = seed == 0 || (r >> 16) % 5 == 0
                                ? 0
                                : (uint8_t)(0x01 + (r >> 8) % 255);
                frame[5 + 1 + i] = i + 1 == len ? 0 : b;
                nul += frame[5 + 1 + i] == 0;
            }
            frame[5] = 'R';
            frame[0] = frame[1] = 0;
            frame[2] = (uint8_t)((len + 2) >> 8);
            frame[3] = (uint8_t)(len + 2); /* cmd + "R" */
            frame[4] = WIRE_MACRO;
            struct wire_frame f;
            size_t used;
            const char *err;
            struct wire_cmd c;
            if (wire_next_frame(frame, 4 + 2 + len, 1 << 20, &f, &used,
                                &err) != WIRE_FRAME ||
                wire_decode(&f, &c, &err) < 0) {
                /* an odd number of strings is no macro list: also fine */
                bad += nul % 2 == 0;
                continue;
            }
            bad += c.list_count != nul;
        }
    }
    CHECK(bad == 0, "%d lists counted wrong", bad);
}

int main(int argc, char **argv)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/postfix", argc > 1 ? argv[1] : "../shared/fixtures");
    char **names = NULL;
    int n = fx_list(dir, &names);
    CHECK(n >= 80, "expected the Postfix fixtures in %s, found %d", dir, n);
    for (int i = 0; i < n; i++) {
        struct fixture fx;
        CHECK(fx_load(names[i], &fx) == 0, "load %s", names[i]);
        check_decode(&fx);
        check_split(&fx, 1);
        check_split(&fx, 7);
        check_split(&fx, 1u << 20);
        check_encode(&fx);
        fx_free(&fx);
        free(names[i]);
    }
    free(names);
    check_hostile();
    check_replycode();
    check_xcode();
    check_packet_limit();
    check_list_count();
    printf("decoded %d MTA packets (%d checked against annotations), "
           "re-encoded %d filter packets, %d split runs\n",
           decoded, described, encoded, split_checked);
    CHECK(decoded > 2000 && described == decoded && encoded > 1000,
          "coverage too low");
    return t_done("test_wire");
}
