/* mods: see mods.h. */
#include "mods.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hplan.h"
#include "mta.h"

/*
 * The planner keeps no list it edits in place (that was quadratic: 150,000
 * inserts took seconds). It relies on the sending order lverdict gives
 * (adds and inserts before changes and deletes), so while inserts are
 * planned no original header has been deleted yet:
 *  - an insert after original header k (1 <= k <= n) lands at model
 *    position hidden + k + (inserts so far with a smaller index), counted
 *    with a Fenwick tree over the indexes; index 0 is the top; past the
 *    end is the current length;
 *  - the list the inserts leave has a known shape: inserts at 0 (newest
 *    first), the MTA's hidden header, then each original followed by the
 *    inserts after it (newest first), then adds and past-the-end inserts
 *    in their order. Changes and deletes count same-named headers in it:
 *    the entries of one name (sorted once) each get a Fenwick tree of the
 *    ones still there.
 * Everything is O(n log n) in headers plus modifications.
 */

/* Fenwick tree over 1..n: point add, prefix sum. */
static void fw_add(int32_t *t, uint32_t n, uint32_t i, int32_t d)
{
    for (; i <= n; i += i & -i)
        t[i] += d;
}

static int32_t fw_sum(const int32_t *t, uint32_t i)
{
    int32_t s = 0;
    for (; i > 0; i -= i & -i)
        s += t[i];
    return s;
}

/* One header of the list the adds and inserts leave. */
struct entry {
    const char *name;
    uint32_t nlen;
    uint32_t orig;   /* 1-based position in ctx.headers; 0 = added */
    uint8_t phantom; /* not a header: makes a group for a change's name */
};

/* A name's entries, in list order, at byname[start..start+count). */
struct group {
    uint32_t start, count;
    uint32_t origs, norigs; /* its originals at origpos[origs..+norigs) */
    uint32_t appended;      /* headers the MTA appended (change of none) */
};

struct plan {
    struct entry *list; /* adds and inserts applied, then phantoms */
    uint32_t n;
    uint32_t *byname;   /* list indexes sorted by (name, position) */
    uint32_t *origpos;  /* byname positions of the originals, by group */
    int32_t *live;      /* Fenwick over byname positions (1-based) */
    struct group *groups;
    uint32_t ngroups;
};

static int name_cmp(const char *a, uint32_t an, const char *b, uint32_t bn)
{
    if (an != bn)
        return an < bn ? -1 : 1;
    return strncasecmp(a, b, an);
}

static const struct entry *sort_list; /* qsort has no context argument */

static int byname_cmp(const void *x, const void *y)
{
    uint32_t i = *(const uint32_t *)x, j = *(const uint32_t *)y;
    const struct entry *a = &sort_list[i], *b = &sort_list[j];
    int c = name_cmp(a->name, a->nlen, b->name, b->nlen);
    return c ? c : i < j ? -1 : i > j;
}

/* Sorts the list by name into groups; every real entry starts live. */
static int plan_index(struct plan *p)
{
    uint32_t n = p->n;
    p->byname = malloc((n + 1) * sizeof *p->byname);
    p->origpos = malloc((n + 1) * sizeof *p->origpos);
    p->live = calloc(n + 1, sizeof *p->live);
    p->groups = malloc((n + 1) * sizeof *p->groups);
    if (!p->byname || !p->origpos || !p->live || !p->groups)
        return -1;
    for (uint32_t i = 0; i < n; i++)
        p->byname[i] = i;
    sort_list = p->list;
    qsort(p->byname, n, sizeof *p->byname, byname_cmp);
    uint32_t norig = 0;
    p->ngroups = 0;
    for (uint32_t k = 0; k < n; k++) {
        const struct entry *e = &p->list[p->byname[k]];
        struct group *g = p->ngroups ? &p->groups[p->ngroups - 1] : NULL;
        const struct entry *first = g ? &p->list[p->byname[g->start]] : NULL;
        if (!g || name_cmp(e->name, e->nlen, first->name, first->nlen) != 0) {
            g = &p->groups[p->ngroups++];
            *g = (struct group){k, 0, norig, 0, 0};
        }
        g->count++;
        if (e->orig) {
            p->origpos[norig++] = k;
            g->norigs++;
        }
        if (!e->phantom)
            fw_add(p->live, n, k + 1, 1);
    }
    return 0;
}

