/*
 * sess: the milter protocol state machine of one MTA connection.
 *
 * Takes decoded commands (wire.h), keeps the connection and message state
 * (negotiated flags, macros, client, envelope, headers), asks its owner to
 * run the script's handler for each event through sess_ops, and encodes the
 * replies. Knows nothing of sockets, libev or Lua, so tests can drive it
 * with plain bytes and a fake handler.
 */
#ifndef LUAMILTER_SESS_H
#define LUAMILTER_SESS_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "wire.h"

/* Script events, in API order. */
enum sess_event {
    SE_CONNECT, SE_HELO, SE_ENVFROM, SE_ENVRCPT, SE_DATA, SE_HEADER, SE_EOH,
    SE_BODY, SE_EOM, SE_ABORT, SE_CLOSE, SE_UNKNOWN, SE__COUNT
};
#define SE_BIT(e) (1u << (e))
extern const char *const sess_event_names[SE__COUNT];

enum verdict_action {
    VA_CONTINUE, VA_ACCEPT, VA_REJECT, VA_TEMPFAIL, VA_DISCARD, VA_SKIP,
    VA__COUNT
};
/* "continue", "accept", ...: the names scripts use, by enum verdict_action */
extern const char *const sess_action_names[VA__COUNT];

/* A header or recipient change from an eom verdict, in sending order. */
enum mod_op {
    MOD_ADD_HEADER, MOD_INSERT_HEADER, MOD_CHANGE_HEADER, MOD_DELETE_HEADER,
    MOD_ADD_RCPT, MOD_DEL_RCPT,
    MOD_HEADER /* one entry of a `headers` list: a = name, b = value */
};
struct mod {
    uint8_t op;        /* enum mod_op */
    uint32_t index;    /* insert: script index; change/delete: nth (>= 1) */
    struct wire_str a; /* header name, or recipient */
    struct wire_str b; /* header value, or ESMTP args of add_rcpt (p NULL) */
};

/* A handler's verdict; strings borrow from the caller (the Lua state). */
struct verdict {
    int action;       /* enum verdict_action */
    int code;         /* SMTP code for a custom reply, 0 = none */
    struct wire_str xcode;
    struct wire_str lines[WIRE_MAX_REPLY_LINES];
    int nlines;
    const struct mod *mods; /* eom only */
    size_t nmods;
    int header_list;        /* the MOD_HEADERs in mods are the whole list */
    struct wire_str from, from_args;     /* change_from, when from.p */
    struct wire_str body;                /* replace_body, when body.p */
    struct wire_str quarantine;          /* when quarantine.p */
};

/* An empty (continue) verdict; cheaper than clearing the 32 lines. */
static inline void verdict_clear(struct verdict *v)
{
    v->action = VA_CONTINUE;
    v->code = 0;
    v->xcode = (struct wire_str){NULL, 0};
    v->nlines = 0;
    v->mods = NULL;
    v->nmods = 0;
    v->header_list = 0;
    v->from = v->from_args = v->body = v->quarantine =
        (struct wire_str){NULL, 0};
}

struct sess;
struct sess_ops {
    /*
     * Runs the handler for ev (cmd: the command that caused it, NULL for
     * SE_ABORT/SE_CLOSE raised internally) and fills *v. Returns 0 for a
     * valid verdict, -1 when the handler failed or its verdict was bad
     * (already logged): the session then applies cfg->on_error; or
     * SESS_CALL_WAIT when the handler waits on a lookup: its result is
     * handed to sess_resume() later, and until then the session takes no
     * command (sess_waiting() is true).
     */
    int (*call)(void *ud, struct sess *s, int ev, const struct wire_cmd *cmd,
                struct verdict *v);
    /*
     * Optional (NULL: each header is a call of its own). Runs the header
     * handler for the n held headers s->hdrs[first..first+n) in one go,
     * stopping at the first verdict that is not continue. Before each
     * header's handler it sets s->hdrs_run to that header's index + 1, so
     * that the verdict is that of header s->hdrs_run - 1. Returns as call
     * does; a wait's verdict comes to sess_resume() as call's does.
     */
    int (*headers)(void *ud, struct sess *s, uint32_t first, uint32_t n,
                   struct verdict *v);
};

