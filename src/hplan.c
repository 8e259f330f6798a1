/* hplan: see hplan.h. */
#include "hplan.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "mta.h"

/* Largest middle part (cells) paired exactly; beyond it, greedily. */
#define DP_CELLS (4u << 20)
#define GREEDY_WINDOW 64

static int name_eq(struct wire_str a, struct wire_str b, int fold)
{
    if (a.n != b.n)
        return 0;
    return fold ? strncasecmp(a.p, b.p, a.n) == 0 : memcmp(a.p, b.p, a.n) == 0;
}

static int same_hdr(const struct hp_hdr *a, const struct hp_hdr *b)
{
    return name_eq(a->name, b->name, 0) && a->value.n == b->value.n &&
           memcmp(a->value.p, b->value.p, a->value.n) == 0;
}

/*
 * 2: o stays as it is; 1: o is changed into w in place (CHGHEADER can
 * give it w's name and a non-empty value: an empty one would delete it);
 * 0: they cannot be paired.
 */
static int weight(const struct mta_rules *r, const struct hp_hdr *o,
                  const struct hp_hdr *w)
{
    if (same_hdr(o, w))
        return 2;
    return w->value.n && name_eq(o->name, w->name, r->renames) ? 1 : 0;
}

/* Positional MTAs: the heaviest common subsequence of o and w. */
static int match_any(const struct mta_rules *r, const struct hp_hdr *o,
                     size_t n, const struct hp_hdr *w, size_t m, int32_t *om,
                     int32_t *wm)
{
    size_t cells = (n + 1) * (m + 1);
    if (n && m && (cells > DP_CELLS || cells / (m + 1) != n + 1)) {
        size_t i = 0;
        for (size_t j = 0; j < m && i < n; j++) {
            size_t best = n;
            int bw = 0;
            for (size_t k = i; k < n && k < i + GREEDY_WINDOW; k++) {
                int wt = weight(r, &o[k], &w[j]);
                if (wt > bw) {
                    bw = wt;
                    best = k;
                    if (wt == 2)
                        break;
                }
            }
            if (best < n) {
                om[best] = (int32_t)j;
                wm[j] = (int32_t)best;
                i = best + 1;
            }
        }
        return 0;
    }
    uint32_t *s = calloc(cells, sizeof *s);
    if (!s)
        return -1;
#define S(i, j) s[(i) * (m + 1) + (j)]
    for (size_t i = 1; i <= n; i++)
        for (size_t j = 1; j <= m; j++) {
            uint32_t best = S(i - 1, j) > S(i, j - 1) ? S(i - 1, j)
                                                      : S(i, j - 1);
            int wt = weight(r, &o[i - 1], &w[j - 1]);
            if (wt && S(i - 1, j - 1) + (uint32_t)wt > best)
                best = S(i - 1, j - 1) + (uint32_t)wt;
            S(i, j) = best;
        }
    for (size_t i = n, j = m; i && j;) {
        int wt = weight(r, &o[i - 1], &w[j - 1]);
        if (S(i, j) == S(i - 1, j)) {
            i--;
        } else if (S(i, j) == S(i, j - 1)) {
            j--;
        } else { /* only the pair explains it */
            (void)wt;
            om[i - 1] = (int32_t)(j - 1);
            wm[j - 1] = (int32_t)(i - 1);
            i--;
            j--;
        }
    }
#undef S
    free(s);
    return 0;
}

/*
 * Append-only MTAs: a prefix w[0..j) paired in order with headers of o
 * (the rest of o deleted, the rest of w appended). Every pair saves a
 * delete and an append, a change costs one: the longest prefix first,
 * then the fewest changes.
 */
static int match_prefix(const struct mta_rules *r, const struct hp_hdr *o,
                        size_t n, const struct hp_hdr *w, size_t m,
                        int32_t *om, int32_t *wm)
{
    size_t cells = (n + 1) * (m + 1);
    if (n && m && (cells > DP_CELLS || cells / (m + 1) != n + 1)) {
        for (size_t i = 0, j = 0; i < n && j < m; i++)
            if (weight(r, &o[i], &w[j])) {
                om[i] = (int32_t)j;
                wm[j++] = (int32_t)i;
            }
        return 0;
    }
    /* g(i, j): fewest changes pairing all of w[0..j) within o[0..i) */
    const uint32_t INF = UINT32_MAX;
    uint32_t *g = malloc(cells * sizeof *g);
    if (!g)
        return -1;
#define G(i, j) g[(i) * (m + 1) + (j)]
    for (size_t i = 0; i <= n; i++)
        for (size_t j = 0; j <= m; j++) {
            uint32_t v = j == 0 ? 0 : INF;
            if (i && j) {
                v = G(i - 1, j);
                int wt = weight(r, &o[i - 1], &w[j - 1]);
                uint32_t p = G(i - 1, j - 1);
                if (wt && p != INF && p + (wt == 1) < v)
                    v = p + (wt == 1);
            }
            G(i, j) = v;
        }
    size_t bj = 0;
    long best = 0;
    for (size_t j = 1; j <= m; j++)
        if (G(n, j) != INF && 2 * (long)j - (long)G(n, j) > best) {
            best = 2 * (long)j - (long)G(n, j);
            bj = j;
        }
    for (size_t i = n, j = bj; j;) {
        if (G(i, j) == G(i - 1, j)) {
            i--;
            continue;
        }
        om[i - 1] = (int32_t)(j - 1);
        wm[j - 1] = (int32_t)(i - 1);
        i--;
        j--;
    }
#undef G
    free(g);
    return 0;
}

