/*
 * tcpc: a non-blocking TCP or unix-socket client on the process's event
 * loop (aio.h), without Lua: connect, send all bytes, receive a line, N
 * bytes or everything until the peer closes. One operation at a time per
 * socket, each with its own deadline; its callback runs once, from the
 * loop, unless the operation is cancelled or the socket closed first.
 */
#ifndef LUAMILTER_TCPC_H
#define LUAMILTER_TCPC_H

#include <stddef.h>

struct tcpc;

/* err NULL: done (data/len: what a receive got, borrowed for the call);
 * else "timeout", "closed", "connection refused"... (static). A receive
 * that fails after some bytes hands those bytes over with the error. */
typedef void (*tcpc_cb)(void *ud, const char *err, const char *data,
                        size_t len);

enum tcpc_mode { TCPC_LINE, TCPC_BYTES, TCPC_ALL };

/*
 * Starts connecting to host:port (a numeric IPv4 or IPv6 address) or, with
 * host "unix:/path", to a unix socket. Returns an owned socket, or NULL
 * with *err set (bad address, no memory, no descriptor).
 */
struct tcpc *tcpc_connect(const char *host, int port, double timeout,
                          tcpc_cb cb, void *ud, const char **err);
/* Sends all of data (copied). 0, or -1 when an operation is pending. */
int tcpc_send(struct tcpc *t, const char *data, size_t len, double timeout,
              tcpc_cb cb, void *ud);
/* Receives a line (without CR LF), n bytes, or all until EOF. */
int tcpc_receive(struct tcpc *t, int mode, size_t n, double timeout,
                 tcpc_cb cb, void *ud);
/* Stops the pending operation, if any: its callback will not run. */
void tcpc_cancel(struct tcpc *t);
/* Cancels, closes and frees t (t may be NULL). */
void tcpc_close(struct tcpc *t);

#endif
