/* conn: see conn.h. */
#define _GNU_SOURCE
#include "conn.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "metrics.h"

#define READ_CHUNK (64 * 1024)
/* Seconds between progress packets while an eom handler waits: well
 * below any MTA's content timeout (Postfix: 300 s, Sendmail: 5 min). */
#define PROGRESS_EVERY 3.0

/* What the watchdog writes if the handler about to run never returns. */
static void watch_handler(struct conn *c, int ev)
{
    /* no reply for a reply-free event (a held header verdict): the MTA
     * waits for no answer to it, and a stray one would answer its next */
    watchdog_watch(c->finishing ? -1 : c->fd, buf_head(&c->wbuf),
                   buf_len(&c->wbuf),
                   ev != SE_ABORT && ev != SE_CLOSE && c->sess.wait.reply, ev,
                   c->id, c->gen);
}

/* Handler and lookup times are read only where something reports them:
 * the message line (info) or the metrics. Two clock reads per call. */
static double clock_if_reported(void)
{
    return log_enabled(LL_INFO) || metrics_cur ? msglog_clock() : 0;
}

/* A slice of ev's handler, begun at t0, ended with rc: its time counts
 * for the message line, and a wait on a lookup begins now. */
static void handler_ran(struct conn *c, int ev, int rc, double t0)
{
    double t1 = clock_if_reported();
    msglog_handler(&c->mlog, ev, rc, t1 - t0);
    if (rc == LB_WAIT)
        c->wait_since = t1;
    if (!metrics_cur) { /* nothing to count, per header or at all */
        if (rc != LB_WAIT)
            c->held_batch = 0;
        return;
    }
    if (c->held_batch) /* the header handlers that have started */
        for (; c->held_counted < c->sess.hdrs_run; c->held_counted++)
            metrics_call(ev);
    if (rc == LB_WAIT)
        return;
    if (!c->held_batch) {
        metrics_call_done(ev, rc < 0, t1 - c->call_started);
    } else { /* a batch: each handler its share of the time */
        uint32_t ran = c->sess.hdrs_run - c->held_first;
        for (uint32_t i = 0; i < ran; i++)
            metrics_call_done(ev, rc < 0 && i + 1 == ran,
                              (t1 - c->call_started) / ran);
        c->held_batch = 0;
    }
}

/*
 * Starts the progress packets unless they run. A wait that follows
 * another (the next lookup, the next reply-free handler) keeps their
 * cadence: the next packet is due PROGRESS_EVERY after the last one (or
 * after the MTA's wait was first seen), not a whole interval from now,
 * which could leave the MTA twice that long without a word (Sendmail
 * gives up after its R= timeout, 10 s by default).
 */
static void progress_on(struct conn *c)
{
    if (ev_is_active(&c->progress))
        return;
    double now = ev_now(c->srv->loop), due = PROGRESS_EVERY;
    if (c->progress_mark > 0) {
        due = c->progress_mark + PROGRESS_EVERY - now;
        if (due < 0.001)
            due = 0.001;
        if (due > PROGRESS_EVERY)
            due = PROGRESS_EVERY;
    } else {
        c->progress_mark = now;
    }
    ev_timer_set(&c->progress, due, PROGRESS_EVERY);
    ev_timer_start(c->srv->loop, &c->progress);
}

static void start_progress(struct conn *c, int ev)
{
    if (ev == SE_EOM && !c->finishing)
        progress_on(c);
}

/*
 * A reply-free handler (a held header, eoh or body verdict) waits while
 * the MTA, having pipelined the rest of the message, already waits for
 * the BODYEOB reply among the frames kept in p[0..n): progress packets
 * then keep its timeout from firing, as for a waiting eom handler.
 */
