/*
 * The log line's format, byte for byte (timestamps aside): fields of every
 * type, lists (empty, one empty string, values that need quotes), keys
 * that clash with the line's own or carry odd bytes, text and JSON, the
 * connection tag, a line longer than the cap (cut, one newline), and that
 * each line is written whole by one write(2).
 */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "t.h"

/* Runs fn with stderr into a socket that keeps each write(2) a record of
 * its own; returns what it wrote (static) and in how many writes. */
static const char *capture(void (*fn)(void), size_t *len, int *writes)
{
    static char out[256 * 1024];
    int p[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, p) < 0)
        return "";
    int sz = 1 << 20;
    setsockopt(p[1], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    setsockopt(p[0], SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    int saved = dup(2);
    dup2(p[1], 2);
    close(p[1]);
    fn();
    dup2(saved, 2);
    close(saved);
    size_t n = 0;
    ssize_t r;
    *writes = 0;
    while (n < sizeof out - 1 &&
           (r = recv(p[0], out + n, sizeof out - 1 - n, MSG_DONTWAIT)) > 0) {
        n += (size_t)r;
        (*writes)++;
    }
    close(p[0]);
    out[n] = '\0';
    *len = n;
    return out;
}

/* The line without its "TS " (the clock is not the format's business). */
static const char *body(const char *line)
{
    const char *sp = strchr(line, ' ');
    return sp ? sp + 1 : line;
}

static const char rcpts[] = "a@x\0b c@y\0";
static const char empty1[] = "";

static void text_fields(void)
{
    struct log_field f[] = {
        {.key = "client", .type = LF_STR, .s = "h[192.0.2.1]", .n = 12},
        {.key = "from", .type = LF_STR, .s = "", .n = 0},
        {.key = "rcpts", .type = LF_LIST, .s = rcpts, .n = 2},
        {.key = "none", .type = LF_LIST, .s = "", .n = 0},
        {.key = "one_empty", .type = LF_LIST, .s = empty1, .n = 1},
        {.key = "plain", .type = LF_LIST, .s = "a\0b\0", .n = 2},
        {.key = "code", .type = LF_INT, .i = 550},
        {.key = "neg", .type = LF_INT, .i = -42},
        {.key = "zero", .type = LF_INT, .i = 0},
        {.key = "num", .type = LF_NUM, .num = 3.0},
        {.key = "frac", .type = LF_NUM, .num = 0.25},
        {.key = "secs", .type = LF_SECS, .num = 0.000058},
        {.key = "on_error", .type = LF_BOOL, .i = 1},
        {.key = "msg", .type = LF_STR, .s = "q\"=\\", .n = 4},
        {.key = "we ird", .type = LF_STR, .s = "v", .n = 1},
        {.key = "", .type = LF_STR, .s = "e", .n = 1},
    };
    log_gen = 7;
    log_fields(LL_INFO, 12, "QID1", "message", f, sizeof f / sizeof f[0]);
    log_gen = 0;
}

static void json_fields(void)
{
    log_set_format("json");
    struct log_field f[] = {
        {.key = "rcpts", .type = LF_LIST, .s = rcpts, .n = 2},
        {.key = "none", .type = LF_LIST, .s = "", .n = 0},
        {.key = "code", .type = LF_INT, .i = -3},
        {.key = "level", .type = LF_STR, .s = "x\n", .n = 2},
    };
    log_fields(LL_WARN, 0, NULL, "m", f, sizeof f / sizeof f[0]);
    log_set_format("text");
}

static void plain_line(void) { log_msg(LL_WARN, 3, "Q9", "hello %d", 5); }

static char big[100 * 1024];
static void long_line(void)
{
    memset(big, 'x', sizeof big);
    struct log_field f = {.key = "big", .type = LF_STR, .s = big,
                          .n = sizeof big};
    log_fields(LL_INFO, 0, NULL, "long", &f, 1);
}

int main(void)
{
    size_t n;
    int writes;
    const char *out = capture(text_fields, &n, &writes);
    static const char want[] =
        "INFO [c=12 g=7 q=QID1] message client=h[192.0.2.1] from=\"\" "
        "rcpts=\"a@x,b c@y\" none=\"\" one_empty=\"\" plain=a,b code=550 "
        "neg=-42 zero=0 num=3 frac=0.25 secs=0.000058 on_error=true "
        "_msg=\"q\\\"=\\\\\" we_ird=v _=e\n";
    CHECK(strcmp(body(out), want) == 0, "text line:\n got: %s want: %s",
          body(out), want);
    CHECK(writes == 1, "%d writes for one line", writes);

    out = capture(plain_line, &n, &writes);
    CHECK(strcmp(body(out), "WARN [c=3 g=0 q=Q9] hello 5\n") == 0 && writes == 1,
          "log_msg line: %s (%d writes)", out, writes);

    out = capture(json_fields, &n, &writes);
    const char *rest = strstr(out, "\"level\":\"warn\"");
    static const char jwant[] =
        "\"level\":\"warn\",\"msg\":\"m\",\"rcpts\":[\"a@x\",\"b c@y\"],"
        "\"none\":[],\"code\":-3,\"_level\":\"x\\n\"}\n";
    CHECK(strncmp(out, "{\"ts\":\"", 7) == 0 && rest && strcmp(rest, jwant) == 0,
          "json line:\n got: %s want: ...%s", out, jwant);

    out = capture(long_line, &n, &writes);
    CHECK(n == 64 * 1024 && out[n - 1] == '\n' &&
              memchr(out, '\n', n) == out + n - 1,
          "a long line is cut to the cap with one newline at its end (%zu)", n);
    /* whole lines from several workers sharing stderr must not mix */
    CHECK(writes == 1, "a long line took %d writes", writes);
    CHECK(strstr(out, " INFO long big=xxxx") != NULL, "long line start: %.40s",
          out);
    return t_done("test_log");
}
