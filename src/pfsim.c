/* pfsim: see pfsim.h. */
#include "pfsim.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

static char *dupn(const char *p, size_t n)
{
    char *s = malloc(n + 1);
    if (s) {
        memcpy(s, p, n);
        s[n] = '\0';
    }
    return s;
}

/* A header line starts with a field name then ':'; 0 if it does not. */
static size_t name_len(const char *line, size_t n)
{
    size_t i = wire_field_name_len(line, n);
    return i > 0 && i < n && line[i] == ':' ? i : 0;
}

/* Inserts a header at position pos (owned strings taken). */
static int insert_hdr(struct pf_msg *m, size_t pos, char *name, char *text,
                      char *value, int hidden)
{
    if (!name || !text || !value)
        goto fail;
    if (m->nh == m->caph) {
        size_t n = m->caph ? m->caph * 2 : 32;
        struct pf_hdr *h = realloc(m->h, n * sizeof *h);
        if (!h)
            goto fail;
        m->h = h;
        m->caph = n;
    }
    if (pos > m->nh)
        pos = m->nh;
    memmove(&m->h[pos + 1], &m->h[pos], (m->nh - pos) * sizeof *m->h);
    m->h[pos] = (struct pf_hdr){name, text, value, (uint8_t)hidden};
    m->nh++;
    return 0;
fail:
    free(name);
    free(text);
    free(value);
    return -1;
}

/* Builds "Name: value" the way Postfix writes a milter's header. */
static int make_hdr(struct pf_msg *m, size_t pos, struct wire_str name,
                    struct wire_str value)
{
    char *text = malloc(name.n + value.n + 3);
    if (!text)
        return -1;
    memcpy(text, name.p, name.n);
    memcpy(text + name.n, ": ", 2);
    memcpy(text + name.n + 2, value.p, value.n);
    text[name.n + 2 + value.n] = '\0';
    return insert_hdr(m, pos, dupn(name.p, name.n), text,
                      dupn(value.p, value.n), 0);
}

static void drop_hdr(struct pf_msg *m, size_t i)
{
    free(m->h[i].name);
    free(m->h[i].text);
    free(m->h[i].value);
    memmove(&m->h[i], &m->h[i + 1], (m->nh - i - 1) * sizeof *m->h);
    m->nh--;
}

int pf_parse(struct pf_msg *m, const char *data, size_t len)
{
    memset(m, 0, sizeof *m);
    buf_init(&m->body, 0);
    buf_init(&m->newbody, 0);
    const char *p = data, *end = data + len;
    int in_headers = 1;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *e = nl ? nl : end;
        size_t n = (size_t)(e - p), k;
        if (n && p[n - 1] == '\r')
            n--;
        if (in_headers && n == 0) {
            in_headers = 0;
            m->has_body = 1;
            p = nl ? nl + 1 : end;
            continue;
        }
        if (in_headers && (p[0] == ' ' || p[0] == '\t') && m->nh) {
            struct pf_hdr *h = &m->h[m->nh - 1]; /* continuation line */
            size_t tl = strlen(h->text), vl = strlen(h->value);
            char *t = realloc(h->text, tl + n + 2);
            char *v = realloc(h->value, vl + n + 2);
            if (!t || !v)
                return -1;
            h->text = t;
            h->value = v;
            t[tl] = '\n';
            memcpy(t + tl + 1, p, n);
            t[tl + 1 + n] = '\0';
            v[vl] = '\n';
            memcpy(v + vl + 1, p, n);
            v[vl + 1 + n] = '\0';
        } else if (in_headers && (k = name_len(p, n)) > 0) {
            const char *v = p + k + 1;
            size_t vn = n - k - 1;
            if (vn && *v == ' ') { /* milters get the value without it */
                v++;
                vn--;
            }
            if (insert_hdr(m, m->nh, dupn(p, k), dupn(p, n), dupn(v, vn), 0))
                return -1;
        } else {
            in_headers = 0; /* not a header: the body starts here */
            m->has_body = 1;
            buf_append(&m->body, p, n);
            buf_append(&m->body, "\r\n", 2);
        }
        p = nl ? nl + 1 : end;
    }
    return 0;
}

void pf_free(struct pf_msg *m)
{
    while (m->nh)
        drop_hdr(m, m->nh - 1);
    free(m->h);
    buf_free(&m->body);
    buf_free(&m->newbody);
    free(m->sender);
    for (size_t i = 0; i < m->nrcpts; i++)
        free(m->rcpts[i]);
    free(m->rcpts);
    free(m->quarantine);
    memset(m, 0, sizeof *m);
}

int pf_add_trace(struct pf_msg *m, const char *text)
{
    size_t k = name_len(text, strlen(text));
    return insert_hdr(m, 0, dupn(text, k), dupn(text, strlen(text)),
                      dupn("", 0), 1);
}

static int same_addr(const char *a, const char *b)
{
    size_t an = strlen(a), bn = strlen(b);
    if (an >= 2 && a[0] == '<' && a[an - 1] == '>')
        a++, an -= 2;
    if (bn >= 2 && b[0] == '<' && b[bn - 1] == '>')
        b++, bn -= 2;
    return an == bn && strncasecmp(a, b, an) == 0;
}

int pf_add_rcpt(struct pf_msg *m, const char *addr)
{
    for (size_t i = 0; i < m->nrcpts; i++)
        if (same_addr(m->rcpts[i], addr))
            return 0; /* Postfix suppresses duplicates */
    char **r = realloc(m->rcpts, (m->nrcpts + 1) * sizeof *r);
    if (!r)
        return -1;
    m->rcpts = r;
    r[m->nrcpts] = strdup(addr);
    return r[m->nrcpts++] ? 0 : -1;
}

