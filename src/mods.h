/*
 * mods: turns an eom verdict's modifications into milter packets.
 *
 * Scripts count headers the way they saw them (ctx.headers); MTAs count
 * differently (Postfix hides its own Received: header from CHGHEADER but
 * counts it for INSHEADER, and evaluates every index against the list as
 * already modified by the same reply). A small model of the MTA's header
 * list, updated as each packet is planned, translates one into the other.
 * Part of the session layer: no I/O, no Lua.
 */
#ifndef LUAMILTER_MODS_H
#define LUAMILTER_MODS_H

#include "buf.h"
#include "sess.h"

/*
 * Appends the packets for v's modifications (not the final reply) to out,
 * in the documented order: headers (add, insert, change, delete), add_rcpt,
 * del_rcpt, change_from, replace_body, quarantine. v->mods must list every
 * add and insert before the first change or delete (lverdict's order).
 * Returns 0, or -1 (out of memory, a packet above WIRE_MAX_CHUNK, an insert
 * after a change) with out possibly holding part of the packets: the
 * caller drops them. O(n log n) in headers and modifications. Borrows s
 * and v.
 */
int mods_put(struct sess *s, const struct verdict *v, struct buf *out);

#endif
