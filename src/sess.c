/* sess: see sess.h. */
#include "sess.h"
#include "sess_int.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "mods.h"
#include "mta.h"

const char *const sess_action_names[VA__COUNT] = {
    "continue", "accept", "reject", "tempfail", "discard", "skip"};

const char *const sess_event_names[SE__COUNT] = {
    "connect", "helo", "envfrom", "envrcpt", "data", "header",
    "eoh", "body", "eom", "abort", "close", "unknown",
};

/* Events the MTA sends, with the protocol bits that suppress them. */
struct cmd_row {
    uint8_t cmd;
    uint8_t ev;          /* enum sess_event */
    uint8_t phases;      /* message phases it may follow (1 << PH_*) */
    uint32_t no_bit;     /* SMFIP_NO* */
    uint32_t nr_bit;     /* SMFIP_NR_*, 0 = always answered */
};

#define PH(p) (1u << (p))
#define PH_ANY (PH(PH_ENV) | PH(PH_HDR) | PH(PH_EOH) | PH(PH_BODY))

static const struct cmd_row rows[] = {
    {WIRE_CONNECT, SE_CONNECT, 0, SMFIP_NOCONNECT, SMFIP_NR_CONN},
    {WIRE_HELO, SE_HELO, 0, SMFIP_NOHELO, SMFIP_NR_HELO},
    {WIRE_MAIL, SE_ENVFROM, 0, SMFIP_NOMAIL, SMFIP_NR_MAIL},
    {WIRE_RCPT, SE_ENVRCPT, PH(PH_ENV), SMFIP_NORCPT, SMFIP_NR_RCPT},
    {WIRE_DATA, SE_DATA, PH(PH_ENV), SMFIP_NODATA, SMFIP_NR_DATA},
    {WIRE_HEADER, SE_HEADER, PH(PH_ENV) | PH(PH_HDR), SMFIP_NOHDRS,
     SMFIP_NR_HDR},
    {WIRE_EOH, SE_EOH, PH(PH_ENV) | PH(PH_HDR), SMFIP_NOEOH, SMFIP_NR_EOH},
    {WIRE_BODY, SE_BODY, PH_ANY, SMFIP_NOBODY, SMFIP_NR_BODY},
    {WIRE_BODYEOB, SE_EOM, PH_ANY, 0, 0},
    {WIRE_UNKNOWN, SE_UNKNOWN, 0, SMFIP_NOUNKNOWN, SMFIP_NR_UNKN},
};

/* Every packet's row: one load from a table by command byte, filled on
 * first use, rather than a scan of the rows. */
static const struct cmd_row *find_row(uint8_t cmd)
{
    static uint8_t at[256]; /* 1 + the index of each command's row; 0: none */
    if (!at[rows[0].cmd])
        for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
            at[rows[i].cmd] = (uint8_t)(i + 1);
    return at[cmd] ? &rows[at[cmd] - 1] : NULL;
}


/* An arena's cap from a byte limit: offsets are 32-bit, so never more. */
static size_t arena_cap(size_t limit)
{
    return limit && limit < UINT32_MAX ? limit : UINT32_MAX - 1;
}

/* Bytes the open message holds: strings and the lists indexing them. */
static size_t msg_bytes(const struct sess *s)
{
    return buf_len(&s->marena) + s->nrcpts * sizeof *s->rcpts +
           s->nhdrs * sizeof *s->hdrs;
}

void sess_init(struct sess *s, const struct sess_cfg *cfg,
               const struct sess_ops *ops, void *ud, uint64_t id)
{
    memset(s, 0, sizeof *s);
    s->cfg = cfg;
    s->ops = ops;
    s->ud = ud;
    s->id = id;
    buf_init(&s->carena, arena_cap(cfg->max_conn_bytes));
    buf_init(&s->marena, arena_cap(cfg->max_msg_bytes));
    buf_init(&s->ended, 0);
    buf_init(&s->conn_end, 0);
    buf_init(&s->scratch, 0);
}

void sess_free(struct sess *s)
{
    buf_free(&s->carena);
    buf_free(&s->marena);
    buf_free(&s->ended);
    buf_free(&s->conn_end);
    buf_free(&s->scratch);
    free(s->rcpts);
    free(s->hdrs);
    s->rcpts = NULL;
    s->hdrs = NULL;
}

