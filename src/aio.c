/* aio: see aio.h. */
#include "aio.h"

#include <ev.h>
#include <stddef.h>
#include <stdlib.h>

static struct ev_loop *loop;

void aio_set_loop(struct ev_loop *l) { loop = l; }
struct ev_loop *aio_loop(void) { return loop; }
void aio_use_default_loop(void) { loop = ev_default_loop(EVFLAG_AUTO); }

void aio_run_until(const volatile int *flag)
{
    while (!*flag)
        ev_run(loop, EVRUN_ONCE);
}

struct tmr {
    ev_timer w; /* first member: the callback casts back */
    tmr_cb cb;
    void *ud;
};

static void fired(struct ev_loop *l, ev_timer *w, int revents)
{
    (void)l;
    (void)revents;
    struct tmr *t = (struct tmr *)w;
    tmr_cb cb = t->cb;
    void *ud = t->ud;
    free(t); /* before the callback, which may start another timer */
    cb(ud);
}

struct tmr *tmr_start(double after, tmr_cb cb, void *ud)
{
    struct tmr *t = malloc(sizeof *t);
    if (!t)
        return NULL;
    t->cb = cb;
    t->ud = ud;
    /* from now, not from the loop's last wake-up (libev's cached time):
     * the handler that starts it may have run for a while since */
    ev_now_update(loop);
    ev_timer_init(&t->w, fired, after > 0 ? after : 0, 0);
    ev_timer_start(loop, &t->w);
    return t;
}

void tmr_cancel(struct tmr *t)
{
    if (!t)
        return;
    ev_timer_stop(loop, &t->w);
    free(t);
}
