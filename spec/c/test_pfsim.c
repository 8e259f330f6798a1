/*
 * pfsim against Postfix itself: for every capture with modifications, the
 * message as the SMTP client sent it plus the recorded modification packets,
 * applied by pfsim, must render to exactly the bytes Postfix delivered (the
 * trace header is taken from the delivered message, as only Postfix knows
 * its queue id and date). The envelope must match too.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fixture.h"
#include "pfsim.h"
#include "t.h"

/* Undoes the fixture display escapes (\t \r \n \\ \" \xHH). */
static void unescape_into(struct buf *o, const char *s)
{
    for (; *s; s++) {
        if (*s != '\\' || !s[1]) {
            buf_append_byte(o, (uint8_t)*s);
            continue;
        }
        s++;
        switch (*s) {
        case 't': buf_append_byte(o, '\t'); break;
        case 'r': buf_append_byte(o, '\r'); break;
        case 'n': buf_append_byte(o, '\n'); break;
        case 'x': {
            unsigned v;
            sscanf(s + 1, "%2x", &v);
            buf_append_byte(o, (uint8_t)v);
            s += 2;
            break;
        }
        default: buf_append_byte(o, (uint8_t)*s); break;
        }
    }
}

struct scenario {
    struct buf input;     /* DATA as sent, dot-unstuffed, LF line ends */
    struct buf delivered; /* bytes the sink stored */
    struct buf trace;     /* Postfix's Received: header, lines joined by \n */
    char sender[256];
    char rcpts[8][256];
    int nrcpts;
    char out_mail[256];   /* delivered envelope sender */
    char out_rcpts[8][256];
    int nout;
    int elided;           /* the capture left lines out */
    int rcpt_pending;     /* the last RCPT awaits the server's answer */
};

static void scan(const char *path, struct scenario *sc)
{
    FILE *f = fopen(path, "r");
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int in_data = 0, in_deliv = 0, in_trace = 0;
    memset(sc, 0, sizeof *sc);
    buf_init(&sc->input, 0);
    buf_init(&sc->delivered, 0);
    buf_init(&sc->trace, 0);
    while ((n = getline(&line, &cap, f)) > 0) {
        if (line[n - 1] == '\n')
            line[--n] = '\0';
        if (strncmp(line, "# ==", 4) == 0) {
            in_deliv = strncmp(line, "# == delivered", 14) == 0;
            continue;
        }
        if (strstr(line, "lines omitted)"))
            sc->elided = 1;
        if (in_deliv && strncmp(line, "#|", 2) == 0) {
            const char *t = line[2] == ' ' ? line + 3 : line + 2;
            if (strncmp(t, "envelope: ", 10) == 0) {
                char *m = strstr(t, "\"mail\": \"");
                if (m)
                    sscanf(m + 9, "%255[^ \"]", sc->out_mail);
                for (char *r = strstr(t, "\"rcpt\": ["); r && sc->nout < 8;) {
                    r = strstr(r + 1, "\"<");
                    if (!r)
                        break;
                    sscanf(r + 1, "%255[^ \"]", sc->out_rcpts[sc->nout++]);
                }
                continue;
            }
            if (strncmp(t, "Received:", 9) == 0 && !buf_len(&sc->trace))
                in_trace = 1;
            else if (in_trace && t[0] != '\\')
                in_trace = 0;
            if (in_trace) {
                if (buf_len(&sc->trace))
                    buf_append_byte(&sc->trace, '\n');
                unescape_into(&sc->trace, t);
            }
            unescape_into(&sc->delivered, t);
            buf_append(&sc->delivered, "\r\n", 2);
            continue;
        }
        if (strstr(line, "\xef\xbf\xbd"))
            sc->elided = 1; /* the transcript lost 8-bit bytes */
        if ((strncmp(line, "#| <-  ", 7) == 0 ||
             strncmp(line, "#| <** ", 7) == 0) &&
            sc->rcpt_pending) {
            if (line[7] == '4' || line[7] == '5')
                sc->nrcpts--; /* Postfix refused it itself */
            sc->rcpt_pending = 0;
        }
        if (strncmp(line, "#|  -> ", 7) == 0) {
            const char *t = line + 7;
            if (in_data) {
                if (strcmp(t, ".") == 0) {
                    in_data = 0;
                    continue;
                }
                if (t[0] == '.')
                    t++; /* dot-stuffing */
                unescape_into(&sc->input, t);
                buf_append_byte(&sc->input, '\n');
            } else if (strncmp(t, "MAIL FROM:", 10) == 0) {
                sscanf(t + 10, "%255s", sc->sender);
            } else if (strncmp(t, "RCPT TO:", 8) == 0 && sc->nrcpts < 8) {
                sscanf(t + 8, "%255s", sc->rcpts[sc->nrcpts++]);
                sc->rcpt_pending = 1;
            } else if (strcmp(t, "DATA") == 0) {
                in_data = 1;
            }
        }
    }
    free(line);
    fclose(f);
    /* the display ends with an empty line for the final CRLF */
    if (buf_len(&sc->delivered) >= 2)
        sc->delivered.end -= 2;
}