/*
 * Logs a protocol error and ends the session the way any other end does:
 * abort for an open message, then close, once (sess_finish).
 */
static int proto_error(struct sess *s, const char *what, uint8_t cmd)
{
    log_msg(LL_WARN, s->id, sess_qid(s),
            "protocol error: %s (command '%c' 0x%02x)", what,
            cmd >= 0x20 && cmd < 0x7f ? cmd : '?', cmd);
    sess_finish(s);
    return SESS_CLOSE;
}

/*
 * Answers OPTNEG: the highest common version, the actions the MTA offered
 * that an eom handler may use, no events the script cannot observe, and no
 * replies for the events it does not handle, wherever the MTA allows it.
 * HEADER, EOH and BODY go reply-free even when handled (SESS_NR_HELD): the
 * MTA acts on their verdict only at the end of the data, so the verdict is
 * kept and given at the next event the MTA waits on (see event_done).
 */
static int negotiate(struct sess *s, const struct wire_cmd *c,
                     struct buf *out)
{
    if (c->version < 2)
        return proto_error(s, "MTA offers milter protocol version < 2", c->cmd);
    unsigned h = s->cfg->handlers;
    unsigned msg_events = SE_BIT(SE_ENVFROM) | SE_BIT(SE_ENVRCPT) |
                          SE_BIT(SE_DATA) | SE_BIT(SE_HEADER) |
                          SE_BIT(SE_EOH) | SE_BIT(SE_BODY) | SE_BIT(SE_EOM) |
                          SE_BIT(SE_ABORT);
    unsigned header_events = SE_BIT(SE_HEADER) | SE_BIT(SE_EOH) |
                             SE_BIT(SE_BODY) | SE_BIT(SE_EOM);
    uint32_t want_no = 0, want_nr = 0;
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        const struct cmd_row *r = &rows[i];
        int needed;
        switch (r->ev) {
        case SE_CONNECT:
        case SE_HELO: needed = 1; break; /* ctx.client, ctx.helo */
        case SE_ENVFROM:
        case SE_ENVRCPT: needed = (h & msg_events) != 0; break;
        case SE_HEADER: needed = (h & header_events) != 0; break;
        default: needed = (h & SE_BIT(r->ev)) != 0; break;
        }
        if (!needed)
            want_no |= r->no_bit;
        else if (!(h & SE_BIT(r->ev)) || (r->nr_bit & SESS_NR_HELD))
            want_nr |= r->nr_bit; /* unhandled, or its verdict is kept */
    }
    s->version = c->version < 6 ? c->version : 6;
    s->actions = (h & SE_BIT(SE_EOM)) ? c->actions & 0xffu : 0;
    s->offered_actions = c->actions;
    /* Ask for macro v where the MTA's own lists lack it (mta.h). */
    struct wire_symlist sl = {4, {MTA_DATA_MACROS, sizeof MTA_DATA_MACROS - 1}};
    int nsl = s->actions && s->cfg->mta == MTA_AUTO && s->version >= 6 &&
              (c->actions & SMFIF_SETSYMLIST);
    if (nsl)
        s->actions |= SMFIF_SETSYMLIST;
    s->protocol = (want_no | want_nr) & c->protocol;
    /* SKIP is a reply to BODY: only where body chunks are answered */
    if ((h & SE_BIT(SE_BODY)) && (c->protocol & SMFIP_SKIP) &&
        !(s->protocol & SMFIP_NR_BODY))
        s->protocol |= SMFIP_SKIP;
    s->state = ST_NEG;
    log_msg(LL_DEBUG, s->id, NULL,
            "negotiated version %u actions 0x%x protocol 0x%x (offered %u "
            "0x%x 0x%x)",
            s->version, s->actions, s->protocol, c->version, c->actions,
            c->protocol);
    return wire_put_optneg(out, s->version, s->actions, s->protocol, &sl, nsl)
               ? SESS_CLOSE
               : SESS_OK;
}

