/* sconn: the connection's strings of a session (see sess_int.h): the
 * macros, kept per command as the MTA sent them, and the conn arena they
 * live in with the client's name and address and the HELO. */
#include "sess_int.h"

#include <string.h>

#include "log.h"

/* Strips the braces of "{name}". */
static void bare_name(const char **p, size_t *n)
{
    if (*n >= 2 && (*p)[0] == '{' && (*p)[*n - 1] == '}') {
        (*p)++;
        *n -= 2;
    }
}

const char *sess_macro(const struct sess *s, const char *name, size_t len,
                       size_t *vlen)
{
    bare_name(&name, &len);
    for (unsigned i = 0; i < s->nmstages; i++) {
        struct sess_str l = s->mstages[i].list;
        /* a stored list is whole pairs of NUL-terminated strings (wire
         * checked it), so strlen stays inside it */
        const char *p = sess_cstr(s, l, 0), *end = p + l.len;
        while (p < end) {
            size_t kn = strlen(p);
            const char *k = p, *v = p + kn + 1;
            size_t vn = strlen(v);
            p = v + vn + 1;
            bare_name(&k, &kn);
            if (kn == len && (len == 0 || k[0] == name[0]) &&
                memcmp(k, name, len) == 0) {
                if (vlen)
                    *vlen = vn;
                return v;
            }
        }
    }
    return NULL;
}

const char *sess_qid(const struct sess *s)
{
    return sess_macro(s, "i", 1, NULL);
}

/* Rewrites the connection arena keeping only live strings. */
static void compact_carena(struct sess *s)
{
    struct buf fresh;
    buf_init(&fresh, s->carena.cap);
    struct sess_str *all[SESS_MSTAGES + 3];
    unsigned n = 0;
    for (unsigned i = 0; i < s->nmstages; i++)
        all[n++] = &s->mstages[i].list;
    all[n++] = &s->host;
    all[n++] = &s->addr;
    all[n++] = &s->helo;
    for (unsigned i = 0; i < n; i++)
        *all[i] =
            sess_arena_put(&fresh, sess_cstr(s, *all[i], 0), all[i]->len);
    buf_free(&s->carena);
    s->carena = fresh;
    s->macro_dead = 0;
}

/* Replaces a connection string, counting the old bytes as dead. */
int sess_set_cstr(struct sess *s, struct sess_str *dst, const char *p,
                  size_t n)
{
    if (dst->len && dst->len != UINT32_MAX)
        s->macro_dead += dst->len + 1;
    if ((s->macro_dead > 4096 && s->macro_dead > buf_len(&s->carena) / 2) ||
        (s->macro_dead && buf_len(&s->carena) + n + 1 > s->carena.cap))
        compact_carena(s);
    if (buf_len(&s->carena) + n + 1 > s->carena.cap)
        return REC_CONN_FULL;
    *dst = sess_arena_put(&s->carena, p, n);
    return dst->len == UINT32_MAX ? REC_NOMEM : 0;
}

/* Macros sent for MAIL and later commands describe one message. */
static int msg_stage(uint8_t cmd)
{
    switch (cmd) {
    case 'M': case 'R': case 'T': case 'L': case 'N': case 'E': case 'B':
        return 1;
    default:
        return 0;
    }
}

/* Forgets the message-stage macros (as libmilter does at each MAIL). */
static void clear_msg_macros(struct sess *s)
{
    unsigned k = 0;
    for (unsigned i = 0; i < s->nmstages; i++) {
        if (msg_stage(s->mstages[i].stage)) {
            s->macro_dead += s->mstages[i].list.len + 1;
            continue;
        }
        s->mstages[k++] = s->mstages[i];
    }
    s->nmstages = k;
    s->msg_macros_fresh = 1;
}

/* Moves stage i to the front: the stage sent last is looked up first. */
static void stage_to_front(struct sess *s, unsigned i)
{
    if (i == 0)
        return; /* Postfix's MACRO 'L' before every header: already there */
    struct sess_mstage m = s->mstages[i];
    memmove(&s->mstages[1], &s->mstages[0], i * sizeof m);
    s->mstages[0] = m;
}

/* Whether a MACRO for stage `stage` with list[0..len) would change
 * nothing: it would not clear the message's macros (MAIL's, or the first
 * of a new message), and it is the stage looked up first, byte for byte. */
static int macros_repeat(const struct sess *s, uint8_t stage,
                         const void *list, size_t len)
{
    if (stage == WIRE_MAIL ||
        (msg_stage(stage) && s->msg == MSG_NONE && !s->msg_macros_fresh) ||
        !s->nmstages || s->mstages[0].stage != stage)
        return 0;
    struct sess_str l = s->mstages[0].list;
    return l.len == len && memcmp(sess_cstr(s, l, 0), list, l.len) == 0;
}

int sess_macros_same(const struct sess *s, const struct wire_cmd *c)
{
    return macros_repeat(s, c->macro_for, c->list, c->list_len);
}

int sess_macro_repeats(const struct sess *s, const struct wire_frame *f)
{
    return f->cmd == WIRE_MACRO && f->len >= 1 && s->state != ST_INIT &&
           macros_repeat(s, f->data[0], f->data + 1, f->len - 1);
}

/*
 * Keeps a MACRO packet whole as its stage's macros, in place of that
 * stage's last packet: one copy, no parsing (names are found when asked
 * for). A packet the same as the last one (Postfix sends i before every
 * header) is not copied again.
 */
int sess_store_macros(struct sess *s, const struct wire_cmd *c)
{
    /* The first message-stage packet of a new message (MAIL's, or the
     * first one when the MTA skips MAIL) drops the last message's
     * macros: message 1's queue id must not tag message 2. */
    if (c->macro_for == WIRE_MAIL ||
        (msg_stage(c->macro_for) && s->msg == MSG_NONE &&
         !s->msg_macros_fresh))
        clear_msg_macros(s);
    unsigned i = 0;
    while (i < s->nmstages && s->mstages[i].stage != c->macro_for)
        i++;
    if (i < s->nmstages) {
        struct sess_str l = s->mstages[i].list;
        if (l.len == c->list_len &&
            memcmp(sess_cstr(s, l, 0), c->list, l.len) == 0) {
            stage_to_front(s, i);
            return 0;
        }
    } else if (s->nmstages == SESS_MSTAGES) {
        log_msg(LL_DEBUG, s->id, NULL,
                "macros for command 0x%02x ignored: too many stages",
                c->macro_for);
        return 0;
    } else {
        s->mstages[i] = (struct sess_mstage){c->macro_for, {0, 0}};
        s->nmstages++;
    }
    int rc = sess_set_cstr(s, &s->mstages[i].list, c->list, c->list_len);
    if (rc < 0)
        return rc;
    stage_to_front(s, i);
    return 0;
}
