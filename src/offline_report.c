/* offline_report: see offline_int.h. */
#define _GNU_SOURCE
#include "offline_int.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hplan.h"
#include "mta.h"

static void jstr(struct buf *o, const char *p, size_t n)
{
    buf_append_byte(o, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            buf_append(o, esc, 2);
        } else if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            buf_append(o, esc, 6);
        } else {
            buf_append_byte(o, c);
        }
    }
    buf_append_byte(o, '"');
}
#define JS(o, s) jstr((o), (s), strlen(s))

static void put(struct buf *o, const char *s) { buf_append(o, s, strlen(s)); }

static void putf(struct buf *o, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void putf(struct buf *o, const char *fmt, ...)
{
    char tmp[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    buf_append(o, tmp, n < (int)sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

const char *offline_action_of(const struct reply *rp)
{
    switch (rp->cmd) {
    case 0:
    case WIRE_R_CONTINUE: return "continue";
    case WIRE_R_ACCEPT: return "accept";
    case WIRE_R_REJECT: return "reject";
    case WIRE_R_TEMPFAIL: return "tempfail";
    case WIRE_R_DISCARD: return "discard";
    case WIRE_R_SKIP: return "skip";
    case WIRE_R_REPLYCODE: return rp->text[0] == '4' ? "tempfail" : "reject";
    default: return "other";
    }
}

void offline_take_mod(struct run *r, uint8_t cmd, const uint8_t *p, size_t n)
{
    const char *err = NULL;
    if (pf_apply(&r->msg, cmd, p, n, &err) < 0)
        fprintf(stderr, "luamilter: the MTA would refuse a modification: %s\n",
                err ? err : "?");
    const char *s[3] = {"", "", ""};
    size_t pos = 0, off = 0;
    uint32_t idx = 0;
    if (cmd == WIRE_R_INSHEADER || cmd == WIRE_R_CHGHEADER) {
        idx = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
              (uint32_t)p[2] << 8 | p[3];
        off = 4;
    }
    for (int i = 0; i < 3 && cmd != WIRE_R_REPLBODY; i++) {
        struct wire_str w = wire_list_next((const char *)p + off, n - off, &pos);
        if (w.p)
            s[i] = w.p;
    }
    struct buf *j = &r->mods_json, *t = &r->mods_text;
    if (r->nmods++)
        put(j, ",");
    switch (cmd) {
    case WIRE_R_ADDHEADER:
        put(j, "{\"op\":\"add_header\",\"name\":");
        JS(j, s[0]);
        put(j, ",\"value\":");
        JS(j, s[1]);
        putf(t, "  add_header %s: %s\n", s[0], s[1]);
        break;
    case WIRE_R_INSHEADER:
        putf(j, "{\"op\":\"insert_header\",\"index\":%u,\"name\":", idx);
        JS(j, s[0]);
        put(j, ",\"value\":");
        JS(j, s[1]);
        putf(t, "  insert_header at %u: %s: %s\n", idx, s[0], s[1]);
        break;
    case WIRE_R_CHGHEADER:
        putf(j, "{\"op\":\"%s\",\"index\":%u,\"name\":",
             *s[1] ? "change_header" : "delete_header", idx);
        JS(j, s[0]);
        if (*s[1]) {
            put(j, ",\"value\":");
            JS(j, s[1]);
            putf(t, "  change_header %s #%u: %s\n", s[0], idx, s[1]);
        } else {
            putf(t, "  delete_header %s #%u\n", s[0], idx);
        }
        break;
    case WIRE_R_ADDRCPT:
    case WIRE_R_ADDRCPT_PAR:
        put(j, "{\"op\":\"add_rcpt\",\"rcpt\":");
        JS(j, s[0]);
        if (*s[1]) {
            put(j, ",\"args\":");
            JS(j, s[1]);
        }
        putf(t, "  add_rcpt %s%s%s\n", s[0], *s[1] ? " " : "", s[1]);
        break;
    case WIRE_R_DELRCPT:
        put(j, "{\"op\":\"del_rcpt\",\"rcpt\":");
        JS(j, s[0]);
        putf(t, "  del_rcpt %s\n", s[0]);
        break;
    case WIRE_R_CHGFROM:
        put(j, "{\"op\":\"change_from\",\"sender\":");
        JS(j, s[0]);
        if (*s[1]) {
            put(j, ",\"args\":");
            JS(j, s[1]);
        }
        putf(t, "  change_from %s%s%s\n", s[0], *s[1] ? " " : "", s[1]);
        break;
    case WIRE_R_REPLBODY:
        putf(j, "{\"op\":\"replace_body\",\"bytes\":%zu", n);
        putf(t, "  replace_body (%zu bytes)\n", n);
        break;
    case WIRE_R_QUARANTINE:
        put(j, "{\"op\":\"quarantine\",\"reason\":");
        JS(j, s[0]);
        putf(t, "  quarantine: %s\n", s[0]);
        break;
    default:
        put(j, "{\"op\":\"progress\"");
        break;
    }
    put(j, "}");
}

void offline_headers_before(struct run *r)
{
    r->before = calloc(2 * r->msg.nh + 1, sizeof *r->before);
    r->nbefore = 0;
    for (size_t i = 0; r->before && i < r->msg.nh; i++) {
        const struct pf_hdr *h = &r->msg.h[i];
        if (h->hidden)
            continue;
        r->before[2 * r->nbefore] = strdup(h->name);
        r->before[2 * r->nbefore + 1] = strdup(h->value);
        r->nbefore++;
    }
}

static void free_before(struct run *r)
{
    for (size_t i = 0; r->before && i < 2 * r->nbefore; i++)
        free(r->before[i]);
    free(r->before);
    r->before = NULL;
    r->nbefore = 0;
}

static struct wire_str ws(const char *p) { return (struct wire_str){p, strlen(p)}; }

/* A value on one line of the text report: LF and tab shown escaped. */
static void put_value(struct buf *o, const char *v)
{
    for (; *v; v++) {
        if (*v == '\n')
            buf_append(o, "\\n", 2);
        else if (*v == '\t')
            buf_append(o, "\\t", 2);
        else
            buf_append_byte(o, (uint8_t)*v);
    }
}

/* One line of the header diff, in text and in JSON. */
static void diff_line(struct buf *t, struct buf *j, int *n, const char *op,
                      const struct hp_hdr *h, const struct hp_hdr *old)
{
    static const char *const marks[] = {"keep", "    ", "remove", "  - ",
                                        "add", "  + ", "change", "  ~ "};
    const char *mark = "";
    for (int k = 0; k < 8; k += 2)
        if (strcmp(op, marks[k]) == 0)
            mark = marks[k + 1];
    put(t, mark);
    if (old) {
        putf(t, "%s: ", old->name.p);
        put_value(t, old->value.p);
        put(t, "  ->  ");
    }
    putf(t, "%s: ", h->name.p);
    put_value(t, h->value.p);
    put(t, "\n");
    putf(j, "%s{\"op\":\"%s\",\"name\":", (*n)++ ? "," : "", op);
    JS(j, h->name.p);
    put(j, ",\"value\":");
    JS(j, h->value.p);
    if (old) {
        put(j, ",\"old_name\":");
        JS(j, old->name.p);
        put(j, ",\"old_value\":");
        JS(j, old->value.p);
    }
    put(j, "}");
}

/*
 * The header block before and after eom's changes, paired as the planner
 * pairs them (Postfix's rules, as the rest of the test mode): lines kept,
 * removed, added and changed, in the order of the new block.
 */
static void header_diff(struct run *r, struct buf *t, struct buf *j)
{
    size_t n = r->nbefore, m = 0;
    struct hp_hdr *o = malloc((n + 1) * sizeof *o);
    struct hp_hdr *w = malloc((r->msg.nh + 1) * sizeof *w);
    int32_t *om = malloc((n + 1) * sizeof *om);
    int32_t *wm = malloc((r->msg.nh + 1) * sizeof *wm);
    int count = 0;
    if (!o || !w || !om || !wm)
        goto out;
    for (size_t i = 0; i < n; i++)
        o[i] = (struct hp_hdr){ws(r->before[2 * i]), ws(r->before[2 * i + 1])};
    for (size_t i = 0; i < r->msg.nh; i++)
        if (!r->msg.h[i].hidden)
            w[m++] = (struct hp_hdr){ws(r->msg.h[i].name),
                                     ws(r->msg.h[i].value)};
    if (hplan_match(MTA_POSTFIX, o, n, w, m, om, wm) < 0)
        goto out;
    size_t i = 0;
    for (size_t k = 0; k <= m; k++) {
        size_t upto = k < m && wm[k] >= 0 ? (size_t)wm[k] : k == m ? n : i;
        for (; i < upto; i++)
            if (om[i] < 0)
                diff_line(t, j, &count, "remove", &o[i], NULL);
        if (k == m)
            break;
        if (wm[k] < 0) {
            diff_line(t, j, &count, "add", &w[k], NULL);
            continue;
        }
        const struct hp_hdr *x = &o[wm[k]];
        int same = x->name.n == w[k].name.n && x->value.n == w[k].value.n &&
                   !strcmp(x->name.p, w[k].name.p) &&
                   !strcmp(x->value.p, w[k].value.p);
        diff_line(t, j, &count, same ? "keep" : "change", &w[k],
                  same ? NULL : x);
        i = (size_t)wm[k] + 1;
    }
out:
    free(o);
    free(w);
    free(om);
    free(wm);
}

void offline_stage(struct run *r, int ev, const char *arg,
                  const struct reply *rp)
{
    if (!(r->cfg.handlers & SE_BIT(ev)))
        return;
    const char *act = offline_action_of(rp);
    if (r->nstages++)
        put(&r->json, ",");
    put(&r->json, "{\"event\":");
    JS(&r->json, sess_event_names[ev]);
    if (arg) {
        put(&r->json, ",\"arg\":");
        JS(&r->json, arg);
    }
    put(&r->json, ",\"verdict\":{\"action\":");
    JS(&r->json, act);
    if (rp->text[0]) {
        put(&r->json, ",\"reply\":");
        JS(&r->json, rp->text);
    }
    put(&r->json, "}}");
    putf(&r->text, "%s%s%s%s: %s%s%s\n", sess_event_names[ev],
         arg ? "(" : "", arg ? arg : "", arg ? ")" : "", act,
         rp->text[0] ? ": " : "", rp->text);
}

void offline_msg_reset(struct run *r)
{
    offline_msg_free(r);
    buf_init(&r->json, 0);
    buf_init(&r->text, 0);
    buf_init(&r->mods_json, 0);
    buf_init(&r->mods_text, 0);
    memset(&r->msg, 0, sizeof r->msg);
    r->nstages = r->nmods = r->failed = r->traced = r->hlist = 0;
    r->ok = 1;
    r->final_action = "continue";
    r->final_reply[0] = '\0';
}

void offline_msg_free(struct run *r)
{
    pf_free(&r->msg);
    free_before(r);
    buf_free(&r->json);
    buf_free(&r->text);
    buf_free(&r->mods_json);
    buf_free(&r->mods_text);
}

void offline_report(struct run *r, const char *sender, const char *file,
                    struct buf *json, int as_json)
{
    struct buf msgout;
    buf_init(&msgout, 0);
    if (r->ok)
        pf_render(&r->msg, &msgout);
    struct buf dtext, djson;
    buf_init(&dtext, 0);
    buf_init(&djson, 0);
    if (r->hlist && r->ok)
        header_diff(r, &dtext, &djson);
    if (as_json) {
        struct buf *jp = json;
        if (file) {
            put(jp, "{\"file\":");
            JS(jp, file);
            put(jp, ",\"stages\":[");
        } else {
            put(jp, "{\"stages\":[");
        }
        buf_append(jp, buf_head(&r->json), buf_len(&r->json));
        put(jp, "],\"final\":{\"action\":");
        JS(jp, r->final_action);
        putf(jp, ",\"delivered\":%s", r->ok ? "true" : "false");
        if (r->final_reply[0]) {
            put(jp, ",\"reply\":");
            JS(jp, r->final_reply);
        }
        putf(jp, ",\"error\":%s},\"modifications\":[",
             r->failed ? "true" : "false");
        buf_append(jp, buf_head(&r->mods_json), buf_len(&r->mods_json));
        if (r->hlist && r->ok) {
            put(jp, "],\"header_diff\":[");
            buf_append(jp, buf_head(&djson), buf_len(&djson));
        }
        put(jp, "],\"envelope\":{\"sender\":");
        JS(jp, r->msg.sender ? r->msg.sender : sender);
        put(jp, ",\"rcpts\":[");
        for (size_t i = 0; i < r->msg.nrcpts; i++) {
            if (i)
                put(jp, ",");
            JS(jp, r->msg.rcpts[i]);
        }
        put(jp, "]},\"quarantine\":");
        if (r->msg.quarantine)
            JS(jp, r->msg.quarantine);
        else
            put(jp, "null");
        put(jp, ",\"message\":");
        if (r->ok)
            jstr(jp, (const char *)buf_head(&msgout), buf_len(&msgout));
        else
            put(jp, "null");
        put(jp, "}");
    } else {
        fwrite(buf_head(&r->text), 1, buf_len(&r->text), stdout);
        fwrite(buf_head(&r->mods_text), 1, buf_len(&r->mods_text), stdout);
        if (r->hlist && r->ok) {
            printf("header changes (under the MTA's Received:):\n");
            fwrite(buf_head(&dtext), 1, buf_len(&dtext), stdout);
        }
        printf("final: %s%s%s (%s)\n", r->final_action,
               r->final_reply[0] ? ": " : "", r->final_reply,
               r->ok ? "delivered" : "not delivered");
        printf("envelope: from %s to", r->msg.sender ? r->msg.sender : sender);
        for (size_t i = 0; i < r->msg.nrcpts; i++)
            printf("%s %s", i ? "," : "", r->msg.rcpts[i]);
        printf("\n");
        if (r->msg.quarantine)
            printf("quarantine: %s (held in the MTA's hold queue)\n",
                   r->msg.quarantine);
        if (r->ok) {
            printf("--- message ---\n");
            fwrite(buf_head(&msgout), 1, buf_len(&msgout), stdout);
        }
    }
    buf_free(&msgout);
    buf_free(&dtext);
    buf_free(&djson);
}
