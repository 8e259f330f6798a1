/*
 * aio: the event loop that lookups run on, one per process (a worker, or
 * `luamilter test`), and one-shot timers on it for milter.sleep and for
 * every lookup's timeout. Glue layer: engines include ev.h; this header
 * does not, so the Lua bindings can use it.
 */
#ifndef LUAMILTER_AIO_H
#define LUAMILTER_AIO_H

struct ev_loop;

/* The loop every engine runs on (borrowed; set once per process). */
void aio_set_loop(struct ev_loop *loop);
struct ev_loop *aio_loop(void);
/* For a process without a loop of its own (luamilter test): libev's
 * default loop. */
void aio_use_default_loop(void);
/* Runs the loop until *flag is non-zero (set by a callback). */
void aio_run_until(const volatile int *flag);

struct tmr;
typedef void (*tmr_cb)(void *ud);
/*
 * Calls cb(ud) once, after `after` seconds (0: at the next loop
 * iteration). Returns an owned handle, freed after cb returns or by
 * tmr_cancel; NULL when out of memory.
 */
struct tmr *tmr_start(double after, tmr_cb cb, void *ud);
/* Stops t before it fires and frees it (t may be NULL). */
void tmr_cancel(struct tmr *t);

#endif
