/*
 * sess_int.h: what the session's two files share, sess.c (the state
 * machine, the message) and sconn.c (the connection's strings: macros per
 * command, client and HELO). Not for other layers.
 */
#ifndef LUAMILTER_SESS_INT_H
#define LUAMILTER_SESS_INT_H

#include <string.h>

#include "sess.h"

/* Why recording what a command carries failed. */
enum { REC_NOMEM = -1, REC_HEADERS = -2, REC_MSG_FULL = -3,
       REC_CONN_FULL = -4 };

/* Copies p[0..n) and a NUL into the arena; len = UINT32_MAX on failure. */
static inline struct sess_str sess_arena_put(struct buf *a, const char *p,
                                             size_t n)
{
    struct sess_str v = {(uint32_t)buf_len(a), (uint32_t)n};
    uint8_t *dst = buf_reserve(a, n + 1);
    if (!dst) {
        v.len = UINT32_MAX;
        return v;
    }
    if (n)
        memcpy(dst, p, n);
    dst[n] = 0;
    buf_commit(a, n + 1);
    return v;
}

/* Replaces a connection string (conn arena), counting the old bytes as
 * dead and compacting the arena when they are many; REC_* on failure. */
int sess_set_cstr(struct sess *s, struct sess_str *dst, const char *p,
                  size_t n);

/* Keeps a MACRO packet as its command's macros; REC_* on failure. */
int sess_store_macros(struct sess *s, const struct wire_cmd *c);

/* sess.c: an event's verdict sent and applied (SESS_OK or SESS_CLOSE);
 * the --on-error verdict as it applies at ev; whether the HEADER in c
 * fits the message's limits (record() would take it). */
int sess_event_done(struct sess *s, int ev, struct verdict *v,
                    struct buf *out);
void sess_stage_on_error(const struct sess *s, int ev, struct verdict *v);
int sess_header_fits(const struct sess *s, const struct wire_cmd *c);

/* sconn.c: whether storing the MACRO in c would change nothing. */
int sess_macros_same(const struct sess *s, const struct wire_cmd *c);

/* sheld.c: the held headers (see ops.headers). */
/* Whether the HEADER just recorded waits for a batch (reply: the MTA
 * waits for an answer to it). */
static inline int sess_holds_header(const struct sess *s, int reply)
{
    return !reply && s->ops->headers &&
           (s->cfg->handlers & SE_BIT(SE_HEADER));
}
/* Whether held headers must run before the command c is handled. */
int sess_held_first(const struct sess *s, const struct wire_cmd *c);
/* Runs them: SESS_OK, SESS_WAIT or SESS_CLOSE. */
int sess_run_held(struct sess *s, struct buf *out);
/* A batch ended with v (after a wait too): SESS_OK or SESS_CLOSE. */
int sess_held_done(struct sess *s, struct verdict *v, struct buf *out);

#endif
