/* Reader of the .milter fixture format, written from its README. */
#define _GNU_SOURCE
#include "fixture.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Unescapes \xHH \\ \" \r \n \t; returns the length or -1. */
static long unescape(const char *s, size_t n, uint8_t *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '\\') {
            out[o++] = (uint8_t)s[i];
            continue;
        }
        if (++i >= n)
            return -1;
        switch (s[i]) {
        case 'x':
            if (i + 2 >= n)
                return -1;
            if (hexval(s[i + 1]) < 0 || hexval(s[i + 2]) < 0)
                return -1;
            out[o++] = (uint8_t)(hexval(s[i + 1]) * 16 + hexval(s[i + 2]));
            i += 2;
            break;
        case '\\': out[o++] = '\\'; break;
        case '"': out[o++] = '"'; break;
        case 'r': out[o++] = '\r'; break;
        case 'n': out[o++] = '\n'; break;
        case 't': out[o++] = '\t'; break;
        default: return -1;
        }
    }
    return (long)o;
}

int fx_load(const char *path, struct fixture *fx)
{
    memset(fx, 0, sizeof *fx);
    const char *base = strrchr(path, '/');
    snprintf(fx->name, sizeof fx->name, "%s", base ? base + 1 : path);
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        return -1;
    }
    char *line = NULL;
    size_t cap = 0, alloc = 0;
    ssize_t len;
    int conn = 0, rc = 0;
    while ((len = getline(&line, &cap, f)) > 0) {
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (strncmp(line, "# -- milter connection", 22) == 0) {
            conn++;
            continue;
        }
        if (strncmp(line, "#  +", 4) == 0 && fx->n) {
            char *sp = strchr(line + 4, ' ');
            struct fx_packet *last = &fx->p[fx->n - 1];
            if (sp && !last->note)
                last->note = strdup(sp + 1);
            continue;
        }
        if (len < 3 || (line[0] != '>' && line[0] != '<') || line[1] != ' ')
            continue;
        if (fx->n == alloc) {
            alloc = alloc ? alloc * 2 : 64;
            fx->p = realloc(fx->p, alloc * sizeof *fx->p);
        }
        struct fx_packet *p = &fx->p[fx->n];
        memset(p, 0, sizeof *p);
        p->dir = line[0];
        p->conn = conn ? conn : 1;
        if (strcmp(line + 2, "EOF") == 0) {
            fx->n++;
            continue;
        }
        char cmdtxt[8];
        unsigned flen;
        int off = 0;
        if (sscanf(line + 2, "%7s %u \"%n", cmdtxt, &flen, &off) != 2 || !off ||
            line[len - 1] != '"') {
            fprintf(stderr, "%s: bad line: %s\n", path, line);
            rc = -1;
            break;
        }
        p->cmd = strlen(cmdtxt) == 1 ? (uint8_t)cmdtxt[0]
                                     : (uint8_t)strtol(cmdtxt + 2, NULL, 16);
        const char *q = line + 2 + off;
        size_t qn = (size_t)(line + len - 1 - q);
        p->wire = malloc(qn + 6);
        long n = unescape(q, qn, p->wire + 5);
        if (n < 0 || (unsigned long)n + 1 != flen) {
            fprintf(stderr, "%s: bad payload or length: %s\n", path, line);
            free(p->wire);
            rc = -1;
            break;
        }
        p->wire[0] = (uint8_t)(flen >> 24);
        p->wire[1] = (uint8_t)(flen >> 16);
        p->wire[2] = (uint8_t)(flen >> 8);
        p->wire[3] = (uint8_t)flen;
        p->wire[4] = p->cmd;
        p->data = p->wire + 5;
        p->len = (size_t)n;
        p->wire_len = (size_t)n + 5;
        fx->n++;
    }
    free(line);
    fclose(f);
    if (rc < 0)
        fx_free(fx);
    return rc;
}

void fx_free(struct fixture *fx)
{
    for (size_t i = 0; i < fx->n; i++) {
        free(fx->p[i].wire);
        free(fx->p[i].note);
    }
    free(fx->p);
    fx->p = NULL;
    fx->n = 0;
}

static int cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int fx_list(const char *dir, char ***names)
{
    DIR *d = opendir(dir);
    if (!d) {
        perror(dir);
        return -1;
    }
    int n = 0, cap = 0;
    *names = NULL;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l < 8 || strcmp(e->d_name + l - 7, ".milter") != 0)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 128;
            *names = realloc(*names, (size_t)cap * sizeof **names);
        }
        (*names)[n] = malloc(strlen(dir) + l + 2);
        sprintf((*names)[n++], "%s/%s", dir, e->d_name);
    }
    closedir(d);
    qsort(*names, (size_t)n, sizeof **names, cmp);
    return n;
}