static struct group *find_group(struct plan *p, struct wire_str name)
{
    uint32_t lo = 0, hi = p->ngroups;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        const struct entry *e = &p->list[p->byname[p->groups[mid].start]];
        int c = name_cmp(e->name, e->nlen, name.p, (uint32_t)name.n);
        if (c == 0)
            return &p->groups[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* Live entries of g before byname position k. */
static uint32_t live_before(const struct plan *p, const struct group *g,
                            uint32_t k)
{
    return (uint32_t)(fw_sum(p->live, k) - fw_sum(p->live, g->start));
}

/*
 * A change or delete of the nth header called name in ctx.headers: sends
 * the MTA's index among the same-named headers still there (one past them
 * when the target is gone) and updates the counts.
 */
static int put_change(struct plan *p, const struct mod *d, struct buf *out)
{
    int del = d->op == MOD_DELETE_HEADER || d->b.n == 0;
    struct group *g = find_group(p, d->a); /* never NULL: its phantom */
    if (!g)
        return -1;
    long at = -1; /* byname position of the target while it is there */
    if (d->index >= 1 && d->index <= g->norigs) {
        uint32_t k = p->origpos[g->origs + d->index - 1];
        if (fw_sum(p->live, k + 1) - fw_sum(p->live, k) > 0)
            at = (long)k;
    }
    if (at < 0 && del)
        return 0; /* nothing to delete */
    uint32_t idx = at < 0 ? live_before(p, g, g->start + g->count) +
                                g->appended + 1
                          : live_before(p, g, (uint32_t)at) + 1;
    if (wire_put_idx_header(out, WIRE_R_CHGHEADER, idx, d->a,
                            del ? (struct wire_str){"", 0} : d->b) < 0)
        return -1;
    if (at >= 0 && del)
        fw_add(p->live, p->n, (uint32_t)at + 1, -1);
    else if (at < 0)
        g->appended++; /* the MTA appends a header it cannot find */
    return 0;
}

/* Scratch of put_headers, freed in one place. */
struct work {
    int32_t *ins;      /* Fenwick over insert indexes 0..n (as 1..n+1) */
    uint32_t *head;    /* newest insert after original k, or UINT32_MAX */
    uint32_t *next;    /* the insert before it at the same index */
    struct plan p;
};

static void work_free(struct work *w)
{
    free(w->ins);
    free(w->head);
    free(w->next);
    free(w->p.list);
    free(w->p.byname);
    free(w->p.origpos);
    free(w->p.live);
    free(w->p.groups);
}

static struct entry mod_entry(const struct mod *d, uint8_t phantom)
{
    return (struct entry){d->a.p, (uint32_t)d->a.n, 0, phantom};
}

/* Lays out the list the adds and inserts left, plus the phantoms. */
static int build_list(struct sess *s, const struct verdict *v, struct work *w)
{
    uint32_t nh = s->nhdrs, n = 0;
    struct entry *l = malloc((nh + 2 * v->nmods + 1) * sizeof *l);
    if (!l)
        return -1;
    for (uint32_t m = w->head[0]; m != UINT32_MAX; m = w->next[m])
        l[n++] = mod_entry(&v->mods[m], 0);
    for (uint32_t k = 1; k <= nh; k++) {
        l[n++] = (struct entry){sess_cstr(s, s->hdrs[k - 1].name, 1),
                                s->hdrs[k - 1].name.len, k, 0};
        for (uint32_t m = w->head[k]; m != UINT32_MAX; m = w->next[m])
            l[n++] = mod_entry(&v->mods[m], 0);
    }
    for (size_t i = 0; i < v->nmods; i++) { /* the tail, in its order */
        const struct mod *d = &v->mods[i];
        if (d->op == MOD_ADD_HEADER ||
            (d->op == MOD_INSERT_HEADER && d->index > nh))
            l[n++] = mod_entry(d, 0);
    }
    for (size_t i = 0; i < v->nmods; i++)
        if (v->mods[i].op == MOD_CHANGE_HEADER ||
            v->mods[i].op == MOD_DELETE_HEADER)
            l[n++] = mod_entry(&v->mods[i], 1);
    w->p.list = l;
    w->p.n = n;
    return plan_index(&w->p);
}

/* Whether the verdict only appends headers (the common one): then
 * put_headers needs no scratch, each add is one ADDHEADER in order. */
static int adds_only(const struct verdict *v)
{
    for (size_t i = 0; i < v->nmods; i++)
        if (v->mods[i].op == MOD_INSERT_HEADER ||
            v->mods[i].op == MOD_CHANGE_HEADER ||
            v->mods[i].op == MOD_DELETE_HEADER)
            return 0;
    return 1;
}

static int put_headers(struct sess *s, const struct verdict *v,
                       struct buf *out)
{
    if (adds_only(v)) {
        int rc = 0;
        for (size_t i = 0; !rc && i < v->nmods; i++)
            if (v->mods[i].op == MOD_ADD_HEADER)
                rc = wire_put_strs(out, WIRE_R_ADDHEADER, &v->mods[i].a, 2);
        return rc;
    }
    uint32_t nh = s->nhdrs, hidden = mta_rules(s->mta)->hidden_top;
    uint32_t total = hidden + nh; /* the MTA's list length so far */
    struct work w;
    memset(&w, 0, sizeof w);
    w.ins = calloc(nh + 2, sizeof *w.ins);
    w.head = malloc((nh + 1) * sizeof *w.head);
    w.next = malloc((v->nmods + 1) * sizeof *w.next);
    int rc = w.ins && w.head && w.next ? 0 : -1;
    for (uint32_t k = 0; !rc && k <= nh; k++)
        w.head[k] = UINT32_MAX;
    int changing = 0;
    for (size_t i = 0; !rc && i < v->nmods; i++) {
        const struct mod *d = &v->mods[i];
        switch (d->op) {
        case MOD_ADD_HEADER:
            rc = wire_put_strs(out, WIRE_R_ADDHEADER, &d->a, 2);
            total++;
            if (changing) { /* after changes: one more of that name */
                struct group *g = find_group(&w.p, d->a);
                if (g)
                    g->appended++;
            }
            break;
        case MOD_INSERT_HEADER: {
            if (changing) { /* lverdict sends every insert first */
                rc = -1;
                break;
            }
            uint32_t k = d->index, pos;
            if (k == 0)
                pos = 0;
            else if (k <= nh)
                pos = hidden + k + (uint32_t)fw_sum(w.ins, k);
            else
                pos = total;
            rc = wire_put_idx_header(out, WIRE_R_INSHEADER, pos, d->a, d->b);
            total++;
            if (k <= nh) {
                fw_add(w.ins, nh + 1, k + 1, 1);
                w.next[i] = w.head[k];
                w.head[k] = (uint32_t)i;
            }
            break;
        }
        case MOD_CHANGE_HEADER:
        case MOD_DELETE_HEADER:
            if (!changing && (rc = build_list(s, v, &w)) < 0)
                break;
            changing = 1;
            rc = put_change(&w.p, d, out);
            break;
        default:
            break;
        }
    }
    work_free(&w);
    return rc;
}

/* The message's headers as the planner takes them. */
static struct hp_hdr *originals(const struct sess *s)
{
    struct hp_hdr *o = malloc((s->nhdrs + 1) * sizeof *o);
    for (uint32_t i = 0; o && i < s->nhdrs; i++)
        o[i] = (struct hp_hdr){
            {sess_cstr(s, s->hdrs[i].name, 1), s->hdrs[i].name.len},
            {sess_cstr(s, s->hdrs[i].value, 1), s->hdrs[i].value.len}};
    return o;
}

/* A `headers` list: the planner diffs it against ctx.headers. */
static int put_list(struct sess *s, const struct verdict *v, struct buf *out)
{
    struct hp_hdr *o = originals(s);
    struct hp_hdr *w = malloc((v->nmods + 1) * sizeof *w);
    size_t m = 0;
    int rc = o && w ? 0 : -1;
    for (size_t i = 0; !rc && i < v->nmods; i++)
        if (v->mods[i].op == MOD_HEADER)
            w[m++] = (struct hp_hdr){v->mods[i].a, v->mods[i].b};
    if (!rc)
        rc = hplan_put(s->mta, NULL, 0, o, s->nhdrs, w, m, out);
    free(o);
    free(w);
    return rc;
}

static const struct hp_hdr *nth_base;

static int nth_cmp(const void *x, const void *y)
{
    uint32_t i = *(const uint32_t *)x, j = *(const uint32_t *)y;
    const struct hp_hdr *a = &nth_base[i], *b = &nth_base[j];
    int c = name_cmp(a->name.p, (uint32_t)a->name.n, b->name.p,
                     (uint32_t)b->name.n);
    return c ? c : i < j ? -1 : i > j;
}

/* The original that is the nth of that name (1-based), or -1. */
static long find_nth(const struct hp_hdr *o, const uint32_t *byname,
                     uint32_t n, struct wire_str name, uint32_t nth)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) { /* the first of that name */
        uint32_t mid = lo + (hi - lo) / 2;
        const struct hp_hdr *e = &o[byname[mid]];
        if (name_cmp(e->name.p, (uint32_t)e->name.n, name.p,
                     (uint32_t)name.n) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    uint32_t k = lo + nth - 1;
    if (nth == 0 || k >= n)
        return -1;
    const struct hp_hdr *e = &o[byname[k]];
    return name_cmp(e->name.p, (uint32_t)e->name.n, name.p,
                    (uint32_t)name.n) == 0
               ? (long)byname[k]
               : -1;
}

/*
 * Index modifications for an MTA that cannot place an INSHEADER between
 * message headers (Sendmail, Stalwart): the list they mean, by the API's
 * rules (inserts after original k newest first, adds and past-the-end
 * inserts then changes of absent headers at the end, changes and deletes
 * of the nth original of a name), then the planner. Inserts at 0 go to
 * the very top first, as the API says, above the MTA's trace header.
 */
static int put_translated(struct sess *s, const struct verdict *v,
                          struct buf *out)
{
    uint32_t n = s->nhdrs;
    size_t nm = v->nmods;
    struct hp_hdr *o = originals(s);
    struct hp_hdr *w = malloc((n + nm + 1) * sizeof *w);
    struct hp_hdr *tops = malloc((nm + 1) * sizeof *tops);
    uint32_t *byname = malloc((n + 1) * sizeof *byname);
    uint32_t *head = malloc((n + 1) * sizeof *head);
    uint32_t *next = malloc((nm + 1) * sizeof *next);
    uint8_t *gone = calloc(n + 1, 1);
    int rc = o && w && tops && byname && head && next && gone ? 0 : -1;
    size_t m = 0, ntop = 0;
    for (uint32_t k = 0; !rc && k < n; k++) {
        byname[k] = k;
        head[k] = UINT32_MAX;
    }
    if (!rc) {
        nth_base = o;
        qsort(byname, n, sizeof *byname, nth_cmp);
    }
    for (size_t i = 0; !rc && i < nm; i++) {
        const struct mod *d = &v->mods[i];
        if (d->op == MOD_INSERT_HEADER && d->index == 0) {
            rc = wire_put_idx_header(out, WIRE_R_INSHEADER, 0, d->a, d->b);
            tops[ntop++] = (struct hp_hdr){d->a, d->b};
        } else if (d->op == MOD_INSERT_HEADER && d->index <= n) {
            next[i] = head[d->index - 1];
            head[d->index - 1] = (uint32_t)i;
        } else if (d->op == MOD_CHANGE_HEADER || d->op == MOD_DELETE_HEADER) {
            long k = find_nth(o, byname, n, d->a, d->index);
            int del = d->op == MOD_DELETE_HEADER || d->b.n == 0;
            if (k >= 0 && !gone[k]) {
                if (del)
                    gone[k] = 1;
                else
                    o[k].value = d->b; /* o is ours: w copies it below */
            }
        }
    }
    struct hp_hdr *orig = rc ? NULL : originals(s); /* o has the edits */
    rc |= orig ? 0 : -1;
    for (uint32_t k = 0; !rc && k < n; k++) {
        if (!gone[k])
            w[m++] = o[k];
        for (uint32_t i = head[k]; i != UINT32_MAX; i = next[i])
            w[m++] = (struct hp_hdr){v->mods[i].a, v->mods[i].b};
    }
    for (size_t i = 0; !rc && i < nm; i++) {
        const struct mod *d = &v->mods[i];
        if (d->op == MOD_ADD_HEADER ||
            (d->op == MOD_INSERT_HEADER && d->index > n))
            w[m++] = (struct hp_hdr){d->a, d->b};
    }
    /* a change of a header that is not there: the MTAs append it */
    memset(gone, 0, n + 1);
    for (size_t i = 0; !rc && i < nm; i++) {
        const struct mod *d = &v->mods[i];
        if (d->op != MOD_CHANGE_HEADER && d->op != MOD_DELETE_HEADER)
            continue;
        long k = find_nth(orig, byname, n, d->a, d->index);
        int del = d->op == MOD_DELETE_HEADER || d->b.n == 0;
        if (k >= 0 && !gone[k])
            gone[k] = (uint8_t)del;
        else if (!del)
            w[m++] = (struct hp_hdr){d->a, d->b};
    }
    if (!rc)
        rc = hplan_put(s->mta, tops, ntop, orig, n, w, m, out);
    free(o);
    free(orig);
    free(w);
    free(tops);
    free(byname);
    free(head);
    free(next);
    free(gone);
    return rc;
}

int mods_put(struct sess *s, const struct verdict *v, struct buf *out)
{
    mta_recheck(s); /* macro v may have come at DATA (mta.h) */
    int rc;
    if (v->header_list)
        rc = put_list(s, v, out);
    else if (mta_rules(s->mta)->positional)
        rc = put_headers(s, v, out);
    else
        rc = put_translated(s, v, out);
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
