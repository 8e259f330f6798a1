/* hmodel: see hmodel.h. */
#include "hmodel.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "mta.h"

static char *dupn(const char *p, size_t n)
{
    char *s = malloc(n + 1);
    if (s) {
        memcpy(s, p, n);
        s[n] = '\0';
    }
    return s;
}

static int put_at(struct hm *m, size_t pos, const char *name, size_t nlen,
                  const char *value, size_t vlen, uint8_t flags)
{
    if (m->n == m->cap) {
        size_t c = m->cap ? m->cap * 2 : 16;
        struct hm_entry *e = realloc(m->e, c * sizeof *e);
        if (!e)
            return -1;
        m->e = e;
        m->cap = c;
    }
    char *n = dupn(name, nlen), *v = dupn(value, vlen);
    if (!n || !v) {
        free(n);
        free(v);
        return -1;
    }
    if (pos > m->n)
        pos = m->n;
    memmove(&m->e[pos + 1], &m->e[pos], (m->n - pos) * sizeof *m->e);
    m->e[pos] = (struct hm_entry){n, v, flags};
    m->n++;
    return 0;
}

static void drop(struct hm *m, size_t i)
{
    free(m->e[i].name);
    free(m->e[i].value);
    memmove(&m->e[i], &m->e[i + 1], (m->n - i - 1) * sizeof *m->e);
    m->n--;
}

static int set_value(struct hm_entry *e, struct wire_str v)
{
    char *s = dupn(v.p, v.n);
    if (!s)
        return -1;
    free(e->value);
    e->value = s;
    return 0;
}

static int set_name(struct hm_entry *e, struct wire_str v)
{
    char *s = dupn(v.p, v.n);
    if (!s)
        return -1;
    free(e->name);
    e->name = s;
    return 0;
}

/* Debian's sendmail.cf H lines, in order (§13b). */
static const char *const cf_headers[] = {
    "Return-Path", "Received", "Resent-Date", "Date", "Resent-From",
    "From", "Full-Name", "Resent-Message-Id", "Message-Id"};

int hm_init(struct hm *m, int mta, unsigned slots)
{
    memset(m, 0, sizeof *m);
    m->mta = mta;
    if (mta == MTA_POSTFIX)
        return put_at(m, 0, "Received", 8, "from postfix", 12,
                      HM_HIDDEN | HM_TRACE);
    for (unsigned i = 0; mta == MTA_SENDMAIL && i < slots; i++) {
        const char *n = i < 9 ? cf_headers[i] : "X-Cf-Default";
        int trace = i == 1 || (slots == 1 && i == 0);
        if (put_at(m, m->n, n, strlen(n), trace ? "from sendmail" : "", trace ? 13 : 0,
                   trace ? HM_TRACE : HM_HIDDEN) < 0)
            return -1;
    }
    return 0;
}

void hm_free(struct hm *m)
{
    while (m->n)
        drop(m, m->n - 1);
    free(m->e);
    memset(m, 0, sizeof *m);
}

int hm_add(struct hm *m, const char *name, size_t nlen, const char *value,
           size_t vlen)
{
    return put_at(m, m->n, name, nlen, value, vlen, HM_USER);
}

static int same(const struct hm_entry *e, struct wire_str n)
{
    return strlen(e->name) == n.n && strncasecmp(e->name, n.p, n.n) == 0;
}

/* Sendmail's addheader(): before the first entry of that name, or last. */
static size_t sm_add_pos(const struct hm *m, struct wire_str name)
{
    for (size_t i = 0; i < m->n; i++)
        if (same(&m->e[i], name))
            return i;
    return m->n;
}

