/* mta: see mta.h. */
#include "mta.h"

#include <ctype.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "sess.h"

static const char *const names[] = {"auto", "postfix", "sendmail",
                                    "stalwart"};

const char *mta_name(int kind)
{
    return kind >= 0 && kind <= MTA_STALWART ? names[kind] : "?";
}

int mta_parse(const char *word)
{
    for (int k = 0; k <= MTA_STALWART; k++)
        if (strcmp(word, names[k]) == 0)
            return k;
    return -1;
}

static int has(const struct sess *s, const char *name)
{
    return sess_macro(s, name, strlen(name), NULL) != NULL;
}

int mta_detect(const struct sess *s, const char **why)
{
    size_t n = 0;
    if (s->cfg->mta != MTA_AUTO) {
        *why = "--mta";
        return s->cfg->mta;
    }
    const char *v = sess_macro(s, "v", 1, &n); /* "v" and "{v}" */
    if (v && n >= 7 && strncasecmp(v, "Postfix", 7) == 0) {
        *why = "macro v names Postfix";
        return MTA_POSTFIX;
    }
    if (v && n >= 8 && strncasecmp(v, "Stalwart", 8) == 0) {
        *why = "macro v names Stalwart";
        return MTA_STALWART;
    }
    if (v && n && isdigit((unsigned char)v[0])) {
        *why = "macro v is a bare version number (Sendmail's $v)";
        return MTA_SENDMAIL;
    }
    if (has(s, "{if_name}") || has(s, "{if_addr}")) {
        *why = "Sendmail's default connect macro {if_name}/{if_addr}";
        return MTA_SENDMAIL;
    }
    if (!(s->offered_actions & SMFIF_SETSYMLIST) &&
        (has(s, "{client_ptr}") || has(s, "{client_addr}"))) {
        *why = "no SETSYMLIST offered and {client_addr}/{client_ptr} at "
               "connect (Stalwart's defaults)";
        return MTA_STALWART;
    }
    if (!v && has(s, "_") && has(s, "j")) {
        *why = "macros j and _ without v (Sendmail's default connect list)";
        return MTA_SENDMAIL;
    }
    *why = v ? "macro v, unknown MTA: Postfix's rules"
             : "no sign of the MTA: Postfix's rules";
    return MTA_POSTFIX;
}

void mta_update(struct sess *s)
{
    const char *why;
    int kind = mta_detect(s, &why);
    if (kind != s->mta || !s->mta_logged)
        log_msg(LL_DEBUG, s->id, sess_qid(s), "MTA: %s (%s)", mta_name(kind),
                why);
    s->mta = (uint8_t)kind;
    s->mta_logged = 1;
    s->mta_by_v = sess_macro(s, "v", 1, NULL) != NULL;
}

void mta_recheck(struct sess *s)
{
    if (s->mta_logged && (s->cfg->mta != MTA_AUTO || s->mta_by_v ||
                          !sess_macro(s, "v", 1, NULL)))
        return;
    mta_update(s);
}

/*
 * Postfix 3.7 (§7): its Received: is hidden above the message and counted
 * by INSHEADER only; CHGHEADER rewrites the name; a deleted header is
 * gone. Sendmail 8.17 (§13b): its .cf's default headers sit above the
 * message, how many depends on the .cf, so no INSHEADER index between
 * message headers is safe; a deleted header keeps its slot; CHGHEADER
 * keeps the old name; ADDHEADER of an existing name lands before the
 * first of that name, so appends use INSHEADER past the end. Stalwart
 * (§7, §13, from its source): INSHEADER counts per name, so only
 * appends are placed exactly; CHGHEADER per name, deleted headers gone.
 */
static const struct mta_rules rules[] = {
    [MTA_AUTO] = {1, 1, 1, 0, 0},
    [MTA_POSTFIX] = {1, 1, 1, 0, 0},
    [MTA_SENDMAIL] = {0, 0, 0, 1, 1},
    [MTA_STALWART] = {0, 0, 0, 0, 0},
};

const struct mta_rules *mta_rules(int kind)
{
    return &rules[kind >= 0 && kind <= MTA_STALWART ? kind : MTA_POSTFIX];
}