static void progress_if_awaited(struct conn *c, const uint8_t *p, size_t n)
{
    if (c->finishing || !sess_waiting(&c->sess) || c->sess.wait.reply ||
        ev_is_active(&c->progress))
        return;
    for (size_t off = 0;;) {
        struct wire_frame f;
        size_t used;
        const char *err;
        if (wire_next_frame(p + off, n - off, c->srv->max_frame, &f, &used,
                            &err) != WIRE_FRAME)
            return;
        if (f.cmd == WIRE_BODYEOB) {
            progress_on(c);
            return;
        }
        off += used;
    }
}

/* One handler call, or one batch of n > 0 held headers, with the
 * watchdog, the message log, metrics and progress around it. */
static int call_with(struct conn *c, struct sess *s, int ev,
                     const struct wire_cmd *cmd, uint32_t first, uint32_t n,
                     struct verdict *v)
{
    watch_handler(c, ev);
    msglog_touch(&c->mlog, s);
    if (!n)
        metrics_call(ev); /* a batch's are counted as they start */
    double t0 = clock_if_reported();
    c->call_started = t0;
    c->held_first = c->held_counted = first;
    c->held_batch = n > 0;
    int rc = n ? lb_call_headers(&c->lua, s, first, n, v)
               : lb_call(&c->lua, s, ev, cmd, v);
    handler_ran(c, ev, rc, t0);
    watchdog_unwatch();
    if (rc == LB_WAIT)
        start_progress(c, ev);
    return rc;
}

static int call_lua(void *ud, struct sess *s, int ev,
                    const struct wire_cmd *cmd, struct verdict *v)
{
    return call_with(ud, s, ev, cmd, 0, 0, v);
}

static int call_lua_headers(void *ud, struct sess *s, uint32_t first,
                            uint32_t n, struct verdict *v)
{
    return call_with(ud, s, SE_HEADER, NULL, first, n, v);
}

static const char *site_of(void *ud, int ev)
{
    struct conn *c = ud;
    return lb_handler_site(&c->lua, ev);
}

/* The session's notes: a refused recipient, a message's end. */
static void on_note(void *ud, struct sess *s, int what, int ev,
                    const struct verdict *v)
{
    struct conn *c = ud;
    int mv = msglog_note(&c->mlog, s, what, ev, v, site_of, c);
    if (what == SN_RCPT_REFUSED)
        metrics_rcpt_refused();
    else
        metrics_message(mv);
}

static const struct sess_ops lua_ops = {call_lua, call_lua_headers};

static void conn_free(struct conn *c)
{
    struct server *srv = c->srv;
    log_gen = c->gen;
    ev_io_stop(srv->loop, &c->io);
    ev_timer_stop(srv->loop, &c->timer);
    ev_timer_stop(srv->loop, &c->progress);
    ev_timer_stop(srv->loop, &c->resume);
    if (c->fd >= 0)
        close(c->fd);
    log_msg(LL_INFO, c->id, sess_qid(&c->sess),
            "closed after %.3fs, %u message(s)",
            ev_now(srv->loop) - c->started, c->msgs);
    sess_free(&c->sess);
    msglog_free(&c->mlog);
    metrics_conn_close();
    lb_conn_free(&c->lua);
    buf_free(&c->rbuf);
    buf_free(&c->wbuf);
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    srv->nconns--;
    free(c);
    if (srv->stopping && !srv->conns)
        ev_break(srv->loop, EVBREAK_ALL);
}

/* The handler that waits is one of the message's events, which the MTA
 * may give up on (not abort or close, which the session needs done). */
static int waits_on_event(const struct conn *c)
{
    return sess_waiting(&c->sess) && c->sess.wait.ev != SE_ABORT &&
           c->sess.wait.ev != SE_CLOSE;
}

/* The MTA no longer waits for the handler: drop it, never resume it. */
static void abandon(struct conn *c)
{
    ev_timer_stop(c->srv->loop, &c->progress);
    c->progress_mark = 0;
    ev_timer_stop(c->srv->loop, &c->resume);
    lb_abandon(&c->lua);
    sess_abandon(&c->sess);
    c->held_batch = 0;
    log_msg(LL_DEBUG, c->id, sess_qid(&c->sess),
            "the MTA gave up on a waiting handler: abandoned");
}

