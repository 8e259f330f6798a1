/*
 * pfsim: a message as Postfix's cleanup server sees it, and Postfix's way of
 * applying milter modifications to it (milter-protocol.md §7): header
 * indexes, the hidden trace header, body replacement, envelope changes.
 * Used by the offline test mode to show the message as it would be
 * delivered. Pure: no I/O, no Lua, no libev.
 */
#ifndef LUAMILTER_PFSIM_H
#define LUAMILTER_PFSIM_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "wire.h"

struct pf_hdr {
    char *name;   /* owned */
    char *text;   /* owned: the whole header, lines joined with "\n" */
    char *value;  /* owned: as milters get it (one leading space removed) */
    uint8_t hidden; /* the MTA's own trace header */
};

struct pf_msg {
    struct pf_hdr *h;
    size_t nh, caph;
    struct buf body;      /* CRLF line ends */
    int has_body;         /* the message had a separator line */
    struct buf newbody;   /* REPLBODY packets, concatenated */
    int replaced;
    char *sender;         /* owned envelope sender, or NULL */
    char **rcpts;         /* owned envelope recipients */
    size_t nrcpts;
    char *quarantine;     /* owned reason, or NULL */
};

/* Parses a message with CRLF or bare LF line ends. Returns 0 or -1. */
int pf_parse(struct pf_msg *m, const char *data, size_t len);
void pf_free(struct pf_msg *m);
/* Puts the MTA's trace header (e.g. "Received: ...") at the top. */
int pf_add_trace(struct pf_msg *m, const char *text);
int pf_add_rcpt(struct pf_msg *m, const char *addr);
int pf_set_sender(struct pf_msg *m, const char *addr);
/*
 * Applies one modification packet (cmd + payload) as Postfix would.
 * Returns 0, or -1 with *err set for a packet Postfix refuses.
 */
int pf_apply(struct pf_msg *m, uint8_t cmd, const uint8_t *p, size_t len,
             const char **err);
/* Writes the message as delivered (CRLF line ends) to out. */
int pf_render(struct pf_msg *m, struct buf *out);

#endif
