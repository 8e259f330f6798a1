/*
 * hplan: the header-list planner. Given the headers the milter saw and the
 * list the script wants delivered (the eom verdict's `headers`), keeps
 * what is unchanged, changes values in place, deletes the rest and
 * inserts what is new, as packets in the MTA's own counting (mta.h). The
 * delivered block is then exactly the wanted list, in order, below the
 * MTA's trace header. Where the MTA cannot place an insert between
 * message headers (Sendmail, Stalwart), the headers after it are deleted
 * and appended again: exact, at the price of more packets.
 * Part of the session layer: no I/O, no Lua.
 */
#ifndef LUAMILTER_HPLAN_H
#define LUAMILTER_HPLAN_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "wire.h"

struct hp_hdr {
    struct wire_str name, value;
};

/*
 * Pairs the headers of o that stay (unchanged or changed in place) with
 * their place in w: om[i] = j or -1, wm[j] = i or -1. Fewest changes
 * first; large lists that differ a lot get a cheaper, still exact,
 * pairing. Returns 0 or -1 (out of memory). Borrows everything.
 */
int hplan_match(int mta, const struct hp_hdr *o, size_t n,
                const struct hp_hdr *w, size_t m, int32_t *om, int32_t *wm);

/*
 * Appends the packets that make the delivered block w, when the MTA's
 * list holds the ntop headers tops (inserted above its trace header
 * earlier in this reply; only their names count) and then the message's
 * n headers o. Sends nothing when w equals o. Returns 0 or -1 (out of
 * memory, a packet too big) with out holding part of the packets.
 */
int hplan_put(int mta, const struct hp_hdr *tops, size_t ntop,
              const struct hp_hdr *o, size_t n, const struct hp_hdr *w,
              size_t m, struct buf *out);

#endif
