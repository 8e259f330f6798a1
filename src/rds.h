/*
 * rds: Redis commands through hiredis on the process's event loop (aio.h),
 * without Lua. One connection per URL and process, made on first use
 * (AUTH and SELECT go first: the user's commands wait until both
 * answered) and made again after an error, a disconnect or a timeout. A
 * request is one command or a pipeline of several, written in one go; its
 * callback runs once, from the loop (never from inside rds_start), with
 * every reply or an error, unless rds_cancel() comes first.
 */
#ifndef LUAMILTER_RDS_H
#define LUAMILTER_RDS_H

#include <stddef.h>

enum rds_type { RDS_STRING, RDS_STATUS, RDS_INTEGER, RDS_NIL, RDS_ARRAY,
                RDS_ERROR };

/* One reply, owned by the engine and borrowed for the callback. */
struct rds_reply {
    int type;               /* RDS_* */
    long long integer;      /* RDS_INTEGER */
    char *str;              /* RDS_STRING, RDS_STATUS, RDS_ERROR */
    size_t len;
    size_t n;               /* RDS_ARRAY: its elements */
    struct rds_reply *elem;
};

struct rds;     /* a server, by URL: process-wide, never freed */
struct rds_req; /* a request: one or more commands */

/* err NULL: n replies (one per command, in order); else "timeout",
 * "closed", "connection refused", a failed AUTH/SELECT's error text...
 * (borrowed for the call) and no replies. */
typedef void (*rds_cb)(void *ud, const char *err,
                       const struct rds_reply *replies, size_t n);

/*
 * The server of url: "redis://[[user]:password@]host[:port][/db]" (host a
 * numeric IPv4 address, [IPv6] or localhost; port 6379, db 0 by default)
 * or "unix:/path[?db=N][&password=P]". The same URL gives the same
 * server. Returns a borrowed handle, or NULL with *err set (a bad URL,
 * too many URLs, no memory).
 */
struct rds *rds_get(const char *url, const char **err);

/* An owned request for ncmds commands; NULL when out of memory. */
struct rds_req *rds_req_new(size_t ncmds);
/* Adds a command (copied); -1 when out of memory or already full. */
int rds_req_add(struct rds_req *q, int argc, const char *const *argv,
                const size_t *lens);
/* Frees a request that was not started (q may be NULL). */
void rds_req_free(struct rds_req *q);
/*
 * Sends q's commands to r (takes ownership of q, which must be full);
 * cb runs once, from the loop, after every reply or an error, at the
 * latest after timeout seconds ("timeout": the connection is dropped).
 * Returns 0, or -1 when out of memory (q is freed, cb will not run).
 */
int rds_start(struct rds *r, struct rds_req *q, double timeout, rds_cb cb,
              void *ud);
/* cb will not run; the handle is invalid afterwards (the engine frees
 * it once hiredis is done with it). */
void rds_cancel(struct rds_req *q);
/* At exit: closes every connection; requests still pending fail. */
void rds_shutdown(void);

#endif