/* Forgets the last message's envelope, headers and body counters. */
static void clear_msg_data(struct sess *s)
{
    s->msg_seq++;
    s->has_sender = s->skip_body = s->truncated = s->kept = 0;
    s->nrcpts = s->nhdrs = s->hdrs_run = 0;
    s->body_bytes = 0;
    buf_reset(&s->marena);
    buf_reset(&s->ended);
    buf_shrink(&s->marena, 64 * 1024);
}

/* Message data stays readable until the next message opens. */
static void open_msg(struct sess *s)
{
    s->msg = MSG_OPEN;
    s->phase = PH_ENV;
    s->msg_macros_fresh = 0;
    clear_msg_data(s);
}

/* The verdict that stands in for a failed handler: generic texts only. */
static void on_error_verdict(int action, struct verdict *v)
{
    verdict_clear(v);
    v->action = action;
    if (action == VA_REJECT) {
        static const struct wire_str text = {"Rejected by mail filter", 23};
        v->code = 550;
        v->xcode = (struct wire_str){"5.7.1", 5};
        v->lines[0] = text;
        v->nlines = 1;
    } else if (action == VA_TEMPFAIL) {
        static const struct wire_str text = {
            "Temporary mail filter failure, try again later", 46};
        v->code = 451;
        v->xcode = (struct wire_str){"4.3.0", 5};
        v->lines[0] = text;
        v->nlines = 1;
    }
}

/*
 * The --on-error verdict as it applies at ev: at envrcpt it judges that
 * recipient only, so accept lets the recipient through (continue) instead
 * of accepting the whole message unfiltered.
 */
void sess_stage_on_error(const struct sess *s, int ev, struct verdict *v)
{
    on_error_verdict(s->cfg->on_error, v);
    if (ev == SE_ENVRCPT && v->action == VA_ACCEPT)
        v->action = VA_CONTINUE;
}

/*
 * Calls the handler when the script has one; continue otherwise. Returns
 * 1 when the handler waits on a lookup: its verdict comes to sess_resume.
 */
static int run(struct sess *s, int ev, const struct wire_cmd *c,
               struct verdict *v)
{
    verdict_clear(v);
    if (!(s->cfg->handlers & SE_BIT(ev)))
        return 0;
    int rc = s->ops->call(s->ud, s, ev, c, v);
    if (rc == SESS_CALL_WAIT) {
        s->wait.ev = (uint8_t)ev;
        s->waiting = 1;
        return 1;
    }
    if (rc < 0)
        sess_stage_on_error(s, ev, v);
    return 0;
}

static void note(struct sess *s, int what, int ev, const struct verdict *v)
{
    if (s->note)
        s->note(s->ud, s, what, ev, v);
}

/* Runs abort for an open message; 1 when that handler waits. */
static int abort_msg(struct sess *s)
{
    int open = s->msg == MSG_OPEN;
    s->msg = MSG_NONE; /* first: a re-entry after a wait goes on */
    if (open)
        note(s, SN_MSG_ABORT, SE_ABORT, NULL);
    if (open && (s->cfg->handlers & SE_BIT(SE_ABORT))) {
        struct verdict v;
        return run(s, SE_ABORT, NULL, &v);
    }
    return 0;
}

int sess_finish(struct sess *s)
{
    if (s->waiting)
        return SESS_WAIT;
    if (s->state != ST_CONN && s->state != ST_CLOSED)
        return 0;
    /* headers held when the connection ends in the middle of a read (a
     * malformed frame after them): their handlers run first, as they
     * would have one by one; no reply goes out for them */
    if (sess_run_held(s, NULL) == SESS_WAIT)
        return SESS_WAIT;
    if (abort_msg(s))
        return SESS_WAIT;
    s->state = ST_NEG; /* first: close runs once, waiting or not */
    struct verdict v;
    if (run(s, SE_CLOSE, NULL, &v))
        return SESS_WAIT; /* the session ends when close does */
    s->conn_seq++;
    return 0;
}

static int grow(void **arr, uint32_t *cap, uint32_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    uint32_t n = *cap ? *cap * 2 : 16;
    void *p = realloc(*arr, n * elem);
    if (!p)
        return -1;
    *arr = p;
    *cap = n;
    return 0;
}

int sess_header_fits(const struct sess *s, const struct wire_cmd *c)
{
    return msg_bytes(s) + c->s1.n + c->s2.n + 2 + sizeof *s->hdrs <=
               s->marena.cap &&
           !(s->cfg->max_headers && s->nhdrs >= s->cfg->max_headers);
}

