/*
 * metrics: the counters behind --metrics, kept in memory the supervisor
 * and its workers share (one MAP_SHARED anonymous mapping made before the
 * first fork). Each worker slot has its own block, written only by the
 * worker serving that slot, without locks: single-writer relaxed atomic
 * loads and stores, which the supervisor reads and sums. A replaced
 * worker's successor takes the same slot and adds on, so nothing a dead
 * worker counted is lost or reset (only its open-connections gauge, which
 * the supervisor zeroes when it reaps it).
 *
 * No libev, no Lua: the glue, the bridge and the supervisor call in.
 */
#ifndef LUAMILTER_METRICS_H
#define LUAMILTER_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "msglog.h"
#include "sess.h"

/* Histogram upper bounds (seconds), suited to milter latencies: handlers
 * and lookups from well under a millisecond to the default 10 s budget. */
#define METRICS_NBUCKETS 15
extern const double metrics_le[METRICS_NBUCKETS];

struct metrics_hist {
    uint64_t bucket[METRICS_NBUCKETS + 1]; /* per bound (not cumulative);
                                              the last: above every bound */
    uint64_t count;
    uint64_t sum_ns;
};

/* Lookup kinds and results, in the series' label order. */
enum metrics_kind { MK_DNS, MK_TCP, MK_REDIS, MK_HTTP, MK_SLEEP, MK_STORE,
                    MK__COUNT };
enum metrics_result { MR_OK, MR_ERROR, MR_TIMEOUT, MR__COUNT };
extern const char *const metrics_kind_names[MK__COUNT];
extern const char *const metrics_result_names[MR__COUNT];
/* milter.store operations (LSTORE_GET.. order) */
#define METRICS_NSTORE 4
extern const char *const metrics_store_names[METRICS_NSTORE];

struct metrics_slot {
    uint64_t connections, conns_open;
    uint64_t messages[MV__COUNT];
    uint64_t rcpts_refused;
    uint64_t calls[SE__COUNT], errors[SE__COUNT];
    struct metrics_hist handler[SE__COUNT];
    uint64_t lookups[MK__COUNT][MR__COUNT];
    struct metrics_hist lookup[MK__COUNT];
    uint64_t store[METRICS_NSTORE][2]; /* [op][0 ok, 1 error] */
};

/* This process's slot (a worker's), or NULL: nothing is counted. */
extern struct metrics_slot *metrics_cur;

/* The shared mapping for n slots, zeroed; NULL when mmap fails. */
struct metrics_slot *metrics_map(int n);

static inline void metrics_add(uint64_t *p, uint64_t n)
{
    /* one writer per slot: no read-modify-write atomics needed, only
     * untorn loads and stores */
    __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + n,
                     __ATOMIC_RELAXED);
}
static inline uint64_t metrics_get(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
void metrics_observe(struct metrics_hist *h, double secs);

/* Hooks; each does nothing when metrics_cur is NULL. */
void metrics_conn_open(void);
void metrics_conn_close(void);
void metrics_message(int mv);      /* enum msglog_verdict */
void metrics_rcpt_refused(void);
void metrics_call(int ev);
void metrics_call_done(int ev, int failed, double secs);
void metrics_lookup(int kind, int result, double secs);
void metrics_store(int op, int failed);

/* The supervisor's own numbers, and the Prometheus text of everything:
 * appends to *out (realloc'd, *len its length); 0, or -1 out of memory. */
struct metrics_super {
    uint64_t reloads_ok, reloads_failed, restarts;
    unsigned generation;
    int workers, workers_ready;
};
int metrics_render(const struct metrics_slot *slots, int n,
                   const struct metrics_super *sup, char **out, size_t *len);

#endif