int hplan_match(int mta, const struct hp_hdr *o, size_t n,
                const struct hp_hdr *w, size_t m, int32_t *om, int32_t *wm)
{
    const struct mta_rules *r = mta_rules(mta);
    for (size_t i = 0; i < n; i++)
        om[i] = -1;
    for (size_t j = 0; j < m; j++)
        wm[j] = -1;
    size_t p = 0, q = 0; /* the common prefix and (positional) suffix */
    while (p < n && p < m && same_hdr(&o[p], &w[p])) {
        om[p] = wm[p] = (int32_t)p;
        p++;
    }
    while (r->positional && q < n - p && q < m - p &&
           same_hdr(&o[n - 1 - q], &w[m - 1 - q])) {
        om[n - 1 - q] = (int32_t)(m - 1 - q);
        wm[m - 1 - q] = (int32_t)(n - 1 - q);
        q++;
    }
    size_t a = n - p - q, b = m - p - q;
    int32_t *mo = om + p, *mw = wm + p;
    int rc = r->positional ? match_any(r, o + p, a, w + p, b, mo, mw)
                           : match_prefix(r, o + p, a, w + p, b, mo, mw);
    for (size_t i = 0; i < a; i++) /* back to whole-list indexes */
        if (mo[i] >= 0)
            mo[i] += (int32_t)p;
    for (size_t j = 0; j < b; j++)
        if (mw[j] >= 0)
            mw[j] += (int32_t)p;
    return rc;
}

static const struct hp_hdr *sort_base;

static int by_name(const void *x, const void *y)
{
    const struct hp_hdr *a = &sort_base[*(const uint32_t *)x];
    const struct hp_hdr *b = &sort_base[*(const uint32_t *)y];
    if (a->name.n != b->name.n)
        return a->name.n < b->name.n ? -1 : 1;
    return strncasecmp(a->name.p, b->name.p, a->name.n);
}

/* grp[k]: a number per name (case-insensitive) of all[k]. */
static int name_groups(const struct hp_hdr *all, size_t n, uint32_t *grp)
{
    uint32_t *ix = malloc((n + 1) * sizeof *ix);
    if (!ix)
        return -1;
    for (size_t k = 0; k < n; k++)
        ix[k] = (uint32_t)k;
    sort_base = all;
    qsort(ix, n, sizeof *ix, by_name);
    uint32_t g = 0;
    for (size_t k = 0; k < n; k++) {
        if (k && by_name(&ix[k - 1], &ix[k]) != 0)
            g++;
        grp[ix[k]] = g;
    }
    free(ix);
    return 0;
}

static int put_append(const struct mta_rules *r, const struct hp_hdr *h,
                      struct buf *out)
{
    if (r->append_ins)
        return wire_put_idx_header(out, WIRE_R_INSHEADER, MTA_APPEND, h->name,
                                   h->value);
    return wire_put_strs(out, WIRE_R_ADDHEADER, &h->name, 2);
}

int hplan_put(int mta, const struct hp_hdr *tops, size_t ntop,
              const struct hp_hdr *o, size_t n, const struct hp_hdr *w,
              size_t m, struct buf *out)
{
    const struct mta_rules *r = mta_rules(mta);
    int32_t *om = malloc((n + 1) * sizeof *om);
    int32_t *wm = malloc((m + 1) * sizeof *wm);
    struct hp_hdr *all = malloc((ntop + n + 1) * sizeof *all);
    uint32_t *grp = malloc((ntop + n + 1) * sizeof *grp);
    uint32_t *cnt = calloc(ntop + n + 1, sizeof *cnt);
    int rc = om && wm && all && grp && cnt ? 0 : -1;
    if (!rc)
        rc = hplan_match(mta, o, n, w, m, om, wm);
    if (!rc) {
        if (ntop) /* tops and o may be NULL when empty */
            memcpy(all, tops, ntop * sizeof *all);
        if (n)
            memcpy(all + ntop, o, n * sizeof *all);
        rc = name_groups(all, ntop + n, grp);
    }
    for (size_t k = 0; !rc && k < ntop; k++)
        cnt[grp[k]]++; /* headers above count for CHGHEADER too */
    size_t kept = 0;
    static const struct wire_str none = {"", 0};
    /* deletes and changes first: they count only headers still there */
    for (size_t i = 0; !rc && i < n; i++) {
        uint32_t *c = &cnt[grp[ntop + i]];
        if (om[i] < 0) {
            rc = wire_put_idx_header(out, WIRE_R_CHGHEADER, *c + 1, o[i].name,
                                     none);
            *c += r->keeps_slot;
            continue;
        }
        const struct hp_hdr *h = &w[om[i]];
        if (!same_hdr(&o[i], h))
            rc = wire_put_idx_header(out, WIRE_R_CHGHEADER, *c + 1,
                                     r->renames ? h->name : o[i].name,
                                     h->value);
        (*c)++;
        kept++;
    }
    /* then the new headers, each right after the one before it in w */
    uint32_t pos = (uint32_t)(ntop + r->hidden_top);
    uint32_t len = pos + (uint32_t)kept;
    for (size_t j = 0; !rc && j < m; j++) {
        if (wm[j] >= 0) {
            pos++;
            continue;
        }
        if (!r->positional || pos == len)
            rc = put_append(r, &w[j], out);
        else
            rc = wire_put_idx_header(out, WIRE_R_INSHEADER, pos, w[j].name,
                                     w[j].value);
        pos++;
        len++;
    }
    free(om);
    free(wm);
    free(all);
    free(grp);
    free(cnt);
    return rc;
}