int pf_set_sender(struct pf_msg *m, const char *addr)
{
    free(m->sender);
    m->sender = strdup(addr);
    return m->sender ? 0 : -1;
}

/* Splits a payload into its NUL-terminated strings. */
static int strs(const uint8_t *p, size_t len, struct wire_str *out, int max)
{
    size_t pos = 0;
    int n = 0;
    while (pos < len && n < max) {
        const char *s = (const char *)p + pos;
        const char *nul = memchr(s, '\0', len - pos);
        if (!nul)
            return -1;
        out[n].p = s;
        out[n++].n = (size_t)(nul - s);
        pos += out[n - 1].n + 1;
    }
    return n;
}

/* The idx-th (1-based, 0 means 1) header called name, skipping the trace. */
static long find_named(const struct pf_msg *m, struct wire_str name,
                       uint32_t idx)
{
    if (idx == 0)
        idx = 1;
    for (size_t i = 0; i < m->nh; i++)
        if (!m->h[i].hidden && strlen(m->h[i].name) == name.n &&
            strncasecmp(m->h[i].name, name.p, name.n) == 0 && --idx == 0)
            return (long)i;
    return -1;
}

int pf_apply(struct pf_msg *m, uint8_t cmd, const uint8_t *p, size_t len,
             const char **err)
{
    struct wire_str s[3];
    uint32_t idx = 0;
    int n;
    if (m->replaced == 1 && cmd != WIRE_R_REPLBODY)
        m->replaced = 2; /* body packets must be contiguous */
    switch (cmd) {
    case WIRE_R_ADDHEADER:
        if (strs(p, len, s, 2) != 2)
            goto bad;
        return make_hdr(m, m->nh, s[0], s[1]);
    case WIRE_R_INSHEADER:
    case WIRE_R_CHGHEADER:
        if (len < 4 || strs(p + 4, len - 4, s, 2) != 2)
            goto bad;
        idx = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
              (uint32_t)p[2] << 8 | p[3];
        if (cmd == WIRE_R_INSHEADER)
            return make_hdr(m, idx, s[0], s[1]);
        long at = find_named(m, s[0], idx);
        if (at < 0)
            return s[1].n ? make_hdr(m, m->nh, s[0], s[1]) : 0;
        drop_hdr(m, (size_t)at);
        return s[1].n ? make_hdr(m, (size_t)at, s[0], s[1]) : 0;
    case WIRE_R_CHGFROM:
        n = strs(p, len, s, 2);
        if (n < 1)
            goto bad;
        free(m->sender);
        m->sender = dupn(s[0].p, s[0].n);
        return 0;
    case WIRE_R_ADDRCPT:
    case WIRE_R_ADDRCPT_PAR: {
        if (strs(p, len, s, 2) < 1)
            goto bad;
        char *a = dupn(s[0].p, s[0].n);
        int rc = a ? pf_add_rcpt(m, a) : -1;
        free(a);
        return rc;
    }
    case WIRE_R_DELRCPT: {
        if (strs(p, len, s, 1) != 1)
            goto bad;
        char *a = dupn(s[0].p, s[0].n);
        for (size_t i = 0; a && i < m->nrcpts;) {
            if (same_addr(m->rcpts[i], a)) {
                free(m->rcpts[i]);
                memmove(&m->rcpts[i], &m->rcpts[i + 1],
                        (--m->nrcpts - i) * sizeof *m->rcpts);
            } else {
                i++;
            }
        }
        free(a);
        return 0;
    }
    case WIRE_R_REPLBODY:
        if (m->replaced == 2) {
            *err = "body replacement interleaved with other changes";
            return -1;
        }
        m->replaced = 1;
        return buf_append(&m->newbody, p, len);
    case WIRE_R_QUARANTINE:
        if (strs(p, len, s, 1) != 1)
            goto bad;
        free(m->quarantine);
        m->quarantine = dupn(s[0].p, s[0].n);
        return 0;
    case WIRE_R_PROGRESS:
        return 0;
    default:
        *err = "not a modification";
        return -1;
    }
bad:
    *err = "malformed modification packet";
    return -1;
}

/*
 * Appends text with every LF written as CRLF. In a body a CRLF stays one
 * line end; in a header a CR before LF is kept, as Postfix stores it.
 */
static void put_crlf(struct buf *out, const char *p, size_t n, int body)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\n') {
            buf_append(out, "\r\n", 2);
        } else if (body && p[i] == '\r' && i + 1 < n && p[i + 1] == '\n') {
            continue;
        } else {
            buf_append_byte(out, (uint8_t)p[i]);
        }
    }
}

int pf_render(struct pf_msg *m, struct buf *out)
{
    for (size_t i = 0; i < m->nh; i++) {
        put_crlf(out, m->h[i].text, strlen(m->h[i].text), 0);
        buf_append(out, "\r\n", 2);
    }
    if (m->replaced) {
        buf_append(out, "\r\n", 2);
        size_t n = buf_len(&m->newbody);
        put_crlf(out, (const char *)buf_head(&m->newbody), n, 1);
        if (n && buf_head(&m->newbody)[n - 1] != '\n')
            buf_append(out, "\r\n", 2); /* Postfix ends the last line */
    } else if (m->has_body) {
        buf_append(out, "\r\n", 2);
        buf_append(out, buf_head(&m->body), buf_len(&m->body));
    }
    return 0;
}
