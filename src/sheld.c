/*
 * sheld: the held headers of a session (see sess.h, ops.headers). Where
 * the MTA sends HEADER reply-free (SESS_NR_HELD), a header is recorded as
 * it comes and its handler runs later, with the other headers that came
 * in the same read, in one call: before the next command of another kind,
 * before a header the message's limits would refuse, every HELD_MAX
 * headers, and once the read is handled (sess_flush). The handlers run in
 * the order the headers came, each seeing the headers up to its own
 * (s->hdrs_run); the first verdict that ends the message ends the batch,
 * and the headers after it are dropped as if read after the end.
 */
#include "sess.h"
#include "sess_int.h"

#include "log.h"

#define HELD_MAX 64 /* headers per batch */

int sess_held_first(const struct sess *s, const struct wire_cmd *c)
{
    if (s->hdrs_run >= s->nhdrs)
        return 0;
    switch (c->cmd) {
    case WIRE_HEADER:
        return s->nhdrs - s->hdrs_run >= HELD_MAX || !sess_header_fits(s, c);
    case WIRE_MACRO: /* Postfix's {i} before every header changes nothing */
        return !sess_macros_same(s, c);
    default: return 1;
    }
}

int sess_held_done(struct sess *s, struct verdict *v, struct buf *out)
{
    int rc = sess_event_done(s, SE_HEADER, v, out);
    if (s->msg != MSG_OPEN)
        s->nhdrs = s->hdrs_run; /* the rest came after the message's end */
    return rc;
}

int sess_run_held(struct sess *s, struct buf *out)
{
    while (s->msg == MSG_OPEN && s->hdrs_run < s->nhdrs) {
        struct verdict v;
        verdict_clear(&v);
        uint32_t first = s->hdrs_run;
        if (log_enabled(LL_DEBUG))
            log_msg(LL_DEBUG, s->id, sess_qid(s),
                    "the header handler runs for %u held header(s) in one "
                    "call", (unsigned)(s->nhdrs - first));
        s->wait.cmd = WIRE_HEADER;
        s->wait.reply = 0;
        int rc = s->ops->headers(s->ud, s, first, s->nhdrs - first, &v);
        if (rc == SESS_CALL_WAIT) {
            s->wait.ev = SE_HEADER;
            s->wait.held = 1;
            s->waiting = 1;
            return SESS_WAIT;
        }
        if (s->hdrs_run <= first) /* failed before its first handler ran */
            s->hdrs_run = first + 1;
        if (rc < 0)
            sess_stage_on_error(s, SE_HEADER, &v);
        if (sess_held_done(s, &v, out) != SESS_OK)
            return SESS_CLOSE;
    }
    return SESS_OK;
}

int sess_flush(struct sess *s, struct buf *out)
{
    if (s->waiting || s->hdrs_run >= s->nhdrs)
        return SESS_OK;
    return sess_run_held(s, out);
}
