/*
 * wire: the milter protocol codec. Splits a byte stream into frames, decodes
 * MTA->filter commands into borrowed views, and encodes filter->MTA replies
 * and modifications. Pure: no I/O, no libev, no Lua.
 *
 * Frame: u32 big-endian length (command byte + payload), command byte,
 * payload. Strings inside payloads are NUL-terminated and are found with
 * memchr within the frame; a missing terminator is a decode error.
 */
#ifndef LUAMILTER_WIRE_H
#define LUAMILTER_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

/* MTA -> filter commands (SMFIC_*). */
enum {
    WIRE_ABORT = 'A', WIRE_BODY = 'B', WIRE_CONNECT = 'C', WIRE_MACRO = 'D',
    WIRE_BODYEOB = 'E', WIRE_HELO = 'H', WIRE_QUIT_NC = 'K', WIRE_HEADER = 'L',
    WIRE_MAIL = 'M', WIRE_EOH = 'N', WIRE_OPTNEG = 'O', WIRE_QUIT = 'Q',
    WIRE_RCPT = 'R', WIRE_DATA = 'T', WIRE_UNKNOWN = 'U',
};

/* Filter -> MTA replies and modifications (SMFIR_*). */
enum {
    WIRE_R_ADDRCPT = '+', WIRE_R_DELRCPT = '-', WIRE_R_ADDRCPT_PAR = '2',
    WIRE_R_SHUTDOWN = '4', WIRE_R_ACCEPT = 'a', WIRE_R_REPLBODY = 'b',
    WIRE_R_CONTINUE = 'c', WIRE_R_DISCARD = 'd', WIRE_R_CHGFROM = 'e',
    WIRE_R_CONN_FAIL = 'f', WIRE_R_ADDHEADER = 'h', WIRE_R_INSHEADER = 'i',
    WIRE_R_CHGHEADER = 'm', WIRE_R_PROGRESS = 'p', WIRE_R_QUARANTINE = 'q',
    WIRE_R_REJECT = 'r', WIRE_R_SKIP = 's', WIRE_R_TEMPFAIL = 't',
    WIRE_R_REPLYCODE = 'y',
};

/* SMFIF_* actions the filter may request. */
#define SMFIF_ADDHDRS 0x001u
#define SMFIF_CHGBODY 0x002u
#define SMFIF_ADDRCPT 0x004u
#define SMFIF_DELRCPT 0x008u
#define SMFIF_CHGHDRS 0x010u
#define SMFIF_QUARANTINE 0x020u
#define SMFIF_CHGFROM 0x040u
#define SMFIF_ADDRCPT_PAR 0x080u
#define SMFIF_SETSYMLIST 0x100u

/* SMFIP_* protocol flags. */
#define SMFIP_NOCONNECT 0x000001u
#define SMFIP_NOHELO 0x000002u
#define SMFIP_NOMAIL 0x000004u
#define SMFIP_NORCPT 0x000008u
#define SMFIP_NOBODY 0x000010u
#define SMFIP_NOHDRS 0x000020u
#define SMFIP_NOEOH 0x000040u
#define SMFIP_NR_HDR 0x000080u
#define SMFIP_NOUNKNOWN 0x000100u
#define SMFIP_NODATA 0x000200u
#define SMFIP_SKIP 0x000400u
#define SMFIP_RCPT_REJ 0x000800u
#define SMFIP_NR_CONN 0x001000u
#define SMFIP_NR_HELO 0x002000u
#define SMFIP_NR_MAIL 0x004000u
#define SMFIP_NR_RCPT 0x008000u
#define SMFIP_NR_DATA 0x010000u
#define SMFIP_NR_UNKN 0x020000u
#define SMFIP_NR_EOH 0x040000u
#define SMFIP_NR_BODY 0x080000u
#define SMFIP_HDR_LEADSPC 0x100000u

#define WIRE_MAX_CHUNK 65535u /* largest payload we send: MTAs refuse more */
#define WIRE_MAX_REPLY_LINES 32
#define WIRE_MAX_REPLY_LINE 980

struct wire_str {
    const char *p; /* borrowed; NUL-terminated inside the frame */
    size_t n;      /* length without the NUL */
};

/* One frame: views into the input, valid until the input is consumed. */
struct wire_frame {
    uint8_t cmd;
    const uint8_t *data; /* payload, borrowed */
    size_t len;          /* payload length (frame length - 1) */
};