static int sendmail_apply(struct hm *m, uint8_t cmd, uint32_t idx,
                          struct wire_str name, struct wire_str value)
{
    if (cmd == WIRE_R_ADDHEADER) { /* a default header: filled in */
        for (size_t i = 0; i < m->n; i++) {
            struct hm_entry *e = &m->e[i];
            if (same(e, name) && !(e->flags & (HM_USER | HM_TRACE))) {
                e->flags = HM_USER;
                return set_value(e, value);
            }
        }
        return put_at(m, sm_add_pos(m, name), name.p, name.n, value.p,
                      value.n, HM_USER);
    }
    if (cmd == WIRE_R_INSHEADER) {
        int32_t k = (int32_t)idx; /* mi_int32: >= 2^31 is negative */
        size_t at = 0;                 /* the entry to insert after */
        while (at < m->n && k > 0) {
            at++;
            k--;
        }
        /* srch stops on entry `at`; past the end: after the last */
        size_t pos = m->n == 0 ? 0 : at >= m->n ? m->n : at + 1;
        return put_at(m, pos, name.p, name.n, value.p, value.n, HM_USER);
    }
    long hit = -1, sys = -1;
    int32_t k = (int32_t)idx;
    for (size_t i = 0; i < m->n; i++) {
        const struct hm_entry *e = &m->e[i];
        if (!same(e, name))
            continue;
        if ((e->flags & HM_USER) && --k <= 0) {
            hit = (long)i;
            break;
        } else if (!(e->flags & (HM_USER | HM_TRACE))) {
            sys = (long)i;
        }
    }
    if (hit < 0)
        hit = sys;
    if (hit < 0)
        return value.n ? put_at(m, sm_add_pos(m, name), name.p, name.n,
                                value.p, value.n, HM_USER)
                       : 0;
    struct hm_entry *e = &m->e[hit];
    if (!value.n) {
        e->flags |= HM_DELETED; /* the slot stays: it still counts */
        return 0;
    }
    e->flags = (uint8_t)((e->flags & ~(HM_DELETED | HM_HIDDEN)) | HM_USER);
    return set_value(e, value);
}

/* The idx-th (0 means 1) shown header of that name; -1 if none. */
static long nth_named(const struct hm *m, struct wire_str name, uint32_t idx)
{
    if (idx == 0)
        idx = 1;
    for (size_t i = 0; i < m->n; i++)
        if (!(m->e[i].flags & HM_HIDDEN) && same(&m->e[i], name) &&
            --idx == 0)
            return (long)i;
    return -1;
}

static int other_apply(struct hm *m, uint8_t cmd, uint32_t idx,
                       struct wire_str name, struct wire_str value)
{
    int pf = m->mta == MTA_POSTFIX;
    if (cmd == WIRE_R_ADDHEADER)
        return put_at(m, m->n, name.p, name.n, value.p, value.n, HM_USER);
    if (cmd == WIRE_R_INSHEADER) {
        size_t pos = idx;
        if (!pf && idx > 0) { /* Stalwart: before the idx-th of that name */
            long at = nth_named(m, name, idx);
            pos = at < 0 ? m->n : (size_t)at;
        }
        return put_at(m, pos, name.p, name.n, value.p, value.n, HM_USER);
    }
    long at = nth_named(m, name, idx);
    if (at < 0)
        return value.n ? put_at(m, m->n, name.p, name.n, value.p, value.n,
                                HM_USER)
                       : 0;
    if (!value.n) {
        drop(m, (size_t)at);
        return 0;
    }
    if (pf && set_name(&m->e[at], name) < 0) /* Postfix: filter's spelling */
        return -1;
    return set_value(&m->e[at], value);
}

int hm_apply(struct hm *m, uint8_t cmd, const uint8_t *p, size_t len)
{
    uint32_t idx = 0;
    size_t off = 0, pos = 0;
    if (cmd == WIRE_R_INSHEADER || cmd == WIRE_R_CHGHEADER) {
        if (len < 4)
            return -1;
        idx = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
              (uint32_t)p[2] << 8 | p[3];
        off = 4;
    } else if (cmd != WIRE_R_ADDHEADER) {
        return 0;
    }
    struct wire_str n = wire_list_next((const char *)p + off, len - off, &pos);
    struct wire_str v = wire_list_next((const char *)p + off, len - off, &pos);
    if (!n.p || !v.p)
        return -1;
    return m->mta == MTA_SENDMAIL ? sendmail_apply(m, cmd, idx, n, v)
                                  : other_apply(m, cmd, idx, n, v);
}

int hm_apply_all(struct hm *m, const uint8_t *p, size_t len)
{
    while (len >= 5) {
        uint32_t l = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
                     (uint32_t)p[2] << 8 | p[3];
        if (l == 0 || l > len - 4)
            return -1;
        if (hm_apply(m, p[4], p + 5, l - 1) < 0)
            return -1;
        p += 4 + l;
        len -= 4 + l;
    }
    return len ? -1 : 0;
}

void hm_delivered(const struct hm *m, const struct hm_entry **out, size_t *n)
{
    *n = 0;
    for (size_t i = 0; i < m->n; i++) {
        const struct hm_entry *e = &m->e[i];
        if ((e->flags & HM_DELETED) ||
            ((e->flags & HM_HIDDEN) && !(e->flags & HM_TRACE)))
            continue;
        out[(*n)++] = e;
    }
}
