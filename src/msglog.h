/*
 * msglog: the one info line per message ("message ..."): connection and
 * queue id, client, sender, recipients accepted and refused, the final
 * verdict and the reply sent, the handler that decided it (file:line), the
 * modifications by kind and count, and the seconds spent in handlers and
 * in lookups. Fields, so that --log-format json has them as members.
 *
 * The glue keeps one record per connection, feeds it the handler and
 * lookup times and forwards the session's notes (sess_ops.note). Part of
 * the session layer's side of things: no libev, no Lua.
 */
#ifndef LUAMILTER_MSGLOG_H
#define LUAMILTER_MSGLOG_H

#include <stdint.h>

#include "buf.h"
#include "sess.h"

/* Final verdicts of a message, as the line and the metrics name them. */
enum msglog_verdict {
    MV_ACCEPT, MV_REJECT, MV_TEMPFAIL, MV_DISCARD, MV_ABORT, MV__COUNT
};
extern const char *const msglog_verdict_names[MV__COUNT];

struct msglog {
    uint32_t msg_seq;    /* the session's msg_seq this record is about */
    double handler_s;    /* seconds in the message's handlers */
    double lookup_s;     /* seconds its handlers waited on lookups */
    int last_ev, last_rc; /* the last handler call: its event, its result */
    char qid[64];        /* the queue id, once known */
    struct buf refused;  /* refused recipients, each NUL-terminated */
    uint32_t nrefused;   /* refused so far */
    uint32_t nlisted;    /* of them, in refused (at most 100) */
};

void msglog_init(struct msglog *m);
void msglog_free(struct msglog *m);
/* A monotonic clock in seconds, precise (for handler and lookup times). */
double msglog_clock(void);

/* Before a handler runs for s: a new message starts a new record. */
void msglog_touch(struct msglog *m, const struct sess *s);
/* A handler slice of ev ran secs and ended with rc (lb_call's result). */
void msglog_handler(struct msglog *m, int ev, int rc, double secs);
/* A handler waited secs on a lookup. */
static inline void msglog_lookup(struct msglog *m, double secs)
{
    m->lookup_s += secs;
}

/*
 * A session note (sess_ops.note): a refused recipient is recorded; the end
 * or abort of a message logs its line. site is where the deciding
 * handler is (file:line; NULL or "" when unknown); ask site_of for it
 * (called only when a handler decided). Returns the message's
 * enum msglog_verdict, or -1 for a note that ends no message.
 */
int msglog_note(struct msglog *m, const struct sess *s, int what, int ev,
                const struct verdict *v,
                const char *(*site_of)(void *ud, int ev), void *ud);

#endif
