/* metrics: see metrics.h. */
#define _GNU_SOURCE
#include "metrics.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

const double metrics_le[METRICS_NBUCKETS] = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05,   0.1,     0.25,   0.5,   1,      2.5,   10};
const char *const metrics_kind_names[MK__COUNT] = {"dns",  "tcp",   "redis",
                                                   "http", "sleep", "store"};
const char *const metrics_result_names[MR__COUNT] = {"ok", "error",
                                                     "timeout"};
const char *const metrics_store_names[METRICS_NSTORE] = {"get", "set", "del",
                                                         "incr"};

struct metrics_slot *metrics_cur;

struct metrics_slot *metrics_map(int n)
{
    void *p = mmap(NULL, (size_t)n * sizeof(struct metrics_slot),
                   PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p; /* anonymous: zeroed */
}

void metrics_observe(struct metrics_hist *h, double secs)
{
    int b = 0;
    while (b < METRICS_NBUCKETS && secs > metrics_le[b])
        b++;
    metrics_add(&h->bucket[b], 1);
    metrics_add(&h->sum_ns, secs > 0 ? (uint64_t)(secs * 1e9) : 0);
    metrics_add(&h->count, 1);
}

void metrics_conn_open(void)
{
    if (metrics_cur) {
        metrics_add(&metrics_cur->connections, 1);
        metrics_add(&metrics_cur->conns_open, 1);
    }
}

void metrics_conn_close(void)
{
    if (metrics_cur && metrics_get(&metrics_cur->conns_open))
        metrics_add(&metrics_cur->conns_open, (uint64_t)-1);
}

void metrics_message(int mv)
{
    if (metrics_cur && mv >= 0 && mv < MV__COUNT)
        metrics_add(&metrics_cur->messages[mv], 1);
}

void metrics_rcpt_refused(void)
{
    if (metrics_cur)
        metrics_add(&metrics_cur->rcpts_refused, 1);
}

void metrics_call(int ev)
{
    if (metrics_cur && ev >= 0 && ev < SE__COUNT)
        metrics_add(&metrics_cur->calls[ev], 1);
}

void metrics_call_done(int ev, int failed, double secs)
{
    if (!metrics_cur || ev < 0 || ev >= SE__COUNT)
        return;
    if (failed)
        metrics_add(&metrics_cur->errors[ev], 1);
    metrics_observe(&metrics_cur->handler[ev], secs);
}

void metrics_lookup(int kind, int result, double secs)
{
    if (!metrics_cur || kind < 0 || kind >= MK__COUNT || result < 0 ||
        result >= MR__COUNT)
        return;
    metrics_add(&metrics_cur->lookups[kind][result], 1);
    metrics_observe(&metrics_cur->lookup[kind], secs);
}

void metrics_store(int op, int failed)
{
    if (metrics_cur && op >= 0 && op < METRICS_NSTORE)
        metrics_add(&metrics_cur->store[op][failed ? 1 : 0], 1);
}

/* ---- the Prometheus text format ---------------------------------------- */

struct out {
    char *p;
    size_t n, cap;
    int failed;
};

static void emit(struct out *o, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void emit(struct out *o, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = o->cap - o->n;
        int w = o->p ? vsnprintf(o->p + o->n, room, fmt, ap) : -1;
        va_end(ap);
        if (o->p && w >= 0 && (size_t)w < room) {
            o->n += (size_t)w;
            return;
        }
        if (o->failed)
            return;
        size_t cap = o->cap ? o->cap * 2 : 16384;
        char *p = realloc(o->p, cap);
        if (!p) {
            o->failed = 1;
            return;
        }
        o->p = p;
        o->cap = cap;
    }
}

static void head(struct out *o, const char *name, const char *type,
                 const char *help)
{
    emit(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Sums the field at byte offset off (a uint64_t) over the slots. */
static uint64_t sum(const struct metrics_slot *s, int n, size_t off)
{
    uint64_t t = 0;
    for (int i = 0; i < n; i++)
        t += metrics_get((const uint64_t *)((const char *)&s[i] + off));
    return t;
}
#define SUM(field) sum(slots, n, offsetof(struct metrics_slot, field))

static void hist(struct out *o, const char *name, const char *label,
                 const char *value, const struct metrics_slot *slots, int n,
                 size_t off)
{
    uint64_t cum = 0;
    for (int b = 0; b <= METRICS_NBUCKETS; b++) {
        cum += sum(slots, n, off + offsetof(struct metrics_hist, bucket) +
                                 (size_t)b * sizeof(uint64_t));
        if (b < METRICS_NBUCKETS)
            emit(o, "%s_bucket{%s=\"%s\",le=\"%g\"} %llu\n", name, label,
                 value, metrics_le[b], (unsigned long long)cum);
        else
            emit(o, "%s_bucket{%s=\"%s\",le=\"+Inf\"} %llu\n", name, label,
                 value, (unsigned long long)cum);
    }
    uint64_t ns = sum(slots, n, off + offsetof(struct metrics_hist, sum_ns));
    emit(o, "%s_sum{%s=\"%s\"} %.9g\n", name, label, value, (double)ns / 1e9);
    emit(o, "%s_count{%s=\"%s\"} %llu\n", name, label, value,
         (unsigned long long)sum(slots, n,
                                 off + offsetof(struct metrics_hist, count)));
}

int metrics_render(const struct metrics_slot *slots, int n,
                   const struct metrics_super *sup, char **res, size_t *len)
{
    struct out o = {0};
    head(&o, "luamilter_connections_total", "counter",
         "MTA connections accepted by the workers.");
    emit(&o, "luamilter_connections_total %llu\n",
         (unsigned long long)SUM(connections));
    head(&o, "luamilter_connections_open", "gauge",
         "MTA connections open now.");
    emit(&o, "luamilter_connections_open %llu\n",
         (unsigned long long)SUM(conns_open));
    head(&o, "luamilter_messages_total", "counter",
         "Messages by final verdict (abort: the MTA gave up on it).");
    for (int v = 0; v < MV__COUNT; v++)
        emit(&o, "luamilter_messages_total{verdict=\"%s\"} %llu\n",
             msglog_verdict_names[v], (unsigned long long)SUM(messages[v]));
    head(&o, "luamilter_recipients_refused_total", "counter",
         "Recipients refused (reject or tempfail at envrcpt).");
    emit(&o, "luamilter_recipients_refused_total %llu\n",
         (unsigned long long)SUM(rcpts_refused));
    head(&o, "luamilter_handler_calls_total", "counter",
         "Handler calls by event.");
    for (int e = 0; e < SE__COUNT; e++)
        emit(&o, "luamilter_handler_calls_total{event=\"%s\"} %llu\n",
             sess_event_names[e], (unsigned long long)SUM(calls[e]));
    head(&o, "luamilter_handler_errors_total", "counter",
         "Handler calls that raised or returned a bad verdict.");
    for (int e = 0; e < SE__COUNT; e++)
        emit(&o, "luamilter_handler_errors_total{event=\"%s\"} %llu\n",
             sess_event_names[e], (unsigned long long)SUM(errors[e]));
    head(&o, "luamilter_handler_duration_seconds", "histogram",
         "Wall-clock time of a handler call, its lookups included.");
    for (int e = 0; e < SE__COUNT; e++)
        hist(&o, "luamilter_handler_duration_seconds", "event",
             sess_event_names[e], slots, n,
             offsetof(struct metrics_slot, handler) +
                 (size_t)e * sizeof(struct metrics_hist));
    head(&o, "luamilter_lookups_total", "counter",
         "Lookups a handler waited on, by kind and result.");
    for (int k = 0; k < MK__COUNT; k++)
        for (int r = 0; r < MR__COUNT; r++)
            emit(&o, "luamilter_lookups_total{kind=\"%s\",result=\"%s\"} "
                     "%llu\n",
                 metrics_kind_names[k], metrics_result_names[r],
                 (unsigned long long)SUM(lookups[k][r]));
    head(&o, "luamilter_lookup_duration_seconds", "histogram",
         "Time a handler waited on one lookup.");
    for (int k = 0; k < MK__COUNT; k++)
        hist(&o, "luamilter_lookup_duration_seconds", "kind",
             metrics_kind_names[k], slots, n,
             offsetof(struct metrics_slot, lookup) +
                 (size_t)k * sizeof(struct metrics_hist));
    head(&o, "luamilter_store_operations_total", "counter",
         "milter.store calls by operation and result.");
    for (int op = 0; op < METRICS_NSTORE; op++)
        for (int r = 0; r < 2; r++)
            emit(&o, "luamilter_store_operations_total{op=\"%s\","
                     "result=\"%s\"} %llu\n",
                 metrics_store_names[op], r ? "error" : "ok",
                 (unsigned long long)SUM(store[op][r]));
    head(&o, "luamilter_reloads_total", "counter",
         "Reloads (SIGHUP) by result: ok, or failed (the old generation "
         "kept serving).");
    emit(&o, "luamilter_reloads_total{result=\"ok\"} %llu\n",
         (unsigned long long)sup->reloads_ok);
    emit(&o, "luamilter_reloads_total{result=\"failed\"} %llu\n",
         (unsigned long long)sup->reloads_failed);
    head(&o, "luamilter_generation", "gauge",
         "Generation of the script the supervisor hands the workers.");
    emit(&o, "luamilter_generation %u\n", sup->generation);
    head(&o, "luamilter_worker_restarts_total", "counter",
         "Workers that died and were replaced.");
    emit(&o, "luamilter_worker_restarts_total %llu\n",
         (unsigned long long)sup->restarts);
    head(&o, "luamilter_workers", "gauge", "Worker processes configured.");
    emit(&o, "luamilter_workers %d\n", sup->workers);
    head(&o, "luamilter_workers_ready", "gauge",
         "Workers running with a script loaded.");
    emit(&o, "luamilter_workers_ready %d\n", sup->workers_ready);
    if (o.failed) {
        free(o.p);
        return -1;
    }
    *res = o.p;
    *len = o.n;
    return 0;
}