/* Records what the event carries, before the handler sees it. */
static int record(struct sess *s, const struct wire_cmd *c)
{
    struct sess_str v;
    switch (c->cmd) {
    case WIRE_CONNECT: {
        mta_update(s); /* its header rules (mta.h), from the macros */
        s->family = c->family;
        s->port = c->port;
        int rc = sess_set_cstr(s, &s->host, c->s1.p, c->s1.n);
        return rc < 0 ? rc
                      : sess_set_cstr(s, &s->addr, c->s2.p ? c->s2.p : "",
                                      c->s2.n);
    }
    case WIRE_HELO:
        s->has_helo = 1;
        return sess_set_cstr(s, &s->helo, c->s1.p, c->s1.n);
    case WIRE_MAIL:
    case WIRE_RCPT:
    case WIRE_HEADER:
        if (msg_bytes(s) + c->s1.n + c->s2.n + 2 + sizeof *s->hdrs >
            s->marena.cap)
            return REC_MSG_FULL;
        break;
    default:
        return 0;
    }
    switch (c->cmd) {
    case WIRE_MAIL:
        s->sender = sess_arena_put(&s->marena, c->s1.p, c->s1.n);
        s->has_sender = 1;
        return s->sender.len == UINT32_MAX ? -1 : 0;
    case WIRE_RCPT:
        if (grow((void **)&s->rcpts, &s->rcpts_cap, s->nrcpts + 1,
                 sizeof *s->rcpts) < 0)
            return -1;
        v = sess_arena_put(&s->marena, c->s1.p, c->s1.n);
        s->rcpts[s->nrcpts++] = v;
        return v.len == UINT32_MAX ? -1 : 0;
    case WIRE_HEADER: {
        if (s->cfg->max_headers && s->nhdrs >= s->cfg->max_headers)
            return REC_HEADERS;
        if (grow((void **)&s->hdrs, &s->hdrs_cap, s->nhdrs + 1,
                 sizeof *s->hdrs) < 0)
            return -1;
        struct sess_hdr *h = &s->hdrs[s->nhdrs++];
        h->name = sess_arena_put(&s->marena, c->s1.p, c->s1.n);
        h->value = sess_arena_put(&s->marena, c->s2.p, c->s2.n);
        return h->name.len == UINT32_MAX || h->value.len == UINT32_MAX ? -1
                                                                        : 0;
    }
    default:
        return 0;
    }
}

static int put_reply(struct sess *s, const struct verdict *v, struct buf *out)
{
    switch (v->action) {
    case VA_ACCEPT: return buf_append(out, "\0\0\0\1a", 5);
    case VA_DISCARD: return buf_append(out, "\0\0\0\1d", 5);
    case VA_SKIP:
        if (s->protocol & SMFIP_SKIP)
            return buf_append(out, "\0\0\0\1s", 5);
        return buf_append(out, "\0\0\0\1c", 5);
    case VA_REJECT:
    case VA_TEMPFAIL: {
        int rej = v->action == VA_REJECT;
        if (!v->code && !v->nlines && !v->xcode.n)
            return buf_append(out, rej ? "\0\0\0\1r" : "\0\0\0\1t", 5);
        static const struct wire_str def[2] = {
            {"Service unavailable - try again later", 37},
            {"Command rejected", 16}};
        int code = v->code ? v->code : rej ? 550 : 451;
        /* Always an enhanced code: without one, a text starting with a
         * digit ("2FA required") reads as one, and Postfix then refuses
         * the reply and disables the milter for the session. */
        return wire_put_replycode(out, code,
                                  v->xcode.n ? v->xcode
                                             : wire_default_xcode(code),
                                  v->nlines ? v->lines : &def[rej],
                                  v->nlines ? v->nlines : 1);
    }
    default: return buf_append(out, "\0\0\0\1c", 5);
    }
}

/*
 * Appends every packet of v, or nothing: a verdict whose modifications
 * cannot all be encoded must not go out in part (an ACCEPT with half its
 * edits). Returns 0 or -1 with out as it was.
 */