/*
 * What the owner is told through sess.note (optional, NULL: nothing; set
 * after sess_init): SN_RCPT_REFUSED, the recipient last in s->rcpts was
 * refused by v; SN_MSG_END, the message ended with v, the verdict of ev
 * that was sent (eom, or a stop at an earlier event); SN_MSG_ABORT, an
 * open message was given up (ABORT, a new MAIL or HELO, the connection's
 * end; v NULL). Told before the session forgets anything: the envelope
 * and v's strings are still readable. ud is the ops' ud.
 */
enum sess_note { SN_RCPT_REFUSED, SN_MSG_END, SN_MSG_ABORT };
typedef void (*sess_note_fn)(void *ud, struct sess *s, int what, int ev,
                             const struct verdict *v);

struct sess_cfg {
    unsigned handlers;  /* SE_BIT()s of the events the script handles */
    int on_error;       /* VA_TEMPFAIL, VA_ACCEPT, VA_CONTINUE, VA_REJECT */
    size_t max_body;    /* body bytes handed to the script per message */
    unsigned max_headers; /* per message; beyond, the connection is closed */
    unsigned max_macros;  /* name/value pairs per MACRO packet */
    size_t max_msg_bytes;  /* envelope + headers of one message (0: 4 GiB) */
    size_t max_conn_bytes; /* macros, client, HELO of a connection (0: 4 GiB) */
    int mta;            /* enum mta_kind (mta.h): MTA_AUTO detects it */
};

struct sess_str { uint32_t off, len; }; /* a string in one of the arenas */
struct sess_hdr { struct sess_str name, value; };

enum sess_state { ST_INIT, ST_NEG, ST_CONN, ST_CLOSED };
enum sess_msg { MSG_NONE, MSG_OPEN, MSG_ENDED };
enum sess_phase { PH_ENV, PH_HDR, PH_EOH, PH_BODY };

/* Macro stages kept per connection: the MTA commands that carry some. */
#define SESS_MSTAGES 16

struct sess {
    const struct sess_cfg *cfg; /* borrowed */
    const struct sess_ops *ops; /* borrowed */
    void *ud;                   /* passed to ops */
    sess_note_fn note;          /* or NULL (see enum sess_note) */
    uint64_t id;                /* connection id, for logs */

    uint8_t state;    /* enum sess_state */
    uint8_t msg;      /* enum sess_msg */
    uint8_t phase;    /* enum sess_phase, while MSG_OPEN */
    uint8_t mta, mta_logged; /* enum mta_kind, as mta_update() found it */
    uint8_t mta_by_v;        /* macro v was there when it looked */
    uint32_t version, actions, protocol; /* negotiated */
    uint32_t offered_actions;            /* the MTA's OPTNEG offer */

    /* Connection data (conn arena). */
    struct buf carena;
    /* Macros as the MTA sent them: each stage's (the MACRO's command
     * byte) last packet kept whole, its list of NUL-terminated names and
     * values, and replaced by the stage's next packet, as libmilter does;
     * the stage sent last comes first (a name is looked up in that order). */
    struct sess_mstage {
        uint8_t stage;
        struct sess_str list;
    } mstages[SESS_MSTAGES];
    unsigned nmstages;
    uint8_t msg_macros_fresh; /* message macros cleared for the next one */
    uint32_t macro_dead; /* arena bytes no longer referenced */
    char family;         /* '4' '6' 'L' 'U', 0 before CONNECT */
    uint16_t port;
    struct sess_str host, addr, helo;
    uint8_t has_helo;
    uint32_t conn_seq; /* bumped per milter session (QUIT_NC) */

    /* Message data (message arena), valid while msg != MSG_NONE. */
    struct buf marena;
    struct sess_str sender;
    uint8_t has_sender, skip_body, truncated;
    struct sess_str *rcpts;
    uint32_t nrcpts, rcpts_cap;
    uint32_t rcpts_dropped; /* bumped when a rejected recipient is removed */
    struct sess_hdr *hdrs;
    uint32_t nhdrs, hdrs_cap;
    /* Headers handed to the script (what ctx.headers shows): nhdrs, but
     * for the held ones (SESS_NR_HELD, ops.headers), recorded as they
     * come and run in a batch before the next other command, or when the
     * read they came in is handled (sess_flush). */
    uint32_t hdrs_run;
    size_t body_bytes;
    uint32_t msg_seq; /* bumped per message */

