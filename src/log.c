/* log: see log.h. */
#include "log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

int log_level = LL_INFO;
unsigned log_gen;
static int json_format;
static int to_syslog;

static const char *const names[] = {"error", "warn", "info", "debug"};
static const char *const upper[] = {"ERROR", "WARN", "INFO", "DEBUG"};

int log_parse_level(const char *name, int *out)
{
    for (int i = 0; i <= LL_DEBUG; i++) {
        if (strcmp(name, names[i]) == 0) {
            *out = i;
            return 0;
        }
    }
    return -1;
}

int log_set_format(const char *name)
{
    if (strcmp(name, "text") == 0)
        json_format = 0;
    else if (strcmp(name, "json") == 0)
        json_format = 1;
    else
        return -1;
    return 0;
}

void log_use_syslog(const char *ident)
{
    openlog(ident, LOG_PID | LOG_NDELAY, LOG_MAIL);
    to_syslog = 1;
}

/* The line's time, "2026-12-01T16:40:00Z": formatted once a second. */
static const char *timestamp(void)
{
    static _Thread_local time_t last = (time_t)-1;
    static _Thread_local char ts[32];
    time_t now = time(NULL);
    if (now != last) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
        last = now;
    }
    return ts;
}

/* A syslog line: "LEVEL [tag] msg" (syslog adds the time). */
static void emit_syslog(int level, const char *tag, const char *msg)
{
    static const int prio[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};
    syslog(prio[level], "%s %s%s", upper[level], tag, msg);
}

char *log_digits(char *end, unsigned long long v)
{
    do
        *--end = (char)('0' + v % 10);
    while ((v /= 10) > 0);
    return end;
}

/* The text tag of a line: "[c=1 g=2 q=ABC] ", or "" when cid is 0. */
/* Appends s (or v in decimal when s is NULL) at tag[*k], within n. */
static void tag_put(char *tag, size_t n, size_t *k, const char *s,
                    unsigned long long v)
{
    char num[24];
    if (!s) {
        num[sizeof num - 1] = '\0';
        s = log_digits(num + sizeof num - 1, v);
    }
    while (*s && *k + 1 < n)
        tag[(*k)++] = *s++;
    tag[*k] = '\0';
}

/* (every line has one: built without printf) */
static void make_tag(char *tag, size_t n, uint64_t cid, const char *qid)
{
    size_t k = 0;
    *tag = '\0';
    if (!cid)
        return;
    tag_put(tag, n, &k, "[c=", 0);
    tag_put(tag, n, &k, NULL, (unsigned long long)cid);
    tag_put(tag, n, &k, " g=", 0);
    tag_put(tag, n, &k, NULL, log_gen);
    if (qid && *qid) {
        tag_put(tag, n, &k, " q=", 0);
        tag_put(tag, n, &k, qid, 0);
    }
    tag_put(tag, n, &k, "] ", 0);
}

void log_vmsg(int level, uint64_t cid, const char *qid, const char *fmt,
              va_list ap)
{
    char msg[4096];
    if (!log_enabled(level))
        return;
    vsnprintf(msg, sizeof msg, fmt, ap);
    log_fields(level, cid, qid, msg, NULL, 0);
}

void (log_msg)(int level, uint64_t cid, const char *qid, const char *fmt,
               ...)
{
    va_list ap;
    if (!log_enabled(level))
        return;
    va_start(ap, fmt);
    log_vmsg(level, cid, qid, fmt, ap);
    va_end(ap);
}

int log_is_json(void) { return json_format; }

/* A line being built: in its own buffer first, then on the heap up to
 * LINE_CAP, then truncated. */
#define LINE_CAP (64 * 1024)
#define LINE_INLINE 1024
struct line {
    char *p;
    size_t n, cap;
    char inl[LINE_INLINE];
};

static void line_init(struct line *l)
{
    l->p = l->inl;
    l->n = 0;
    l->cap = sizeof l->inl;
    l->inl[0] = '\0';
}

static void line_free(struct line *l)
{
    if (l->p != l->inl)
        free(l->p);
}

