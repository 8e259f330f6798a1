/*
 * benchgen: the load generator of scripts/bench. A milter client (the MTA
 * side) that runs full Postfix-like sessions against a milter server and
 * measures throughput and latency.
 *
 * Per connection: OPTNEG (version 6, actions 0x1ff, protocol 0x1fffff, as
 * Postfix offers), MACRO+CONNECT, MACRO+HELO; per message MAIL, RCPT x n,
 * DATA, HEADER x h, EOH, BODY chunks (<= 65535 bytes), BODYEOB, ABORT; at
 * the end ABORT and QUIT. Every event is preceded by the MACRO packet
 * Postfix sends for it. The negotiated NO* bits suppress events (Postfix
 * still sends the MACRO packets of suppressed CONNECT..DATA), the NR* bits
 * make the generator write on without waiting (pipelining, as Postfix
 * does), and a SKIP reply stops the body. Every reply is checked against
 * the replies legal at its stage; wrong replies, missing headers, timeouts
 * and disconnects are errors, counted and reported; the exit status is 1
 * when there was any.
 *
 * Files: benchgen.c the sessions (one epoll loop per thread),
 * benchgen_proc.c the server's CPU and memory from /proc, benchgen_main.c
 * options, the time window and the RESULT line. Shares no code with
 * luamilter (src/), so a codec bug there cannot cancel itself out here.
 * Depends on libc and pthreads only.
 */
#ifndef BENCHGEN_H
#define BENCHGEN_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* Protocol vocabulary (see milter-protocol.md sections 3-5). */
#define OFFER_VERSION 6u
#define OFFER_ACTIONS 0x1ffu
#define OFFER_PROTOCOL 0x1fffffu

enum step {
    S_OPTNEG,
    S_CONNECT,
    S_HELO,
    S_MAIL,
    S_RCPT,
    S_DATA,
    S_HEADER,
    S_EOH,
    S_BODY,
    S_EOB,
    S_ABORT,
    S_QUIT,
    S_IDLE,
    S_END
};
extern const char *const gen_step_names[];

enum err_kind { E_WRONG, E_HEADER, E_TIMEOUT, E_DISCONNECT, E_CONNECT, E__N };
extern const char *const gen_err_names[E__N];

struct opts {
    const char *spec;
    const char *label;
    const char *expect_header;
    int conc, msgs_per_conn, rcpts, headers, threads, idle, probe;
    size_t body;
    double duration, warmup, timeout, settle;
    long total; /* stop after this many messages; 0 = by time */
    long max_errors; /* give up after this many errors */
    int server_pid;
    int helper_pid; /* its CPU is neither the server's nor noise */
};
extern struct opts O;

/* An output segment: bytes in the conn's obuf, or borrowed (the body). */
struct seg {
    const char *ext; /* NULL: bytes at obuf + off */
    size_t off, len;
};

/* One connection slot; a new connection reuses it when one ends. */
struct conn {
    struct worker *w;
    int fd, slot, active;
    uint32_t version, actions, protocol; /* negotiated */
    int step, await, idx, msgs, skip, got_header, epollout;
    size_t body_off;
    unsigned long serial; /* connection number, for names */
    unsigned long mseq; /* message number, for the queue id */
    char qid[16];
    double t_mail, deadline;
    char *obuf; /* owned */
    size_t olen, ocap;
    struct seg *segs; /* owned */
    int nsegs, segcap, segpos;
    size_t segoff;
    char *ibuf; /* owned */
    size_t ilen, icap;
};

/* One thread: its epoll loop, its connections and its statistics. */
struct worker {
    int id, ep, nconns, active;
    struct conn *conns; /* owned */
    unsigned long next_serial;
    double *lat; /* latencies (s) of messages completed in the window */
    size_t nlat, latcap;
    long done_window, done_total, conns_opened;
    long errs[E__N];
    double t_last_done;
    pthread_t th;
};

/* Set before the threads start, read-only afterwards. */
extern struct sockaddr_storage g_addr;
extern socklen_t g_addrlen;
extern int g_is_tcp;
extern double t_start, t_ws, t_we; /* start, measured window [t_ws, t_we) */
/* Shared by the threads. */
extern atomic_long g_started, g_errors;
extern atomic_int g_stop;
extern atomic_uint g_neg_protocol;

/* benchgen.c */
double gen_now(void); /* monotonic seconds */
/* Prints the message and exits 2. */
void gen_die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void *gen_xrealloc(void *p, size_t n); /* dies when out of memory */
void gen_make_body(size_t n); /* the shared body */
void gen_put_u32(unsigned char *p, uint32_t v);
uint32_t gen_get_u32(const unsigned char *p);
const char *gen_show(int cmd); /* 'c' or 0x01; per thread */
int gen_connect_fd(void); /* -1 and errno on failure */
int gen_conn_start(struct conn *c); /* -1: connect failed */
void gen_conn_close(struct conn *c);
void gen_err(struct conn *c, int kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Runs w's connections until none is active or `until` (0 = no limit). */
void gen_worker_loop(struct worker *w, double until);
void *gen_worker_main(void *w); /* thread entry */

/* benchgen_proc.c: the process tree under root (supervisor + workers) */
double proc_cpu(int root, int *nprocs); /* utime+stime, seconds */
long proc_status_kb(int root, const char *key); /* sum of VmRSS/VmHWM */
void proc_reset_hwm(int root); /* VmHWM := VmRSS */
double proc_machine_busy(void); /* busy seconds, all CPUs */
double proc_self_cpu(void); /* this process */

#endif