/* A decoded MTA command; every pointer borrows from the frame. */
struct wire_cmd {
    uint8_t cmd;
    uint32_t version, actions, protocol; /* OPTNEG */
    uint8_t macro_for;                   /* MACRO: the command byte */
    char family;                         /* CONNECT: '4' '6' 'L' 'U' */
    uint16_t port;                       /* CONNECT */
    struct wire_str s1;  /* CONNECT host, HELO, MAIL/RCPT address,
                            HEADER name, UNKNOWN command */
    struct wire_str s2;  /* CONNECT address, HEADER value */
    const char *list;    /* MACRO pairs or MAIL/RCPT args: NUL-separated */
    size_t list_len;     /* bytes in list */
    unsigned list_count; /* strings in list (MACRO: 2 per pair) */
    const uint8_t *body; /* BODY / BODYEOB bytes */
    size_t body_len;
};

enum { WIRE_NEED_MORE = 0, WIRE_FRAME = 1, WIRE_ERROR = -1 };

/*
 * Looks for one complete frame at the start of p[0..n). Returns WIRE_FRAME
 * and fills *f and *used, WIRE_NEED_MORE when more bytes are needed, or
 * WIRE_ERROR with *err set when the length field is 0 or above max_len
 * (checked as soon as the 4 length bytes are there, before any buffering).
 */
int wire_next_frame(const uint8_t *p, size_t n, size_t max_len,
                     struct wire_frame *f, size_t *used, const char **err);

/* Decodes a frame into *c. Returns 0, or -1 with *err set (static text). */
int wire_decode(const struct wire_frame *f, struct wire_cmd *c,
                const char **err);

/*
 * Iterates a NUL-separated list (MACRO pairs, ESMTP args): returns the next
 * string at *pos and advances it, or a string with p == NULL at the end.
 */
struct wire_str wire_list_next(const char *list, size_t len, size_t *pos);

/*
 * Length of the header field name at the start of p[0..n): printable ASCII
 * without space or colon (RFC 5322 ftext). 0 when p does not start with one.
 */
size_t wire_field_name_len(const char *p, size_t n);

/* Encoders: append complete frames to out; each returns 0 or -1 (no room). */
int wire_put(struct buf *out, uint8_t cmd, const void *payload, size_t len);
/* One frame whose payload is the given strings, each followed by a NUL. */
int wire_put_strs(struct buf *out, uint8_t cmd, const struct wire_str *s,
                  int n);
/* CHGHEADER / INSHEADER: u32 index, name, value. */
int wire_put_idx_header(struct buf *out, uint8_t cmd, uint32_t index,
                        struct wire_str name, struct wire_str value);
/* REPLBODY, cut into frames of at most WIRE_MAX_CHUNK bytes. */
int wire_put_body(struct buf *out, const void *p, size_t len);

struct wire_symlist {
    uint32_t stage;      /* SMFIM_*: 0 connect .. 6 eoh */
    struct wire_str names; /* space separated, e.g. "{client_addr} i" */
};
int wire_put_optneg(struct buf *out, uint32_t version, uint32_t actions,
                    uint32_t protocol, const struct wire_symlist *lists,
                    int nlists);

/*
 * REPLYCODE: code (400..599), optional xcode ("5.7.1", may be empty) and
 * 1..32 lines. Multi-line replies use "ddd-" on all but the last line and
 * CRLF between lines; '%' is sent as "%%" so it reaches the client as is.
 */
int wire_put_replycode(struct buf *out, int code, struct wire_str xcode,
                       const struct wire_str *lines, int nlines);
/*
 * The payload bytes wire_put_replycode() would write (with the '%'
 * escaping), so a verdict can be refused before it is sent: MTAs refuse
 * packets above WIRE_MAX_CHUNK payload bytes, and so does the encoder.
 */
size_t wire_replycode_len(struct wire_str xcode, const struct wire_str *lines,
                          int nlines);
/*
 * Whether x is an RFC 3463 enhanced status code "C.S.D" (S and D 1 to 3
 * digits) whose class digit C is cls (2, 4 or 5).
 */
int wire_xcode_valid(const char *x, size_t n, int cls);
/* The enhanced code sent when a reply gives none: 5.7.1, 4.7.1, 2.0.0. */
struct wire_str wire_default_xcode(int code);

#endif