/*
 * The connection is over: runs abort and close (once), then frees it. If
 * one of them waits, the connection stays, without its socket, until it
 * is done (conn_resume comes back here).
 */
static void conn_end(struct conn *c)
{
    if (sess_waiting(&c->sess) || sess_finish(&c->sess) == SESS_WAIT) {
        c->finishing = 1;
        ev_io_stop(c->srv->loop, &c->io);
        ev_timer_stop(c->srv->loop, &c->timer);
        ev_timer_stop(c->srv->loop, &c->progress);
        if (c->fd >= 0)
            close(c->fd);
        c->fd = -1;
        return;
    }
    conn_free(c);
}

void conn_drop(struct conn *c, const char *why)
{
    log_gen = c->gen;
    if (why)
        log_msg(LL_INFO, c->id, sess_qid(&c->sess), "%s", why);
    if (waits_on_event(c))
        abandon(c);
    c->closing = 1;
    buf_reset(&c->wbuf);
    if (!c->in_callback)
        conn_end(c);
}

/* Writes what is queued; returns -1 when the peer is gone. */
static int flush(struct conn *c)
{
    while (buf_len(&c->wbuf)) {
        ssize_t n = send(c->fd, buf_head(&c->wbuf), buf_len(&c->wbuf),
                         MSG_NOSIGNAL);
        if (n > 0) {
            buf_consume(&c->wbuf, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        return -1;
    }
    /* Strict request/reply: read the next command only once the replies
     * are out, so a peer that stops reading cannot make us buffer more. */
    /* While a handler waits, frames are kept, not handled: read on to see
     * an ABORT or a hang-up, up to one more full frame. */
    int full = sess_waiting(&c->sess) &&
               buf_len(&c->rbuf) > c->srv->max_frame + 5;
    int want = buf_len(&c->wbuf)       ? EV_WRITE
               : c->closing || full     ? 0
                                        : EV_READ;
    if (want != (c->io.events & (EV_READ | EV_WRITE))) {
        ev_io_stop(c->srv->loop, &c->io);
        ev_io_set(&c->io, c->fd, want);
        if (want)
            ev_io_start(c->srv->loop, &c->io);
    }
    if (!buf_len(&c->wbuf))
        buf_shrink(&c->wbuf, 64 * 1024);
    return 0;
}

/*
 * While a handler waits, looks for the MTA giving up on it: an ABORT,
 * QUIT or QUIT_NC among the frames that came meanwhile. Returns where it
 * is (the handler is then abandoned and the frames before it, which
 * belonged to the abandoned message, are dropped), or 0 to keep waiting.
 */
static size_t give_up_at(struct conn *c, const uint8_t *p, size_t n,
                         int *found)
{
    size_t off = 0;
    *found = 0;
    if (!waits_on_event(c))
        return 0;
    for (;;) {
        struct wire_frame f;
        size_t used;
        const char *err;
        if (wire_next_frame(p + off, n - off, c->srv->max_frame, &f, &used,
                            &err) != WIRE_FRAME)
            return 0;
        if (f.cmd == WIRE_ABORT || f.cmd == WIRE_QUIT ||
            f.cmd == WIRE_QUIT_NC) {
            *found = 1;
            abandon(c);
            return off;
        }
        off += used;
    }
}

/* Handles frames from p + done until one waits, the connection closes or
 * a frame is incomplete; returns the new done. */
static size_t handle_frames(struct conn *c, const uint8_t *p, size_t n,
                            size_t done)
{
    while (!c->closing && !sess_waiting(&c->sess)) {
        struct wire_frame f;
        struct wire_cmd cmd;
        size_t used;
        const char *err = NULL;
        int rc = wire_next_frame(p + done, n - done, c->srv->max_frame, &f,
                                 &used, &err);
        if (rc == WIRE_NEED_MORE)
            break;
        if (rc == WIRE_FRAME && f.cmd == WIRE_MACRO &&
            sess_macro_repeats(&c->sess, &f)) {
            done += used; /* no reply, nothing to keep */
            continue;
        }
        if (rc == WIRE_ERROR || wire_decode(&f, &cmd, &err) < 0) {
            const uint8_t *h = p + done;
            log_msg(LL_WARN, c->id, sess_qid(&c->sess),
                    "malformed frame (%s: command 0x%02x, length %u): "
                    "closing the connection",
                    err, n - done > 4 ? h[4] : 0,
                    n - done >= 4 ? (unsigned)((uint32_t)h[0] << 24 |
                                               (uint32_t)h[1] << 16 |
                                               (uint32_t)h[2] << 8 | h[3])
                                  : 0);
            conn_drop(c, NULL);
            break;
        }
        /* Replies are flushed only after the whole read is handled, and a
         * session replays a long reply to every command of an ended
         * message: a peer that pipelines without reading must not make
         * us queue without bound. One large reply (replace_body) is fine;
         * another command on top of a full queue is not. */
        if (buf_len(&c->wbuf) > c->srv->max_wqueue) {
            log_msg(LL_WARN, c->id, sess_qid(&c->sess),
                    "the peer sends commands without reading its replies "
                    "(%zu bytes of replies queued, --max-write-queue %zu): "
                    "closing the connection",
                    buf_len(&c->wbuf), c->srv->max_wqueue);
            conn_drop(c, NULL);
            break;
        }
        rc = sess_handle(&c->sess, &cmd, &c->wbuf);
        if (rc == SESS_RETRY)
            break; /* its abort handler waits: this frame comes again */
        done += used;
        /* a message is one the MTA finished, whether or not eom is handled */
        if ((rc == SESS_OK || rc == SESS_WAIT) && cmd.cmd == WIRE_BODYEOB)
            c->msgs++;
        if (rc == SESS_CLOSE)
            c->closing = 1;
    }
    return done;
}

/*
 * Decodes and handles every complete frame in p[0..n); returns the bytes
 * used (what is left, a partial frame or frames kept while a handler
 * waits, is for the caller to keep). Frames that came with or after the
 * one whose handler waits are looked at for the MTA giving up on it.
 */
static size_t process(struct conn *c, const uint8_t *p, size_t n)
{
    size_t done = 0;
    for (;;) {
        if (sess_waiting(&c->sess)) {
            int found;
            size_t off = give_up_at(c, p + done, n - done, &found);
            if (!found) {
                progress_if_awaited(c, p + done, n - done);
                return done;
            }
            done += off; /* the abandoned message's frames are dropped */
        }
        done = handle_frames(c, p, n, done);
        /* the read is handled: the held headers' handlers run now */
        if (!c->closing && !sess_waiting(&c->sess) &&
            sess_flush(&c->sess, &c->wbuf) == SESS_CLOSE)
            c->closing = 1;
        if (c->closing || !sess_waiting(&c->sess))
            return done;
    }
}

/*
 * Reads what the peer sent. Whole frames are handled straight from one
 * read buffer shared by the worker's connections; a connection only holds
 * memory of its own for a frame that arrived in part, so an idle
 * connection costs little.
 */
static void on_read(struct conn *c)
{
    static uint8_t shared[READ_CHUNK];
    ssize_t n;
    if (!buf_len(&c->rbuf)) {
        n = read(c->fd, shared, sizeof shared);
    } else {
        size_t want = READ_CHUNK; /* a partial frame: room for all of it */
        const uint8_t *p = buf_head(&c->rbuf);
        if (buf_len(&c->rbuf) >= 4) {
            size_t flen = 4 + ((size_t)p[0] << 24 | (size_t)p[1] << 16 |
                               (size_t)p[2] << 8 | p[3]);
            if (flen > buf_len(&c->rbuf) && flen - buf_len(&c->rbuf) > want &&
                flen <= c->srv->max_frame + 5)
                want = flen - buf_len(&c->rbuf);
        }
        uint8_t *dst = buf_reserve(&c->rbuf, want);
        if (!dst) {
            conn_drop(c, "out of memory for the read buffer");
            return;
        }
        n = read(c->fd, dst, want);
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n <= 0) {
        if (buf_len(&c->rbuf))
            log_msg(LL_WARN, c->id, sess_qid(&c->sess),
                    "peer closed with %zu byte(s) of an incomplete frame",
                    buf_len(&c->rbuf));
        conn_drop(c, n < 0 ? strerror(errno) : NULL);
        return;
    }
    c->last_read = ev_now(c->srv->loop); /* on_timeout looks (no re-arm) */
    /* whether the partial frame left at the end is one that began in this
     * read (nothing was pending, or the pending one completed) */
    int new_partial;
    if (!buf_len(&c->rbuf)) {
        size_t used = process(c, shared, (size_t)n);
        new_partial = 1;
        if (!c->closing && used < (size_t)n &&
            buf_append(&c->rbuf, shared + used, (size_t)n - used) < 0) {
            conn_drop(c, "out of memory for the read buffer");
            return;
        }
    } else {
        buf_commit(&c->rbuf, (size_t)n);
        size_t used = process(c, buf_head(&c->rbuf), buf_len(&c->rbuf));
        new_partial = used > 0;
        buf_consume(&c->rbuf, used);
        if (!buf_len(&c->rbuf))
            buf_free(&c->rbuf); /* back to owning nothing */
    }
    /* A peer trickling one frame byte by byte keeps the idle timer happy;
     * a frame must still be complete within --timeout of its own first
     * byte (a peer whose every read ends inside a packet is fine as long
     * as each packet completes in time). */
    if (!buf_len(&c->rbuf) || sess_waiting(&c->sess)) {
        c->partial_since = 0; /* waiting: what is kept is not late */
    } else if (new_partial || !c->partial_since) {
        c->partial_since = ev_now(c->srv->loop);
    } else if (!c->closing &&
               ev_now(c->srv->loop) - c->partial_since > c->srv->idle_timeout) {
        log_msg(LL_WARN, c->id, sess_qid(&c->sess),
                "a frame took longer than %gs (--timeout) to arrive: closing "
                "the connection",
                c->srv->idle_timeout);
        conn_drop(c, NULL);
    }
}

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    struct conn *c = (struct conn *)w;
    log_gen = c->gen;
    c->in_callback = 1;
    if (revents & EV_READ)
        on_read(c);
    if (flush(c) < 0)
        conn_drop(c, "write failed: the peer is gone");
    c->in_callback = 0;
    if (c->closing && !buf_len(&c->wbuf))
        conn_end(c);
    log_gen = 0;
}

/* A waiting handler's answer arrived: run it on, from the loop. */
static void conn_resume(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct conn *c = (struct conn *)((char *)w - offsetof(struct conn, resume));
    log_gen = c->gen;
    c->in_callback = 1;
    struct verdict v;
    int ev = c->sess.wait.ev;
    watch_handler(c, ev);
    double t0 = clock_if_reported();
    msglog_lookup(&c->mlog, t0 - c->wait_since);
    int rc = lb_resume(&c->lua, &c->sess, &v);
    handler_ran(c, c->sess.wait.ev, rc, t0);
    watchdog_unwatch();
    if (rc == LB_WAIT) { /* the next lookup: progress runs on */
        start_progress(c, c->sess.wait.ev);
        progress_if_awaited(c, buf_head(&c->rbuf), buf_len(&c->rbuf));
    } else {
        /* no progress after the reply; a later wait picks up the cadence */
        ev_timer_stop(c->srv->loop, &c->progress);
        if (ev == SE_EOM)
            c->progress_mark = 0;
        if (sess_resume(&c->sess, rc, &v, &c->wbuf) == SESS_CLOSE)
            c->closing = 1;
        if (!c->finishing && !c->closing && buf_len(&c->rbuf)) {
            buf_consume(&c->rbuf,
                        process(c, buf_head(&c->rbuf), buf_len(&c->rbuf)));
            if (!buf_len(&c->rbuf))
                buf_free(&c->rbuf);
        } else if (!c->finishing && !c->closing &&
                   sess_flush(&c->sess, &c->wbuf) == SESS_CLOSE) {
            c->closing = 1; /* held headers a failed batch did not reach */
        }
    }
    if (!c->finishing && flush(c) < 0)
        conn_drop(c, "write failed: the peer is gone");
    c->in_callback = 0;
    if (c->finishing ? !sess_waiting(&c->sess)
                     : c->closing && !buf_len(&c->wbuf))
        conn_end(c);
    log_gen = 0;
}

static void conn_wake(void *ud)
{
    struct conn *c = ud;
    /* from the loop, never from inside the engine's callback */
    if (!ev_is_active(&c->resume))
        ev_timer_start(c->srv->loop, &c->resume);
}

static void on_progress(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct conn *c =
        (struct conn *)((char *)w - offsetof(struct conn, progress));
    c->progress_mark = ev_now(loop);
    if (buf_append(&c->wbuf, "\0\0\0\1p", 5) == 0 && flush(c) < 0)
        conn_drop(c, "write failed: the peer is gone");
}

static void on_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct conn *c = (struct conn *)((char *)w - offsetof(struct conn, timer));
    /* Reads only note their time (libev's pattern for an activity
     * timeout): a read since the timer was set moves it to that read's
     * deadline instead. */
    double left = c->last_read + c->srv->idle_timeout - ev_now(loop);
    if (left > 0 || sess_waiting(&c->sess)) { /* the MTA waits on us */
        w->repeat = left > 0 ? left : c->srv->idle_timeout;
        ev_timer_again(loop, w);
        return;
    }
    log_gen = c->gen;
    log_msg(LL_WARN, c->id, sess_qid(&c->sess),
            "no command for %gs (--timeout): closing the connection",
            c->srv->idle_timeout);
    conn_drop(c, NULL);
    log_gen = 0;
}

