/* A tiny test harness: CHECK records a failure and goes on; t_done()
 * prints the tally and gives the exit status. */
#ifndef LUAMILTER_T_H
#define LUAMILTER_T_H

#include <stdio.h>
#include <string.h>

static int t_checks, t_failures;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        t_checks++;                                                        \
        if (!(cond)) {                                                     \
            t_failures++;                                                  \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fputc('\n', stderr);                                           \
        }                                                                  \
    } while (0)

#define CHECK_MEM(a, alen, b, blen, ...)                                   \
    CHECK((alen) == (blen) && memcmp((a), (b), (alen)) == 0, __VA_ARGS__)

static inline int t_done(const char *name)
{
    printf("%s: %d checks, %d failures\n", name, t_checks, t_failures);
    return t_failures ? 1 : (t_checks ? 0 : 1);
}

#endif