    /* The event whose handler waits (or ran last). */
    struct {
        uint8_t ev;      /* enum sess_event */
        uint8_t cmd;     /* the command that raised it */
        uint8_t reply;   /* the MTA waits for an answer */
        uint8_t crossed; /* BODY: the chunk crossed max_body */
        uint8_t held;    /* HEADER: a batch of held headers (ops.headers) */
    } wait;
    uint8_t waiting;

    struct buf ended;     /* reply repeated while the message is ended */
    uint8_t kept;         /* 1 + the event of a kept verdict not yet given */
    struct buf conn_end;  /* reply repeated after a connection verdict */
    struct buf scratch;   /* eom modification planning */
};

/*
 * The events whose handlers run reply-free where the MTA allows it: their
 * verdict is kept and given at the next event the MTA waits on (BODYEOB at
 * the latest), since an MTA acts on a content-phase verdict only at the end
 * of the data anyway.
 */
#define SESS_NR_HELD (SMFIP_NR_HDR | SMFIP_NR_EOH | SMFIP_NR_BODY)

enum { SESS_OK = 0, SESS_CLOSE = 1, SESS_WAIT = 2, SESS_RETRY = 3 };
enum { SESS_CALL_WAIT = 1 };

void sess_init(struct sess *s, const struct sess_cfg *cfg,
               const struct sess_ops *ops, void *ud, uint64_t id);
/* Frees everything sess_init and later commands allocated. */
void sess_free(struct sess *s);

/*
 * Handles one decoded command and appends any reply to out. Returns SESS_OK;
 * SESS_CLOSE when the connection must be closed after flushing out (QUIT,
 * or a protocol error, which is logged); SESS_WAIT when the command's
 * handler waits (the command is taken: its reply comes from sess_resume);
 * SESS_RETRY when an abort handler the command raised first waits (hand
 * the same command in again after sess_resume). Borrows cmd for the call
 * only. Not to be called while sess_waiting().
 */
int sess_handle(struct sess *s, const struct wire_cmd *cmd, struct buf *out);

/*
 * Whether the MACRO frame f repeats, byte for byte, the macros kept for
 * its command, which is the one looked up first (Postfix sends the queue
 * id before every header): handing it to sess_handle would change
 * nothing, so it need not even be decoded. 0 for any other frame.
 */
int sess_macro_repeats(const struct sess *s, const struct wire_frame *f);

/*
 * A waiting handler is done: rc and v as sess_ops.call gives them. Sends
 * the event's reply to out and applies it; returns SESS_OK or SESS_CLOSE
 * (a QUIT that waited on close, a reply that cannot be encoded).
 */
int sess_resume(struct sess *s, int rc, struct verdict *v, struct buf *out);
/* The waiting handler was dropped (the MTA aborted or hung up): no reply. */
void sess_abandon(struct sess *s);
static inline int sess_waiting(const struct sess *s) { return s->waiting; }

/*
 * The connection is going away without QUIT (EOF, error, timeout, shutdown):
 * runs abort for an open message and close once, if not yet done. Returns
 * 0, or SESS_WAIT while one of them waits: call again after sess_resume.
 */
int sess_finish(struct sess *s);

/*
 * Runs the handlers of the held headers now (the read they came in is
 * handled). Returns SESS_OK; SESS_WAIT when their handler waits (its
 * verdict goes to sess_resume, with no reply: the MTA does not wait); or
 * SESS_CLOSE. Not to be called while sess_waiting().
 */
int sess_flush(struct sess *s, struct buf *out);

/* Appends the reply the on-error verdict gives (the watchdog's last word). */
int sess_put_on_error(const struct sess_cfg *cfg, struct buf *out);

/* Accessors for the bridge; strings are borrowed from the arenas. */
static inline const char *sess_cstr(const struct sess *s, struct sess_str v,
                                    int msg)
{
    return (const char *)(msg ? s->marena.data : s->carena.data) + v.off;
}
/* Looks a macro up; name may be "i", "{i}", "auth_authen"... NULL if unset. */
const char *sess_macro(const struct sess *s, const char *name, size_t len,
                       size_t *vlen);
/* The queue id (macro i) or NULL. */
const char *sess_qid(const struct sess *s);

#endif