void conn_new(struct server *srv, int fd, int is_tcp)
{
    if (srv->nconns >= srv->max_conns) {
        log_msg(LL_WARN, 0, NULL,
                "connection limit (%u) reached: refusing a new connection",
                srv->max_conns);
        close(fd);
        return;
    }
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        log_msg(LL_ERR, 0, NULL, "out of memory: refusing a connection");
        close(fd);
        return;
    }
    if (is_tcp) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    c->fd = fd;
    c->srv = srv;
    c->id = __atomic_add_fetch(srv->next_id, 1, __ATOMIC_RELAXED);
    c->gen = srv->gen;
    c->cfg = srv->cfg;
    c->started = ev_now(srv->loop);
    buf_init(&c->rbuf, srv->max_frame + 5 + READ_CHUNK);
    buf_init(&c->wbuf, 0);
    sess_init(&c->sess, &c->cfg, &lua_ops, c, c->id);
    c->sess.note = on_note;
    metrics_conn_open();
    msglog_init(&c->mlog);
    lb_conn_init(&c->lua, srv->script);
    c->lua.wake = conn_wake;
    c->lua.wake_ud = c;
    ev_timer_init(&c->resume, conn_resume, 0, 0);
    ev_init(&c->progress, on_progress);
    c->progress.repeat = PROGRESS_EVERY;
    c->next = srv->conns;
    if (c->next)
        c->next->prev = c;
    srv->conns = c;
    srv->nconns++;
    ev_io_init(&c->io, on_io, fd, EV_READ);
    ev_io_start(srv->loop, &c->io);
    ev_init(&c->timer, on_timeout);
    c->timer.repeat = srv->idle_timeout;
    c->last_read = ev_now(srv->loop);
    ev_timer_again(srv->loop, &c->timer);
    log_gen = c->gen;
    log_msg(LL_DEBUG, c->id, NULL, "connected");
    log_gen = 0;
}
