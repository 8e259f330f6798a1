/*
 * hmodel: an MTA's header list as its milter code edits it, one
 * ADDHEADER/INSHEADER/CHGHEADER packet at a time (Postfix 3.7 §7,
 * Sendmail 8.17 §13b with a given number of .cf default headers above
 * the message, Stalwart §13). Plain and quadratic: the tests check the
 * planners (mods.c, hplan.c) against it. No I/O, no Lua.
 */
#ifndef LUAMILTER_HMODEL_H
#define LUAMILTER_HMODEL_H

#include <stddef.h>
#include <stdint.h>

#include "wire.h"

enum { HM_HIDDEN = 1, HM_USER = 2, HM_DELETED = 4, HM_TRACE = 8 };

struct hm_entry {
    char *name, *value; /* owned */
    uint8_t flags;
};

struct hm {
    int mta; /* enum mta_kind */
    struct hm_entry *e;
    size_t n, cap;
};

/*
 * An empty list with the MTA's own headers: Postfix's hidden Received:,
 * Sendmail's `slots` .cf defaults (the 2nd is its Received:, shown; the
 * others hidden), nothing for Stalwart. Returns 0 or -1.
 */
int hm_init(struct hm *m, int mta, unsigned slots);
void hm_free(struct hm *m);
/* Appends a header that came with the message. */
int hm_add(struct hm *m, const char *name, size_t nlen, const char *value,
           size_t vlen);
/* Applies one packet (cmd, payload) as the MTA would. -1: malformed. */
int hm_apply(struct hm *m, uint8_t cmd, const uint8_t *p, size_t len);
/* Applies every header packet in a buffer of packets; others skipped. */
int hm_apply_all(struct hm *m, const uint8_t *p, size_t len);
/*
 * The delivered list, in order: the shown entries (trace included, flag
 * HM_TRACE) at out[0..*n). Borrows from m; out has room for m->n.
 */
void hm_delivered(const struct hm *m, const struct hm_entry **out, size_t *n);

#endif
