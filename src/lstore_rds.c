/*
 * lstore_rds: milter.store's calls on a Redis server (part of the Lua
 * bridge), for --store redis://... or unix:..., through the rds engine's
 * connection for that URL (shared with milter.redis.new of the same URL).
 * Each call is one command and suspends only its handler, like every
 * lookup; the arguments were checked by lstore.c.
 *
 * Values: Redis keeps strings, so a number is kept as its decimal text
 * (which INCRBYFLOAT and every other client read as that number) and a
 * string as its bytes, except that a string which would read back as a
 * number, or which starts with STR_MARK, gets STR_MARK in front: values
 * come back with the type they were stored with, and values written by
 * other clients read naturally. incr runs as one server-side script (one
 * round trip, atomic across hosts): an absent key counts as 0 and gets the
 * ttl, a present one keeps its own, a string holding a number counts as
 * that number, anything else is "not a number", as on LMDB.
 */
#include "lb_int.h"
#include "metrics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rds.h"
#include "store.h"

#define TIMEOUT 5.0      /* seconds, capped by the handler's budget */
#define STR_MARK '\001'
#define TTL_LEN 24

/* KEYS[1] key; ARGV[1] increment, ARGV[2] ttl in seconds (0: none).
 * The number test is store_number's: decimal text only. */
static const char INCR[] =
    "local v = redis.call('GET', KEYS[1])\n"
    "local n = 0\n"
    "if v then\n"
    "  if string.byte(v, 1) == 1 then v = string.sub(v, 2) end\n"
    "  n = nil\n"
    "  if #v > 0 and #v < 64 and not string.find(v, '[^0-9+.eE-]') then\n"
    "    n = tonumber(v)\n"
    "  end\n"
    "  if not n then return redis.error_reply('not a number') end\n"
    "end\n"
    "n = n + tonumber(ARGV[1])\n"
    "if n ~= n or n == math.huge or n == -math.huge then\n"
    "  return redis.error_reply('not a number')\n"
    "end\n"
    "local s = string.format('%.17g', n)\n"
    "local ttl = tonumber(ARGV[2])\n"
    "if v then\n"
    "  local left = redis.call('PTTL', KEYS[1])\n"
    "  if left > 0 then redis.call('SET', KEYS[1], s, 'PX', left)\n"
    "  else redis.call('SET', KEYS[1], s) end\n"
    "elseif ttl > 0 then redis.call('SET', KEYS[1], s, 'EX', ttl)\n"
    "else redis.call('SET', KEYS[1], s) end\n"
    "return s\n";

/* the stored bytes back as the value they were */
static void push_value(lua_State *co, const char *s, size_t len)
{
    double d;
    if (len > 0 && s[0] == STR_MARK)
        lua_pushlstring(co, s + 1, len - 1);
    else if (store_number(s, len, &d) == 0)
        lua_pushnumber(co, d);
    else
        lua_pushlstring(co, s, len);
}

/* wait.flags: the call's LSTORE_* */
static void replied(void *ud, const char *err, const struct rds_reply *rep,
                    size_t n)
{
    struct lb_conn *lc = ud;
    lua_State *co = lc->co;
    (void)n;
    if (!err && rep[0].type == RDS_ERROR)
        err = strstr(rep[0].str, "not a number") ? "not a number"
                                                  : rep[0].str;
    if (err) {
        lua_pushnil(co);
        lua_pushstring(co, err);
        lwait_complete(lc, 2);
        return;
    }
    switch (lc->wait.flags) {
    case LSTORE_GET:
        if (rep[0].type == RDS_STRING)
            push_value(co, rep[0].str, rep[0].len);
        else
            lua_pushnil(co);
        break;
    case LSTORE_INCR: {
        double d = 0;
        if (rep[0].type != RDS_STRING ||
            store_number(rep[0].str, rep[0].len, &d) < 0) {
            lua_pushnil(co);
            lua_pushliteral(co, "unexpected reply from the store's server");
            lwait_complete(lc, 2);
            return;
        }
        lua_pushnumber(co, d);
        break;
    }
    default: lua_pushboolean(co, 1); break;
    }
    lwait_complete(lc, 1);
}

static void cancel(void *op) { rds_cancel(op); }

/* argv for SET key value [EX ttl]; the value's bytes in *own if marked */
static int set_args(const char **argv, size_t *lens, const struct store_val *v,
                    char *num, char **own)
{
    double d;
    if (v->type == STORE_NUMBER) {
        int len = lredis_fmt_num(v->num, num);
        if (len < 0)
            return -1;
        argv[2] = num;
        lens[2] = (size_t)len;
    } else if ((v->len > 0 && v->str[0] == STR_MARK) ||
               store_number(v->str, v->len, &d) == 0) {
        if (!(*own = malloc(v->len + 1)))
            return -1;
        (*own)[0] = STR_MARK;
        memcpy(*own + 1, v->str, v->len);
        argv[2] = *own;
        lens[2] = v->len + 1;
    } else {
        argv[2] = v->str;
        lens[2] = v->len;
    }
    return 0;
}

int lstore_rds(lua_State *L, int op, const char *key, size_t klen,
               const struct store_val *v, double by, double ttl)
{
    struct lb_conn *lc = lwait_current(L, "milter.store");
    const char *err;
    struct rds *r = rds_get(store_redis_url(), &err);
    if (!r)
        return lwait_fail(L, err);
    double timeout = lwait_cap(lc, TIMEOUT);
    if (timeout <= 0)
        return lwait_fail(L, "timeout");
    const char *argv[6];
    size_t lens[6];
    char num[LREDIS_NUMLEN], tnum[TTL_LEN];
    char *own = NULL;
    int argc = 2;
    argv[1] = key;
    lens[1] = klen;
    int tlen = snprintf(tnum, sizeof tnum, "%.0f", ttl);
    switch (op) {
    case LSTORE_GET: argv[0] = "GET"; break;
    case LSTORE_DEL: argv[0] = "DEL"; break;
    case LSTORE_SET:
        argv[0] = "SET";
        if (set_args(argv, lens, v, num, &own) < 0)
            return lwait_fail(L, "out of memory");
        argc = 3;
        if (ttl > 0) {
            argv[3] = "EX";
            lens[3] = 2;
            argv[4] = tnum;
            lens[4] = (size_t)tlen;
            argc = 5;
        }
        break;
    default: { /* LSTORE_INCR: EVAL script 1 key by ttl */
        int blen = lredis_fmt_num(by, num);
        argv[0] = "EVAL";
        argv[1] = INCR;
        lens[1] = sizeof INCR - 1;
        argv[2] = "1";
        lens[2] = 1;
        argv[3] = key;
        lens[3] = klen;
        argv[4] = num;
        lens[4] = blen < 0 ? 0 : (size_t)blen;
        argv[5] = tnum;
        lens[5] = (size_t)tlen;
        argc = 6;
        break;
    }
    }
    lens[0] = strlen(argv[0]);
    struct rds_req *q = rds_req_new(1);
    int rc = q ? rds_req_add(q, argc, argv, lens) : -1;
    free(own);
    if (rc < 0) {
        rds_req_free(q);
        return lwait_fail(L, "out of memory");
    }
    lc->wait.flags = op;
    if (rds_start(r, q, timeout, replied, lc) < 0)
        return lwait_fail(L, "out of memory");
    return lwait_suspend(L, lc, MK_STORE, q, cancel);
}
