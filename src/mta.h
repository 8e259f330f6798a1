/*
 * mta: which MTA is on the other end, and what that means for its header
 * list. Each MTA answers ADDHEADER, INSHEADER and CHGHEADER differently
 * (milter-protocol.md §7, §13, §13b); the header planners (mods.c,
 * hplan.c) ask the rules below, and hmodel.c simulates them exactly.
 * Detection reads only what the MTA sent by default: its OPTNEG offer and
 * its macros (v where sent, else Sendmail's {if_name}/{if_addr}, Stalwart's
 * {client_addr} at connect). Part of the session layer: no I/O, no Lua.
 */
#ifndef LUAMILTER_MTA_H
#define LUAMILTER_MTA_H

#include <stddef.h>
#include <stdint.h>

enum mta_kind { MTA_AUTO, MTA_POSTFIX, MTA_SENDMAIL, MTA_STALWART };

struct sess;

/* "postfix", "sendmail", "stalwart" ("auto" for MTA_AUTO). */
const char *mta_name(int kind);
/* The kind a --mta word names, or -1. */
int mta_parse(const char *word);

/*
 * Which MTA sent this session's macros and offer (kind from --mta unless
 * MTA_AUTO). *why (borrowed, static) says what decided it. Never
 * MTA_AUTO: without any sign, Postfix.
 */
int mta_detect(const struct sess *s, const char **why);
/* Detects again, stores s->mta, and logs at debug when it is news. */
void mta_update(struct sess *s);
/* At the end of a message: detects again only when macro v, missing
 * until then, has come (asked for at DATA); nothing else it reads can
 * change within a session. */
void mta_recheck(struct sess *s);

/*
 * The macro names to ask for at the DATA stage in the OPTNEG reply, so
 * that macro v (the MTA's version) arrives where the MTA's own connect
 * list lacks it (Sendmail's default). "i" is kept: it is Postfix's whole
 * default DATA list, which a list of ours replaces.
 */
#define MTA_DATA_MACROS "i v"

/* The MTA's header-list rules. */
struct mta_rules {
    uint8_t hidden_top;   /* entries above the message the milter never
                             saw, counted by INSHEADER (Postfix: 1) */
    uint8_t positional;   /* INSHEADER lands at an index we can compute */
    uint8_t renames;      /* CHGHEADER writes the filter's name spelling */
    uint8_t keeps_slot;   /* a deleted header still counts for CHGHEADER */
    uint8_t append_ins;   /* append with INSHEADER MTA_APPEND, not ADDHEADER */
};
#define MTA_APPEND 0x7fffffffu /* an INSHEADER index past any list */

const struct mta_rules *mta_rules(int kind);

#endif
