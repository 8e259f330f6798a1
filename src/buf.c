/* buf: see buf.h. */
#include "buf.h"

#include <stdlib.h>
#include <string.h>

void buf_init(struct buf *b, size_t cap)
{
    memset(b, 0, sizeof *b);
    b->cap = cap;
}

void buf_free(struct buf *b)
{
    free(b->data);
    b->data = NULL;
    b->start = b->end = b->size = 0;
}

uint8_t *buf_grow(struct buf *b, size_t n)
{
    if (b->size - b->end >= n)
        return b->data + b->end;
    size_t len = buf_len(b);
    if (b->cap && n > b->cap - len)
        return NULL;
    /* Slide the unconsumed bytes down before growing. */
    if (b->start > 0 && b->size - len >= n) {
        memmove(b->data, b->data + b->start, len);
        b->start = 0;
        b->end = len;
        return b->data + b->end;
    }
    size_t want = b->size ? b->size : 512;
    while (want - len < n)
        want *= 2;
    if (b->cap && want > b->cap)
        want = b->cap;
    uint8_t *p = malloc(want);
    if (!p)
        return NULL;
    if (len)
        memcpy(p, b->data + b->start, len);
    free(b->data);
    b->data = p;
    b->size = want;
    b->start = 0;
    b->end = len;
    return b->data + b->end;
}

int buf_append_u32(struct buf *b, uint32_t v)
{
    uint8_t be[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8),
                     (uint8_t)v};
    return buf_append(b, be, 4);
}

void buf_consume(struct buf *b, size_t n)
{
    b->start += n;
    if (b->start >= b->end)
        b->start = b->end = 0;
}

void buf_shrink(struct buf *b, size_t keep)
{
    if (buf_len(b) == 0 && b->size > keep)
        buf_free(b);
}
