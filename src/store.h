/*
 * store: the engine of milter.store on LMDB, without Lua or libev. A
 * key-value store in one file shared by every process of a host: each
 * call is one short local transaction (write transactions are serialized
 * across processes by LMDB, so incr is atomic across workers). Values are
 * strings or numbers (doubles) with an optional absolute expiry; an
 * expired key is absent for every reader and is deleted when a call meets
 * it, and a bounded sweep after every STORE_SWEEP_EVERY writes deletes
 * expired keys the calls do not meet, so the file does not grow without
 * bound.
 *
 * One environment per process, opened on first use and again in a child
 * after fork() (LMDB forbids using an environment across fork: a child
 * never touches, nor closes, what it inherited). Every call returns at
 * once: nothing here waits on anything but the file.
 */
#ifndef LUAMILTER_STORE_H
#define LUAMILTER_STORE_H

#include <stddef.h>

#define STORE_MAX_KEY 511 /* LMDB's default MDB_MAXKEYSIZE */
#define STORE_DEFAULT_MAP ((size_t)64 << 20)
#define STORE_MIN_MAP ((size_t)32 << 10)

enum { STORE_STRING = 1, STORE_NUMBER = 2 };

/* A value: str is borrowed (from the caller for set; from the engine for
 * get, valid until the next store call). */
struct store_val {
    int type; /* STORE_STRING or STORE_NUMBER */
    double num;
    const char *str;
    size_t len;
};

/*
 * Chooses the store: spec "lmdb:PATH" or NULL for the default path (see
 * store_path), or a Redis URL (see store_redis_url; checked by rds_get). PATH naming an existing directory, or ending in '/', holds
 * data.mdb and lock.mdb; any other PATH is the data file itself, with
 * PATH-lock beside it. map_size 0 keeps STORE_DEFAULT_MAP. Returns 0, or
 * -1 with a reason in err. Nothing is opened yet.
 */
int store_config(const char *spec, size_t map_size, char *err, size_t n);

/* The Redis URL when --store chose Redis ("redis://..." or "unix:..."),
 * else NULL: the calls are then lstore_rds.c's, and the LMDB functions
 * below are not used (store_check succeeds at once). */
const char *store_redis_url(void);

/*
 * The number a stored string holds: decimal text only (digits, sign,
 * point, exponent; no spaces, hex, inf or nan), read as a double. 0 and
 * *out, or -1.
 */
int store_number(const char *s, size_t len, double *out);

/*
 * Opens the store now (creating its directories and files) and closes it
 * again: the start-time check, done before workers fork. Returns 0, or -1
 * with "cannot open the store at PATH: why" in err.
 */
int store_check(char *err, size_t n);

/* The resolved path (after store_check or a first call), else "". */
const char *store_path(void);

/*
 * The calls. key/klen: 1 to STORE_MAX_KEY bytes, any bytes (the caller
 * checks). ttl: seconds > 0, or 0 for none. On failure they return -1
 * with *err a short lowercase reason, borrowed ("store full" when the map
 * is full, else the store's error text).
 */
/* 1 and *out when present, 0 when absent or expired. */
int store_get(const char *key, size_t klen, struct store_val *out,
              const char **err);
/* Replaces the value and its expiry. 0 on success. */
int store_set(const char *key, size_t klen, const struct store_val *v,
              double ttl, const char **err);
/* 0 on success (an absent key included). */
int store_del(const char *key, size_t klen, const char **err);
/*
 * Adds by to the number at key (an absent or expired key counts as 0 and
 * gets the expiry ttl; a present one keeps its own); a string holding a
 * decimal number counts as that number. 0 and *out, or -1 ("not a
 * number" for any other string).
 */
int store_incr(const char *key, size_t klen, double by, double ttl,
               double *out, const char **err);

/* Flushes and closes this process's environment, if it opened one. */
void store_close(void);

#endif
