/*
 * log: leveled log lines tagged with a connection id and queue id.
 *
 * Text format: "2026-01-01T00:00:00Z LEVEL [c=12 q=4BDF8A72008] message".
 * JSON format: one object a line. Once daemonized, lines go to syslog.
 * Depends on nothing else in luamilter (no Lua, no libev).
 */
#ifndef LUAMILTER_LOG_H
#define LUAMILTER_LOG_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

enum log_level { LL_ERR = 0, LL_WARN, LL_INFO, LL_DEBUG };

extern int log_level; /* lines above this level are dropped */
/* Script generation of the connection being served (0: none); the loop
 * sets it around each connection's callbacks so every line is tagged. */
extern unsigned log_gen;

/* Returns 0 and sets *out for "error", "warn", "info", "debug"; else -1. */
int log_parse_level(const char *name, int *out);
/* Selects "text" or "json"; returns -1 for anything else. */
int log_set_format(const char *name);
/* From now on, write to syslog (ident borrowed, must outlive the process). */
void log_use_syslog(const char *ident);

/*
 * Writes one line. cid 0 means "not about a connection"; qid may be NULL.
 * The message is formatted only when the level is enabled.
 */
void log_msg(int level, uint64_t cid, const char *qid, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void log_vmsg(int level, uint64_t cid, const char *qid, const char *fmt,
              va_list ap);

#define log_enabled(lvl) ((lvl) <= log_level)
/* A line whose level is off costs one comparison: its arguments (a queue
 * id's lookup, say) are not even evaluated. */
#define log_msg(level, ...)                                                  \
    do {                                                                     \
        if (log_enabled(level))                                              \
            (log_msg)(level, __VA_ARGS__);                                   \
    } while (0)

/*
 * A line made of fields: in --log-format json each field is a member of the
 * line's object (after ts, level, conn, gen, qid and msg); in text they
 * follow msg as key=value, the value quoted ("...", JSON escapes) when it is
 * empty or holds a space, a quote, '=' or a control byte. A key that is
 * not [A-Za-z0-9_.-]+ has the other bytes replaced by '_'; a key that is
 * one of the line's own (ts, level, conn, gen, qid, msg) gets a leading
 * '_'. LF_LIST is n NUL-terminated strings one after the other in s: a
 * JSON array, comma-separated in text. Borrows everything.
 */
/* LF_SECS: a duration in seconds, num, written to the microsecond
 * (0.000058, never 5.8e-05) */
enum log_ftype { LF_STR, LF_INT, LF_NUM, LF_BOOL, LF_LIST, LF_SECS };
struct log_field {
    const char *key;
    int type;          /* enum log_ftype */
    const char *s;     /* LF_STR (n bytes), LF_LIST (n strings) */
    size_t n;
    double num;        /* LF_NUM */
    long long i;       /* LF_INT, LF_BOOL */
};
void log_fields(int level, uint64_t cid, const char *qid, const char *msg,
                const struct log_field *f, size_t nf);
/* Whether lines are JSON (--log-format json). */
int log_is_json(void);

/* v in decimal, written backwards to end at end (exclusive): returns where
 * it starts. At most 20 characters. */
char *log_digits(char *end, unsigned long long v);

#endif