static void put(struct line *l, const char *s, size_t n)
{
    if (l->n + n + 1 > l->cap && l->cap < LINE_CAP) {
        size_t cap = l->cap;
        while (cap < l->n + n + 1 && cap < LINE_CAP)
            cap *= 2;
        char *p = l->p == l->inl ? malloc(cap) : realloc(l->p, cap);
        if (p) {
            if (l->p == l->inl)
                memcpy(p, l->inl, l->n + 1);
            l->p = p;
            l->cap = cap;
        }
    }
    if (l->n + n + 1 > l->cap)
        n = l->cap - l->n - 1;
    memcpy(l->p + l->n, s, n);
    l->n += n;
    l->p[l->n] = '\0';
}

/* Writes the line and a newline to stderr in one write(2), so that the
 * workers' lines never interleave (a full line: its last byte gives way). */
static void line_emit(struct line *l)
{
    l->p[l->n] = '\n';
    const char *s = l->p;
    size_t left = l->n + 1;
    while (left > 0) {
        ssize_t w = write(2, s, left);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        s += w;
        left -= (size_t)w;
    }
    l->p[l->n] = '\0';
}

static void puts_(struct line *l, const char *s) { put(l, s, strlen(s)); }

/* s[0..n) as the inside of a JSON string. */
static void put_escaped(struct line *l, const char *s, size_t n)
{
    size_t run = 0;
    for (size_t k = 0; k < n; k++) {
        unsigned char c = (unsigned char)s[k];
        if (c != '"' && c != '\\' && c >= 0x20)
            continue;
        put(l, s + run, k - run);
        char esc[8];
        if (c == '"' || c == '\\')
            snprintf(esc, sizeof esc, "\\%c", c);
        else if (c == '\n')
            snprintf(esc, sizeof esc, "\\n");
        else
            snprintf(esc, sizeof esc, "\\u%04x", c);
        puts_(l, esc);
        run = k + 1;
    }
    put(l, s + run, n - run);
}

/* Bytes a text value cannot carry bare: controls, space, '"', '=', '\\'
 * and DEL (bit 0); the bytes of a bare key, [A-Za-z0-9_.-] (bit 1). */
static const unsigned char cclass[256] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 0,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 1, 0, 0,
    0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 1, 0, 0, 2,
    0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 1,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
};

static int needs_quotes(const char *s, size_t n)
{
    if (n == 0)
        return 1;
    for (size_t k = 0; k < n; k++)
        if (cclass[(unsigned char)s[k]] & 1)
            return 1;
    return 0;
}

static void put_text_value(struct line *l, const char *s, size_t n)
{
    if (!needs_quotes(s, n)) {
        put(l, s, n);
        return;
    }
    puts_(l, "\"");
    put_escaped(l, s, n);
    puts_(l, "\"");
}

static int key_char(char ch) { return cclass[(unsigned char)ch] & 2; }

/* The line's own keys: a field of that name gets a '_' before it. */
static int own_key(const char *key)
{
    switch (key[0]) {
    case 't': return strcmp(key, "ts") == 0;
    case 'l': return strcmp(key, "level") == 0;
    case 'c': return strcmp(key, "conn") == 0;
    case 'g': return strcmp(key, "gen") == 0;
    case 'q': return strcmp(key, "qid") == 0;
    case 'm': return strcmp(key, "msg") == 0;
    default: return 0;
    }
}

static void put_key(struct line *l, const char *key)
{
    if (!*key || own_key(key))
        puts_(l, "_");
    size_t n = 0;
    while (key[n] && key_char(key[n]))
        n++;
    put(l, key, n); /* the usual key, whole; then any odd one's rest */
    for (const char *c = key + n; *c; c++) {
        char ch = key_char(*c) ? *c : '_';
        put(l, &ch, 1);
    }
}

/* secs >= 0 as "%.6f" would print it, without printf's cost. */
static void put_secs(struct line *l, double secs)
{
    long long us = (long long)(secs * 1e6 + 0.5);
    char num[32], *p = num + sizeof num;
    long long frac = us % 1000000;
    for (int k = 0; k < 6; k++, frac /= 10)
        *--p = (char)('0' + frac % 10);
    *--p = '.';
    p = log_digits(p, (unsigned long long)(us / 1000000));
    put(l, p, (size_t)(num + sizeof num - p));
}

static void put_int(struct line *l, long long v)
{
    char num[24];
    char *p = log_digits(num + sizeof num, v < 0 ? 0ull - (unsigned long long)v
                                             : (unsigned long long)v);
    if (v < 0)
        *--p = '-';
    put(l, p, (size_t)(num + sizeof num - p));
}

