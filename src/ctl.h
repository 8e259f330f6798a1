/*
 * ctl: the control channel between the supervisor and one worker, a
 * SOCK_SEQPACKET socketpair (one message per packet, both ends
 * non-blocking so neither side ever waits on the other).
 *
 * Supervisor -> worker: a script generation and, as an fd (SCM_RIGHTS), a
 * memfd with the exact bytes the supervisor checked. Worker -> supervisor:
 * "send generation N again", when the fd of N was lost on the way (the
 * worker was out of file descriptors: MSG_CTRUNC), and "done with
 * generation N" once the worker has loaded it (or failed to and keeps its
 * previous one), which is how the supervisor knows it is ready (notify.h).
 * Plain sockets: no libev, no Lua.
 */
#ifndef LUAMILTER_CTL_H
#define LUAMILTER_CTL_H

#include <stdint.h>

/* Makes the pair: sv[0] for the supervisor, sv[1] for the worker. */
int ctl_pair(int sv[2]);

/* Sends generation gen with script_fd (borrowed): 0, or -1 with errno
 * (EAGAIN: the worker's queue is full; send again once writable). */
int ctl_send_script(int fd, uint32_t gen, int script_fd);

/*
 * Worker: reads every pending message. The newest script fd received is
 * left in *script_fd with its generation in *gen (older ones are closed;
 * *script_fd stays -1 when none came); *lost is the newest generation whose
 * fd did not arrive (0: none). Returns 0, or -1 when the supervisor is gone.
 */
int ctl_drain(int fd, uint32_t *gen, int *script_fd, uint32_t *lost);

/* Worker: asks for generation gen again; 0 or -1. */
int ctl_ask_again(int fd, uint32_t gen);

/* Worker: reports that it is done with generation gen (loaded, or failed
 * to load and kept the one before); 0 or -1. */
int ctl_loaded(int fd, uint32_t gen);

/* Supervisor: reads the worker's messages; returns 1 when one asked for a
 * resend, 0 when none is pending, -1 when the worker is gone. *loaded is
 * raised to the newest generation the worker reported done with. */
int ctl_read_requests(int fd, uint32_t *loaded);

#endif
