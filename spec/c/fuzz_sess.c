/*
 * libFuzzer target: arbitrary bytes through the frame splitter, the
 * decoder, the session state machine and the modification planner, fed in
 * pieces of varying size, with a fake handler whose verdicts (including
 * header edits at eom) are drawn from the input too. Any crash, leak or
 * undefined behaviour is a bug; so is a reply stream that does not frame.
 *
 *   make fuzz                        run open-ended (corpus in build-fuzz/)
 *   build-fuzz/fuzz_sess FILE...     replay inputs (regression tests)
 */
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "sess.h"
#include "wire.h"

struct fz {
    const uint8_t *knobs;
    size_t nknobs, k;
    struct mod mods[6];
};

static uint8_t knob(struct fz *f)
{
    return f->nknobs ? f->knobs[f->k++ % f->nknobs] : 0;
}

static int fake_call(void *ud, struct sess *s, int ev,
                     const struct wire_cmd *cmd, struct verdict *v)
{
    (void)cmd;
    struct fz *f = ud;
    uint8_t k = knob(f);
    if ((k & 0x0f) == 0x0f)
        return -1; /* the handler "raised" */
    v->action = k % 6;
    if (v->action == VA_SKIP && ev != SE_BODY)
        v->action = VA_CONTINUE;
    if (v->action == VA_DISCARD && ev < SE_ENVFROM)
        v->action = VA_REJECT;
    if (v->action == VA_REJECT || v->action == VA_TEMPFAIL) {
        static const struct wire_str line = {"no 100% sure", 12};
        v->code = (k & 0x10) ? (v->action == VA_REJECT ? 550 : 451) : 0;
        v->lines[0] = line;
        v->nlines = (k & 0x20) ? 1 : 0;
    }
    if (ev == SE_EOM && (v->action == VA_CONTINUE || v->action == VA_ACCEPT)) {
        static const char *names[] = {"Subject", "X-Dup", "Received", "To"};
        size_t n = knob(f) % 7;
        for (size_t i = 0; i < n && i < 6; i++) {
            uint8_t m = knob(f);
            const char *name = names[m % 4];
            f->mods[i] = (struct mod){(uint8_t)((m >> 2) % 6),
                                      (uint32_t)(m >> 5) + (m & 1),
                                      {name, strlen(name)},
                                      {"v", (m & 2) ? 1 : 0}};
            if (f->mods[i].op >= MOD_ADD_RCPT)
                f->mods[i].b.p = (m & 2) ? "NOTIFY=NEVER" : NULL;
        }
        v->mods = f->mods;
        v->nmods = n < 6 ? n : 6;
        if (k & 0x40)
            v->body = (struct wire_str){"new\r\n", 5};
        if (k & 0x80)
            v->quarantine = (struct wire_str){"q", 1};
    }
    (void)s;
    return 0;
}

/* The held headers' batch op (ops.headers): each header's handler runs
 * in turn and may stop the batch with a verdict of its own. */
static int fake_headers(void *ud, struct sess *s, uint32_t first, uint32_t n,
                        struct verdict *v)
{
    for (uint32_t k = first; k < first + n; k++) {
        s->hdrs_run = k + 1;
        int rc = fake_call(ud, s, SE_HEADER, NULL, v);
        if (rc < 0 || v->action != VA_CONTINUE)
            return rc;
    }
    return 0;
}

static const struct sess_ops ops = {fake_call, NULL};
static const struct sess_ops batch_ops = {fake_call, fake_headers};

/* Every reply the session wrote must be a well-formed frame. */
static void check_replies(struct buf *out)
{
    while (buf_len(out)) {
        struct wire_frame f;
        size_t used;
        const char *err;
        if (wire_next_frame(buf_head(out), buf_len(out), 1u << 30, &f, &used,
                            &err) != WIRE_FRAME)
            abort();
        buf_consume(out, used);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 3)
        return 0;
    log_level = -1;
    struct fz f = {data + size - (size > 16 ? 16 : size), size > 16 ? 16 : size,
                   0, {{0}}};
    struct sess_cfg cfg = {.handlers = (unsigned)(data[0] | data[1] << 8) &
                                       ((1u << SE__COUNT) - 1),
                           .on_error = VA_TEMPFAIL,
                           .max_body = (size_t)data[2] * 64};
    size_t step = 1 + data[2] % 97;
    /* the top bit of the handler word: held headers in batches */
    const struct sess_ops *o = (data[1] & 0x80) ? &batch_ops : &ops;
    data += 3;
    size -= 3;
    struct sess s;
    struct buf in, out;
    sess_init(&s, &cfg, o, &f, 1);
    buf_init(&in, 1u << 22);
    buf_init(&out, 0);
    int open = 1;
    for (size_t off = 0; off < size && open; off += step) {
        size_t n = size - off < step ? size - off : step;
        if (buf_append(&in, data + off, n) < 0)
            break;
        for (;;) {
            struct wire_frame fr;
            struct wire_cmd c;
            size_t used;
            const char *err;
            int rc = wire_next_frame(buf_head(&in), buf_len(&in), 1u << 20, &fr,
                                     &used, &err);
            if (rc == WIRE_NEED_MORE)
                break;
            if (rc == WIRE_ERROR || wire_decode(&fr, &c, &err) < 0 ||
                sess_handle(&s, &c, &out) == SESS_CLOSE) {
                open = 0;
                break;
            }
            buf_consume(&in, used);
            check_replies(&out);
        }
        /* the read is handled (conn.c): the held headers run */
        if (open && sess_flush(&s, &out) == SESS_CLOSE)
            open = 0;
        check_replies(&out);
    }
    sess_finish(&s);
    check_replies(&out);
    sess_free(&s);
    buf_free(&in);
    buf_free(&out);
    return 0;
}
