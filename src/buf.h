/*
 * buf: a growable byte buffer with start/end indices and a hard cap.
 *
 * Readers consume from the front (buf_consume), writers append at the end.
 * Growth beyond `cap` fails instead of allocating, so a peer can never make
 * us allocate more than the cap. Depends on nothing but libc.
 */
#ifndef LUAMILTER_BUF_H
#define LUAMILTER_BUF_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct buf {
    uint8_t *data; /* owned; NULL until the first append */
    size_t start;  /* first unconsumed byte */
    size_t end;    /* one past the last byte */
    size_t size;   /* allocated bytes */
    size_t cap;    /* growth limit; 0 = unlimited */
};

/* Initializes an empty buffer that will never hold more than cap bytes. */
void buf_init(struct buf *b, size_t cap);
/* Frees the storage; the buffer is empty and reusable afterwards. */
void buf_free(struct buf *b);

static inline size_t buf_len(const struct buf *b) { return b->end - b->start; }
static inline uint8_t *buf_head(const struct buf *b)
{
    static uint8_t none[1]; /* an empty buffer has no storage yet */
    return b->data ? b->data + b->start : none;
}

/*
 * Makes room for at least n more bytes at the end and returns a pointer to
 * them (borrowed, valid until the next call that may grow), or NULL when the
 * cap would be exceeded or memory is short. Commit with buf_commit().
 */
uint8_t *buf_grow(struct buf *b, size_t n); /* the slow path: slide or grow */
static inline uint8_t *buf_reserve(struct buf *b, size_t n)
{
    if (b->size - b->end >= n) /* inline: most appends find room */
        return b->data + b->end;
    return buf_grow(b, n);
}
static inline void buf_commit(struct buf *b, size_t n) { b->end += n; }
/* Appends n bytes; returns -1 (buffer unchanged) when over the cap. */
static inline int buf_append(struct buf *b, const void *p, size_t n)
{
    uint8_t *dst = buf_reserve(b, n);
    if (!dst)
        return -1;
    if (n)
        memcpy(dst, p, n);
    b->end += n;
    return 0;
}
static inline int buf_append_byte(struct buf *b, uint8_t c)
{
    uint8_t *dst = buf_reserve(b, 1);
    if (!dst)
        return -1;
    *dst = c;
    b->end++;
    return 0;
}
int buf_append_u32(struct buf *b, uint32_t v); /* big-endian */
/* Drops n bytes from the front (n <= buf_len). */
void buf_consume(struct buf *b, size_t n);
/* Drops what was appended after the first len bytes (len <= buf_len). */
static inline void buf_truncate(struct buf *b, size_t len)
{
    b->end = b->start + len;
}
/* Empties the buffer, keeping its storage. */
static inline void buf_reset(struct buf *b) { b->start = b->end = 0; }
/* Frees storage beyond `keep` bytes when the buffer is empty (idle conns). */
void buf_shrink(struct buf *b, size_t keep);

#endif
