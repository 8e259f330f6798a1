/*
 * dnsr: DNS lookups through c-ares on the process's event loop (aio.h),
 * without Lua. c-ares reads and writes the packets; this file drives its
 * sockets with ev_io (ARES_OPT_SOCK_STATE_CB), its retransmissions with an
 * ev_timer, and gives each query a deadline of its own.
 */
#ifndef LUAMILTER_DNSR_H
#define LUAMILTER_DNSR_H

#include <stddef.h>

enum dnsr_type {
    DNSR_A, DNSR_AAAA, DNSR_MX, DNSR_TXT, DNSR_PTR, DNSR_CNAME, DNSR_NS
};

/* One record of an answer; borrowed for the callback's duration. */
struct dnsr_rr {
    const char *s; /* address, host name or TXT text (joined strings) */
    size_t len;
    int pref;      /* MX preference */
};

/* err NULL: the server answered (n 0 when the name or type has none). */
struct dnsr_answer {
    const char *err; /* "timeout", "servfail", "refused"... (static) */
    size_t n;
    const struct dnsr_rr *rr;
};

typedef void (*dnsr_cb)(void *ud, const struct dnsr_answer *a);
struct dnsr_req;

/* The resolver: "HOST[:PORT]" ("[v6]:PORT"), or NULL for resolv.conf. */
void dnsr_set_server(const char *server);
/*
 * Looks name up. cb runs once, from the loop (never from inside this
 * call), unless dnsr_cancel() comes first. Returns a handle owned by the
 * engine until then, or NULL with *err set when the query cannot start.
 */
struct dnsr_req *dnsr_query(const char *name, int type, double timeout,
                            dnsr_cb cb, void *ud, const char **err);
/* cb will not run; the handle is invalid afterwards. */
void dnsr_cancel(struct dnsr_req *r);
/* At exit: ends every query still inside c-ares and frees the resolver. */
void dnsr_shutdown(void);

/* Writes the reverse name of an IPv4 or IPv6 address (PTR, DNSBL) into
 * out, followed by "." zone when zone is set; -1 if addr is no address. */
int dnsr_reverse(const char *addr, const char *zone, char *out, size_t n);

#endif