static int put_verdict(struct sess *s, int ev, const struct verdict *v,
                       struct buf *out)
{
    size_t mark = buf_len(out);
    if ((ev == SE_EOM && (v->nmods || v->header_list || v->from.p ||
                          v->body.p || v->quarantine.p) &&
         mods_put(s, v, out) < 0) ||
        put_reply(s, v, out) < 0) {
        buf_truncate(out, mark);
        return -1;
    }
    return 0;
}

int sess_put_on_error(const struct sess_cfg *cfg, struct buf *out)
{
    struct sess dummy; /* put_verdict reads only the SKIP bit of it */
    struct verdict v;
    memset(&dummy, 0, sizeof dummy);
    on_error_verdict(cfg->on_error, &v);
    return put_verdict(&dummy, SE_ENVFROM, &v, out);
}

/* Handles BODY: cut at max_body, honour an earlier skip. */
/* After the body handler: a chunk that crossed max_body truncates. */
static void body_done(struct sess *s, struct verdict *v)
{
    if (s->wait.crossed)
        s->truncated = 1;
    if (v->action == VA_SKIP)
        s->skip_body = 1;
    else if (v->action == VA_CONTINUE && s->truncated)
        v->action = VA_SKIP; /* nothing more will reach the script */
}

/* Handles BODY: cut at max_body, honour an earlier skip. 1: waits. */
static int body_event(struct sess *s, const struct wire_cmd *c,
                      struct verdict *v)
{
    verdict_clear(v);
    s->wait.crossed = 0;
    if (s->skip_body || s->body_bytes >= s->cfg->max_body) {
        if (!s->skip_body)
            s->truncated = 1;
        v->action = VA_SKIP;
        return 0;
    }
    struct wire_cmd cut = *c;
    size_t room = s->cfg->max_body - s->body_bytes;
    s->wait.crossed = cut.body_len > room;
    if (s->wait.crossed)
        cut.body_len = room;
    s->body_bytes += cut.body_len;
    if (run(s, SE_BODY, &cut, v))
        return 1;
    body_done(s, v);
    return 0;
}

static int quit_done(struct sess *s, uint8_t cmd);