int main(int argc, char **argv)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/postfix",
             argc > 1 ? argv[1] : "../shared/fixtures");
    char **names = NULL;
    int n = fx_list(dir, &names), compared = 0;
    for (int i = 0; i < n; i++) {
        const char *base = strrchr(names[i], '/') + 1;
        int wanted = strncmp(base, "mod-", 4) == 0 ||
                     strncmp(base, "basic-", 6) == 0 ||
                     strcmp(base, "stage-eom-progress.milter") == 0;
        struct fixture fx;
        struct scenario sc;
        if (!wanted || fx_load(names[i], &fx) < 0) {
            free(names[i]);
            continue;
        }
        scan(names[i], &sc);
        if (sc.elided || !buf_len(&sc.delivered) || !buf_len(&sc.input) ||
            !buf_len(&sc.trace) || strstr(base, "two-messages") ||
            strstr(base, "rset") || strstr(base, "bdat") ||
            strstr(base, "edge-")) {
            goto next; /* not one plain SMTP message with a delivery */
        }
        struct pf_msg m;
        CHECK(pf_parse(&m, (const char *)buf_head(&sc.input),
                       buf_len(&sc.input)) == 0,
              "%s: parse", base);
        buf_append_byte(&sc.trace, 0);
        pf_add_trace(&m, (const char *)buf_head(&sc.trace));
        pf_set_sender(&m, sc.sender);
        for (int k = 0; k < sc.nrcpts; k++)
            pf_add_rcpt(&m, sc.rcpts[k]);
        for (size_t k = 0; k < fx.n; k++) {
            struct fx_packet *p = &fx.p[k];
            const char *err;
            if (p->dir == '<' && p->conn == 1 && p->cmd &&
                strchr("himeb+2-qp", p->cmd))
                CHECK(pf_apply(&m, p->cmd, p->data, p->len, &err) == 0,
                      "%s: apply '%c'", base, p->cmd);
        }
        struct buf out;
        buf_init(&out, 0);
        pf_render(&m, &out);
        CHECK_MEM(buf_head(&out), buf_len(&out), buf_head(&sc.delivered),
                  buf_len(&sc.delivered),
                  "%s: rendered message differs (%zu vs %zu bytes)",
                  base, buf_len(&out), buf_len(&sc.delivered));
        CHECK(m.sender && strcmp(m.sender, sc.out_mail) == 0,
              "%s: sender %s, delivered %s", base, m.sender, sc.out_mail);
        CHECK((int)m.nrcpts == sc.nout, "%s: %zu recipients, delivered %d",
              base, m.nrcpts, sc.nout);
        /* the queue manager delivers in its own order: compare as sets */
        for (int k = 0; k < sc.nout; k++) {
            int found = 0;
            for (size_t j = 0; j < m.nrcpts; j++)
                found |= strcmp(m.rcpts[j], sc.out_rcpts[k]) == 0;
            CHECK(found, "%s: delivered to %s, not in our envelope", base,
                  sc.out_rcpts[k]);
        }
        compared++;
        buf_free(&out);
        pf_free(&m);
    next:
        buf_free(&sc.input);
        buf_free(&sc.delivered);
        buf_free(&sc.trace);
        fx_free(&fx);
        free(names[i]);
    }
    free(names);
    printf("compared %d delivered messages\n", compared);
    CHECK(compared >= 20, "too few scenarios compared: %d", compared);
    return t_done("test_pfsim");
}
