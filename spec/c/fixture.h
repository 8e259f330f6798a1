/* Reads the .milter fixture format of ../shared/fixtures (see its README). */
#ifndef LUAMILTER_FIXTURE_H
#define LUAMILTER_FIXTURE_H

#include <stddef.h>
#include <stdint.h>

struct fx_packet {
    char dir;         /* '>' MTA to filter, '<' filter to MTA */
    uint8_t cmd;      /* 0 for EOF */
    uint8_t *data;    /* payload (owned by the fixture) */
    size_t len;
    uint8_t *wire;    /* length + command + payload */
    size_t wire_len;
    char *note;       /* the annotation line after it, without "#  +0.001s " */
    int conn;         /* 1 = first milter connection of the scenario */
};

struct fixture {
    char name[128];
    struct fx_packet *p;
    size_t n;
};

/* Loads a fixture; returns 0, or -1 after printing why. */
int fx_load(const char *path, struct fixture *fx);
void fx_free(struct fixture *fx);
/* Lists *.milter files under dir (sorted); returns count, fills names. */
int fx_list(const char *dir, char ***names);

#endif