int sess_handle(struct sess *s, const struct wire_cmd *c, struct buf *out)
{
    if (s->state == ST_INIT)
        return c->cmd == WIRE_OPTNEG ? negotiate(s, c, out)
                                     : proto_error(s, "expected OPTNEG", c->cmd);
    if (sess_held_first(s, c)) { /* the held headers' handlers, first */
        int rc = sess_run_held(s, out);
        if (rc != SESS_OK)
            return rc == SESS_WAIT ? SESS_RETRY : rc;
    }
    switch (c->cmd) {
    case WIRE_OPTNEG: return proto_error(s, "second OPTNEG", c->cmd);
    case WIRE_MACRO:
        if (s->cfg->max_macros && c->list_count / 2 > s->cfg->max_macros)
            return proto_error(s, "too many macros in one packet", c->cmd);
        switch (sess_store_macros(s, c)) {
        case 0: return SESS_OK;
        case REC_CONN_FULL:
            return proto_error(s, "connection data (macros, client, HELO) "
                                  "above --max-connection-bytes", c->cmd);
        default: return proto_error(s, "out of memory for macros", c->cmd);
        }
    case WIRE_ABORT: return abort_msg(s) ? SESS_WAIT : SESS_OK;
    case WIRE_QUIT:
    case WIRE_QUIT_NC:
        /* abort waits: handle QUIT again afterwards; close waits: QUIT
         * is done but for its ending (sess_resume) */
        if (s->msg == MSG_OPEN && (s->cfg->handlers & SE_BIT(SE_ABORT)))
            return abort_msg(s) ? SESS_RETRY : sess_handle(s, c, out);
        s->wait.cmd = c->cmd;
        return sess_finish(s) == SESS_WAIT ? SESS_WAIT : quit_done(s, c->cmd);
    default: break;
    }
    const struct cmd_row *r = find_row(c->cmd);
    if (!r)
        return proto_error(s, "unknown command", c->cmd);
    int reply = !(s->protocol & r->nr_bit);
    if (c->cmd == WIRE_CONNECT) {
        if (s->state != ST_NEG)
            return proto_error(s, "CONNECT in an open session", c->cmd);
        s->state = ST_CONN;
    } else if (s->state == ST_NEG) {
        s->state = ST_CONN; /* the MTA skipped CONNECT: no ctx.client */
    }
    if (s->state == ST_CLOSED) { /* the script ended the connection */
        if (!reply)
            return SESS_OK;
        int rc = buf_len(&s->conn_end)
                     ? buf_append(out, buf_head(&s->conn_end),
                                  buf_len(&s->conn_end))
                     : buf_append(out, "\0\0\0\1c", 5);
        return rc < 0 ? proto_error(s, "out of memory", c->cmd) : SESS_OK;
    }
    if (r->ev == SE_HELO || r->ev == SE_ENVFROM) {
        /* a new HELO or MAIL abandons an open message; if abort waits,
         * this command is handled again once it is done */
        if (s->msg != MSG_NONE && abort_msg(s))
            return SESS_RETRY;
        if (r->ev == SE_ENVFROM)
            open_msg(s);
    } else if (r->phases) {
        if (s->msg == MSG_ENDED) {
            if (r->ev == SE_EOM)
                s->msg = MSG_NONE;
            if (!reply)
                return SESS_OK; /* read and dropped */
            if (s->kept) {
                log_msg(LL_DEBUG, s->id, sess_qid(s),
                        "the kept %s verdict goes to the MTA at %s",
                        sess_event_names[s->kept - 1],
                        sess_event_names[r->ev]);
                s->kept = 0;
            }
            return buf_append(out, buf_head(&s->ended), buf_len(&s->ended)) < 0
                       ? proto_error(s, "out of memory", c->cmd)
                       : SESS_OK;
        }
        if (s->msg == MSG_NONE)
            open_msg(s); /* the MTA skipped MAIL: we opted out of it */
        else if (!(r->phases & PH(s->phase)))
            return proto_error(s, "command out of order", c->cmd);
    }
    switch (record(s, c)) {
    case 0: break;
    case REC_HEADERS:
        return proto_error(s, "too many headers in one message", c->cmd);
    case REC_MSG_FULL:
        return proto_error(s, "message data (envelope and headers) above "
                              "--max-message-bytes", c->cmd);
    case REC_CONN_FULL:
        return proto_error(s, "connection data (macros, client, HELO) above "
                              "--max-connection-bytes", c->cmd);
    default: return proto_error(s, "out of memory", c->cmd);
    }
    if (r->ev == SE_HEADER) {
        s->phase = PH_HDR;
        if (sess_holds_header(s, reply))
            return SESS_OK; /* its handler runs with the batch */
        s->hdrs_run = s->nhdrs;
    }
    switch (r->ev) {
    case SE_DATA: s->phase = PH_HDR; break;
    case SE_EOH: s->phase = PH_EOH; break;
    case SE_BODY: s->phase = PH_BODY; break;
    default: break;
    }

    struct verdict v;
    s->wait.cmd = c->cmd;
    s->wait.reply = (uint8_t)reply;
    int waits = r->ev == SE_BODY && (s->cfg->handlers & SE_BIT(SE_BODY))
                    ? body_event(s, c, &v)
                    : run(s, r->ev, c, &v);
    return waits ? SESS_WAIT : sess_event_done(s, r->ev, &v, out);
}

static int quit_done(struct sess *s, uint8_t cmd)
{
    if (cmd == WIRE_QUIT)
        return SESS_CLOSE;
    clear_msg_data(s); /* nothing of the old session leaks into the new */
    s->msg = MSG_NONE;
    s->msg_macros_fresh = 0;
    s->nmstages = 0;
    s->family = 0;
    s->has_helo = 0;
    s->host = s->addr = s->helo = (struct sess_str){0, 0};
    buf_reset(&s->carena);
    buf_reset(&s->conn_end);
    s->macro_dead = 0;
    return SESS_OK;
}

/* Whether a verdict at ev ends the message (no later handler runs). */
static int ends_msg(int ev, const struct verdict *v)
{
    switch (ev) {
    case SE_ENVRCPT: /* reject and tempfail judge that recipient only */
        if (v->action == VA_REJECT || v->action == VA_TEMPFAIL)
            return 0;
        /* fall through */
    case SE_ENVFROM:
    case SE_DATA:
    case SE_HEADER:
    case SE_EOH:
    case SE_BODY: return v->action != VA_CONTINUE && v->action != VA_SKIP;
    default: return 0;
    }
}