static void put_number(struct line *l, const struct log_field *f)
{
    char num[40];
    if (f->type == LF_INT) {
        put_int(l, f->i);
        return;
    } else if (f->type == LF_SECS) {
        put_secs(l, f->num >= 0 && f->num < 1e9 ? f->num : 0.0);
        return;
    }
    else if (f->num != f->num || f->num - f->num != 0) /* nan, inf */
        snprintf(num, sizeof num, json_format ? "null" : "%g", f->num);
    else if (f->num < 1e15 && f->num > -1e15 &&
             f->num == (double)(long long)f->num) {
        put_int(l, (long long)f->num);
        return;
    } else
        snprintf(num, sizeof num, "%.6g", f->num);
    puts_(l, num);
}

static void put_field(struct line *l, const struct log_field *f)
{
    if (json_format) {
        puts_(l, ",\"");
        put_key(l, f->key);
        puts_(l, "\":");
    } else {
        puts_(l, " ");
        put_key(l, f->key);
        puts_(l, "=");
    }
    switch (f->type) {
    case LF_INT:
    case LF_NUM:
    case LF_SECS: put_number(l, f); break;
    case LF_BOOL: puts_(l, f->i ? "true" : "false"); break;
    case LF_LIST: {
        /* text: the elements joined by commas, quoted as one value (a
         * comma needs no quotes: an element or an empty list does) */
        int quote = !json_format && f->n == 0;
        const char *s = f->s;
        for (size_t k = 0; !json_format && !quote && k < f->n; k++) {
            size_t len = strlen(s);
            quote = needs_quotes(s, len) && (len > 0 || f->n == 1);
            s += len + 1;
        }
        puts_(l, json_format ? "[" : quote ? "\"" : "");
        s = f->s;
        for (size_t k = 0; k < f->n; k++) {
            size_t len = strlen(s);
            if (json_format) {
                puts_(l, k ? ",\"" : "\"");
                put_escaped(l, s, len);
                puts_(l, "\"");
            } else {
                if (k)
                    puts_(l, ",");
                if (quote)
                    put_escaped(l, s, len);
                else
                    put(l, s, len);
            }
            s += len + 1;
        }
        puts_(l, json_format ? "]" : quote ? "\"" : "");
        break;
    }
    default:
        if (json_format) {
            puts_(l, "\"");
            put_escaped(l, f->s, f->n);
            puts_(l, "\"");
        } else {
            put_text_value(l, f->s, f->n);
        }
        break;
    }
}

void log_fields(int level, uint64_t cid, const char *qid, const char *msg,
                const struct log_field *f, size_t nf)
{
    if (!log_enabled(level))
        return;
    struct line l;
    line_init(&l);
    char tmp[160];
    if (json_format && !to_syslog) {
        snprintf(tmp, sizeof tmp, "{\"ts\":\"%s\",\"level\":\"%s\"",
                 timestamp(), names[level]);
        puts_(&l, tmp);
        if (cid) {
            snprintf(tmp, sizeof tmp, ",\"conn\":%llu,\"gen\":%u",
                     (unsigned long long)cid, log_gen);
            puts_(&l, tmp);
        }
        if (qid && *qid) {
            puts_(&l, ",\"qid\":\"");
            put_escaped(&l, qid, strlen(qid));
            puts_(&l, "\"");
        }
        puts_(&l, ",\"msg\":\"");
        put_escaped(&l, msg, strlen(msg));
        puts_(&l, "\"");
        for (size_t k = 0; k < nf; k++)
            put_field(&l, &f[k]);
        puts_(&l, "}");
        line_emit(&l);
        line_free(&l);
        return;
    }
    int json = json_format;
    json_format = 0; /* syslog lines are text */
    make_tag(tmp, sizeof tmp, cid, qid);
    if (!to_syslog) { /* "TS LEVEL [tag] msg fields" */
        puts_(&l, timestamp());
        puts_(&l, " ");
        puts_(&l, upper[level]);
        puts_(&l, " ");
        puts_(&l, tmp);
    }
    puts_(&l, msg);
    for (size_t k = 0; k < nf; k++)
        put_field(&l, &f[k]);
    json_format = json;
    if (to_syslog)
        emit_syslog(level, tmp, l.p);
    else
        line_emit(&l);
    line_free(&l);
}
