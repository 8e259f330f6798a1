/* mods: see mods.h. */
#include "mods.h"

#include <string.h>
#include <strings.h>

/* One header of the MTA's list as this reply leaves it. */
struct entry {
    const char *name;
    uint32_t nlen;
    uint32_t orig;   /* 1-based position in ctx.headers; 0 = not original */
    uint8_t hidden;  /* the MTA's own trace header, invisible to CHGHEADER */
};

struct model {
    struct entry *e;
    uint32_t n;
};

static int same_name(const struct entry *e, struct wire_str name)
{
    return !e->hidden && e->nlen == name.n &&
           strncasecmp(e->name, name.p, name.n) == 0;
}

static void insert_at(struct model *m, uint32_t pos, struct entry e)
{
    memmove(&m->e[pos + 1], &m->e[pos], (m->n - pos) * sizeof *m->e);
    m->e[pos] = e;
    m->n++;
}

/* Where "after the idx-th header the script saw" is now. */
static uint32_t insert_pos(const struct model *m, uint32_t idx)
{
    if (idx == 0)
        return 0;
    for (uint32_t i = 0; i < m->n; i++) {
        if (m->e[i].orig == idx)
            return i + 1;
        if (m->e[i].orig > idx)
            return i; /* idx itself was deleted by this reply */
    }
    return m->n;
}

/*
 * Finds the nth original header called name; returns its model position or
 * -1, and sets *wire_idx to the MTA's 1-based index among same-named headers
 * (the position a new one would take when the target is gone).
 */
static long find_nth(const struct sess *s, const struct model *m,
                     struct wire_str name, uint32_t nth, uint32_t *wire_idx)
{
    uint32_t orig = 0, seen = 0;
    for (uint32_t i = 0; i < s->nhdrs && !orig; i++) {
        const struct sess_hdr *h = &s->hdrs[i];
        if (h->name.len == name.n &&
            strncasecmp(sess_cstr(s, h->name, 1), name.p, name.n) == 0 &&
            ++seen == nth)
            orig = i + 1;
    }
    uint32_t count = 0;
    for (uint32_t i = 0; i < m->n; i++) {
        if (orig && m->e[i].orig == orig) {
            *wire_idx = count + 1;
            return (long)i;
        }
        count += same_name(&m->e[i], name);
    }
    *wire_idx = count + 1;
    return -1;
}

static int put_headers(struct sess *s, const struct verdict *v,
                       struct buf *out)
{
    size_t cap = 1 + s->nhdrs + v->nmods;
    buf_reset(&s->scratch);
    struct model m = {(struct entry *)buf_reserve(&s->scratch,
                                                  cap * sizeof(struct entry)),
                      0};
    if (!m.e)
        return -1;
    if (s->hides_received)
        m.e[m.n++] = (struct entry){"Received", 8, 0, 1};
    for (uint32_t i = 0; i < s->nhdrs; i++)
        m.e[m.n++] = (struct entry){sess_cstr(s, s->hdrs[i].name, 1),
                                    s->hdrs[i].name.len, i + 1, 0};
    int rc = 0;
    for (size_t i = 0; i < v->nmods; i++) {
        const struct mod *d = &v->mods[i];
        struct entry added = {d->a.p, (uint32_t)d->a.n, 0, 0};
        uint32_t idx;
        long at;
        switch (d->op) {
        case MOD_ADD_HEADER:
            rc |= wire_put_strs(out, WIRE_R_ADDHEADER, &d->a, 2);
            m.e[m.n++] = added;
            break;
        case MOD_INSERT_HEADER:
            idx = insert_pos(&m, d->index);
            rc |= wire_put_idx_header(out, WIRE_R_INSHEADER, idx, d->a, d->b);
            insert_at(&m, idx, added);
            break;
        case MOD_CHANGE_HEADER:
        case MOD_DELETE_HEADER:
            at = find_nth(s, &m, d->a, d->index, &idx);
            if (at < 0 && (d->op == MOD_DELETE_HEADER || d->b.n == 0))
                break; /* nothing to delete */
            rc |= wire_put_idx_header(
                out, WIRE_R_CHGHEADER, idx, d->a,
                d->op == MOD_DELETE_HEADER ? (struct wire_str){"", 0} : d->b);
            if (at < 0) /* the MTA appends a header it cannot find */
                m.e[m.n++] = added;
            else if (d->op == MOD_DELETE_HEADER || d->b.n == 0)
                memmove(&m.e[at], &m.e[at + 1],
                        (m.n-- - (uint32_t)at - 1) * sizeof *m.e);
            else
                m.e[at].name = d->a.p; /* the MTA keeps our spelling */
            break;
        default:
            break;
        }
    }
    return rc;
}

int mods_put(struct sess *s, const struct verdict *v, struct buf *out)
{
    int rc = put_headers(s, v, out);
    for (size_t i = 0; i < v->nmods; i++) {
        const struct mod *d = &v->mods[i];
        if (d->op == MOD_ADD_RCPT && d->b.p)
            rc |= wire_put_strs(out, WIRE_R_ADDRCPT_PAR, &d->a, 2);
        else if (d->op == MOD_ADD_RCPT)
            rc |= wire_put_strs(out, WIRE_R_ADDRCPT, &d->a, 1);
        else if (d->op == MOD_DEL_RCPT)
            rc |= wire_put_strs(out, WIRE_R_DELRCPT, &d->a, 1);
    }
    if (v->from.p) {
        struct wire_str f[2] = {v->from, v->from_args};
        rc |= wire_put_strs(out, WIRE_R_CHGFROM, f, v->from_args.p ? 2 : 1);
    }
    if (v->body.p)
        rc |= wire_put_body(out, v->body.p, v->body.n);
    if (v->quarantine.p)
        rc |= wire_put_strs(out, WIRE_R_QUARANTINE, &v->quarantine, 1);
    return rc ? -1 : 0;
}