/*
 * Sends an event's verdict and applies what it means for the session. The
 * verdict of a reply-free event that ends the message is kept instead:
 * encoded now into s->ended (its strings belong to the Lua state), it is
 * what the next event the MTA waits on gets (sess_handle, MSG_ENDED).
 */
int sess_event_done(struct sess *s, int ev, struct verdict *v,
                    struct buf *out)
{
    struct buf *dst = s->wait.reply     ? out
                      : ends_msg(ev, v) ? &s->ended
                                        : NULL;
    if (dst == &s->ended)
        buf_reset(&s->ended);
    size_t mark = dst ? buf_len(dst) : 0;
    if (dst && put_verdict(s, ev, v, dst) < 0) {
        log_msg(LL_ERR, s->id, sess_qid(s),
                "the %s verdict could not be encoded (out of memory): "
                "sending the --on-error reply instead",
                sess_event_names[ev]);
        sess_stage_on_error(s, ev, v);
        if (put_verdict(s, ev, v, dst) < 0)
            return proto_error(s, "out of memory for the reply", s->wait.cmd);
    }
    const uint8_t *rep = dst ? buf_head(dst) + mark : NULL;
    size_t replen = dst ? buf_len(dst) - mark : 0;

    switch (ev) {
    case SE_CONNECT:
    case SE_HELO:
        if (v->action != VA_CONTINUE) {
            s->state = ST_CLOSED;
            buf_reset(&s->conn_end);
            buf_append(&s->conn_end, rep, replen);
        }
        break;
    case SE_ENVRCPT:
        if (v->action == VA_REJECT || v->action == VA_TEMPFAIL) {
            note(s, SN_RCPT_REFUSED, ev, v);
            s->nrcpts--;
            s->rcpts_dropped++;
            break;
        }
        /* fall through */
    case SE_ENVFROM:
    case SE_DATA:
    case SE_HEADER:
    case SE_EOH:
    case SE_BODY:
        if (!ends_msg(ev, v))
            break;
        note(s, SN_MSG_END, ev, v);
        s->msg = MSG_ENDED;
        if (dst == &s->ended) {
            s->kept = (uint8_t)(ev + 1);
            log_msg(LL_INFO, s->id, sess_qid(s),
                    "%s verdict %s kept: the MTA gets it at the next event "
                    "it waits on, no later handler runs for this message",
                    sess_event_names[ev], sess_action_names[v->action]);
            break;
        }
        buf_reset(&s->ended);
        buf_append(&s->ended, rep, replen);
        break;
    case SE_EOM:
        note(s, SN_MSG_END, ev, v);
        s->msg = MSG_NONE;
        break;
    default: break;
    }
    return SESS_OK;
}

int sess_resume(struct sess *s, int rc, struct verdict *v, struct buf *out)
{
    if (!s->waiting)
        return SESS_OK;
    s->waiting = 0;
    int ev = s->wait.ev;
    if (ev == SE_ABORT || ev == SE_CLOSE) {
        /* nothing is sent for them; a QUIT waiting on close ends now */
        if (ev == SE_CLOSE)
            s->conn_seq++;
        if (ev == SE_CLOSE &&
            (s->wait.cmd == WIRE_QUIT || s->wait.cmd == WIRE_QUIT_NC))
            return quit_done(s, s->wait.cmd);
        return SESS_OK;
    }
    if (rc < 0)
        sess_stage_on_error(s, ev, v);
    if (ev == SE_BODY)
        body_done(s, v);
    if (s->wait.held) { /* the rest of the held headers: see sheld.c */
        s->wait.held = 0;
        return sess_held_done(s, v, out);
    }
    return sess_event_done(s, ev, v, out);
}

void sess_abandon(struct sess *s)
{
    if (s->waiting && s->wait.ev == SE_CLOSE)
        s->conn_seq++;
    if (s->waiting && s->wait.held) /* the MTA gave up on this message */
        s->nhdrs = s->hdrs_run;
    s->wait.held = 0;
    s->waiting = 0;
}
