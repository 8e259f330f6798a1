/*
 * offline_int: what the test mode's two files share: offline.c plays the
 * MTA's side of the session, offline_report.c writes what it saw (text or
 * JSON). Neither includes Lua or libev.
 */
#ifndef LUAMILTER_OFFLINE_INT_H
#define LUAMILTER_OFFLINE_INT_H

#include "buf.h"
#include "lb.h"
#include "pfsim.h"
#include "sess.h"

#define MAX_RCPTS 256

/* One offline connection, and the message it is playing. */
struct run {
    struct lb_state *st;
    struct lb_conn lua;
    struct sess_cfg cfg;
    struct sess s;
    struct buf out;   /* reply packets of the current command */
    volatile int woken; /* a waiting handler's lookup is done */
    /* the current message (offline_msg_reset starts a new one) */
    struct buf json;  /* stages, as JSON objects */
    struct buf text;  /* stages, as text lines */
    int nstages;
    int failed;       /* a handler raised or returned a bad verdict */
    struct pf_msg msg;
    struct buf mods_json, mods_text;
    int nmods;
    int ok;           /* 1 while the message is still on its way */
    int traced;       /* the MTA's trace header was added */
    const char *final_action;
    char final_reply[1024];
    int hlist;        /* the eom verdict gave a `headers` list */
    char **before;    /* name, value pairs the milter saw, for the diff */
    size_t nbefore;
};

struct reply {
    uint8_t cmd;      /* 0: the MTA was told not to wait for one */
    char text[1024];  /* REPLYCODE text */
};

/* offline_report.c */
/* The action a reply stands for: "continue", "reject"... */
const char *offline_action_of(const struct reply *rp);
/* Records one modification packet for the report and applies it. */
void offline_take_mod(struct run *r, uint8_t cmd, const uint8_t *p, size_t n);
/* Remembers the headers as the milter saw them (before eom's changes). */
void offline_headers_before(struct run *r);
/* Records a stage of a handled event: its argument and the reply. */
void offline_stage(struct run *r, int ev, const char *arg,
                   const struct reply *rp);
/* Empties the message's report (r->msg is the caller's). */
void offline_msg_reset(struct run *r);
void offline_msg_free(struct run *r);
/*
 * The message's report: appended to json as one document ("file" named
 * when file is not NULL), or printed as text on stdout. sender is the
 * envelope sender the MTA was given.
 */
void offline_report(struct run *r, const char *sender, const char *file,
                    struct buf *json, int as_json);

#endif
