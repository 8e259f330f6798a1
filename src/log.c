/* log: see log.h. */
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <time.h>

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

/* Appends s to out as the inside of a JSON string; returns the new length. */
static size_t json_escape(char *out, size_t pos, size_t cap, const char *s)
{
    for (; *s && pos + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[pos++] = '\\';
            out[pos++] = (char)c;
        } else if (c < 0x20) {
            pos += (size_t)snprintf(out + pos, cap - pos, "\\u%04x", c);
        } else {
            out[pos++] = (char)c;
        }
    }
    out[pos] = '\0';
    return pos;
}

void log_vmsg(int level, uint64_t cid, const char *qid, const char *fmt,
              va_list ap)
{
    static const int prio[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};
    char msg[4096], tag[96] = "";
    if (!log_enabled(level))
        return;
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (cid && qid && *qid)
        snprintf(tag, sizeof tag, "[c=%llu g=%u q=%s] ",
                 (unsigned long long)cid, log_gen, qid);
    else if (cid)
        snprintf(tag, sizeof tag, "[c=%llu g=%u] ", (unsigned long long)cid,
                 log_gen);
    if (to_syslog) {
        syslog(prio[level], "%s %s%s", upper[level], tag, msg);
        return;
    }
    char ts[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
    if (json_format) {
        char line[8192];
        size_t n = (size_t)snprintf(line, sizeof line,
                                    "{\"ts\":\"%s\",\"level\":\"%s\"", ts,
                                    names[level]);
        if (cid)
            n += (size_t)snprintf(line + n, sizeof line - n,
                                  ",\"conn\":%llu,\"gen\":%u",
                                  (unsigned long long)cid, log_gen);
        if (qid && *qid) {
            n += (size_t)snprintf(line + n, sizeof line - n, ",\"qid\":\"");
            n = json_escape(line, n, sizeof line - 8, qid);
            n += (size_t)snprintf(line + n, sizeof line - n, "\"");
        }
        n += (size_t)snprintf(line + n, sizeof line - n, ",\"msg\":\"");
        n = json_escape(line, n, sizeof line - 8, msg);
        fprintf(stderr, "%s\"}\n", line);
    } else {
        fprintf(stderr, "%s %s %s%s\n", ts, upper[level], tag, msg);
    }
}

void log_msg(int level, uint64_t cid, const char *qid, const char *fmt, ...)
{
    va_list ap;
    if (!log_enabled(level))
        return;
    va_start(ap, fmt);
    log_vmsg(level, cid, qid, fmt, ap);
    va_end(ap);
}
