/* store: see store.h. */
#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* The file grows only by new keys, so the sweep's work follows them: every
 * SWEEP_EVERY keys added, SWEEP_SCAN entries are looked at: two per new
 * key, so that under a steady stream of new keys a whole pass takes half
 * as many keys as the file holds, and the expired entries waiting for it
 * stay fewer than the live ones. A counter rewritten in place adds
 * nothing and pays nothing. */
#define SWEEP_EVERY 32 /* keys added between two sweeps */
#define SWEEP_SCAN 64  /* entries a sweep looks at */
#define FULL_SCAN 4096 /* entries looked at before "store full" */
#define HDR 9          /* type byte + int64 expiry (unix ms, 0 = none) */
#define NOTHING (-2)   /* a write_fn found nothing to write */

static char spec_path[4096];   /* from --store, absolute; "" = default */
static char redis_url[4096];   /* --store redis://... or unix:...; "" = LMDB */
static char path[4096];        /* resolved on open */
static int subdir;             /* path is a directory */
static size_t map_size = STORE_DEFAULT_MAP;
static MDB_env *env;
static MDB_dbi dbi;
/* env belongs to this process only while no fork came between: the
 * child handler counts forks, so that no store call pays a getpid(2). */
static unsigned fork_gen, env_gen;
static int atfork_set;  /* else (no memory for the handler) getpid(2) tells */
static pid_t env_pid;   /* the process that opened env */
static unsigned added;         /* keys added since the last sweep */
static unsigned adding;        /* keys the write in progress adds */
static char sweep_key[STORE_MAX_KEY];
static size_t sweep_klen;      /* where the next sweep resumes */
static char *vbuf;             /* a string get returned */
static size_t vcap;
static char errbuf[256];

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* mkdir -p of dir (modified in place and restored); 0 or -1 with errno */
static int mkdirs(char *dir)
{
    for (char *p = dir + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char c = *p;
        *p = '\0';
        int r = mkdir(dir, 0750);
        *p = c;
        if (r < 0 && errno != EEXIST)
            return -1;
        if (c == '\0')
            break;
    }
    struct stat sb;
    if (stat(dir, &sb) < 0)
        return -1;
    if (!S_ISDIR(sb.st_mode)) {
        errno = ENOTDIR;
        return -1;
    }
    return 0;
}

/* dir exists (created if need be), is ours or writable: path = dir/file */
static int try_dir(const char *dir, const char *file, int private_tmp)
{
    char d[sizeof path];
    if (snprintf(d, sizeof d, "%s", dir) >= (int)sizeof d || mkdirs(d) < 0)
        return -1;
    struct stat sb;
    if (private_tmp && (lstat(d, &sb) < 0 || !S_ISDIR(sb.st_mode) ||
                        sb.st_uid != geteuid()))
        return -1; /* /tmp/luamilter-UID made by someone else */
    if (access(d, W_OK | X_OK) < 0)
        return -1;
    if (snprintf(path, sizeof path, "%s/%s", d, file) >= (int)sizeof path)
        return -1;
    return 0;
}

/* The default path: see README "Shared state: milter.store". */
static void default_path(void)
{
    char d[sizeof path];
    const char *xdg = getenv("XDG_STATE_HOME"), *home = getenv("HOME");
    subdir = 0;
    if (geteuid() == 0 && try_dir("/var/lib/luamilter", "store.mdb", 0) == 0)
        return;
    if (xdg && xdg[0] == '/' &&
        snprintf(d, sizeof d, "%s/luamilter", xdg) < (int)sizeof d &&
        try_dir(d, "store.mdb", 0) == 0)
        return;
    if (home && home[0] == '/' &&
        snprintf(d, sizeof d, "%s/.local/state/luamilter", home) <
            (int)sizeof d &&
        try_dir(d, "store.mdb", 0) == 0)
        return;
    snprintf(d, sizeof d, "/tmp/luamilter-%u", (unsigned)geteuid());
    if (try_dir(d, "store.mdb", 1) < 0) /* the open fails, naming it */
        snprintf(path, sizeof path, "/tmp/luamilter-%u/store.mdb",
                 (unsigned)geteuid());
}

int store_config(const char *spec, size_t msize, char *err, size_t n)
{
    if (msize)
        map_size = msize;
    redis_url[0] = '\0';
    if (!spec)
        return 0;
    if (strncmp(spec, "redis://", 8) == 0 || strncmp(spec, "unix:", 5) == 0) {
        if (strlen(spec) >= sizeof redis_url) {
            snprintf(err, n, "--store %.64s...: URL too long", spec);
            return -1;
        }
        snprintf(redis_url, sizeof redis_url, "%s", spec);
        return 0;
    }
    if (strncmp(spec, "lmdb:", 5) != 0) {
        snprintf(err, n,
                 "--store %s: expected lmdb:PATH, redis://HOST[:PORT][/DB] "
                 "or unix:/PATH",
                 spec);
        return -1;
    }
    const char *p = spec + 5;
    char cwd[2048];
    int w;
    if (!*p) {
        snprintf(err, n, "--store %s: the path is empty", spec);
        return -1;
    }
    if (p[0] == '/')
        w = snprintf(spec_path, sizeof spec_path, "%s", p);
    else if (getcwd(cwd, sizeof cwd))
        w = snprintf(spec_path, sizeof spec_path, "%s/%s", cwd, p);
    else
        w = -1;
    if (w < 0 || (size_t)w >= sizeof spec_path - 16) {
        snprintf(err, n, "--store %s: path too long", spec);
        spec_path[0] = '\0';
        return -1;
    }
    return 0;
}

const char *store_path(void) { return path; }

/* path and subdir from --store, creating the directories */
static int resolve(void)
{
    if (!spec_path[0]) {
        default_path();
        return 0;
    }
    size_t len = strlen(spec_path);
    struct stat sb;
    subdir = spec_path[len - 1] == '/' ||
             (stat(spec_path, &sb) == 0 && S_ISDIR(sb.st_mode));
    snprintf(path, sizeof path, "%s", spec_path);
    while (len > 1 && path[len - 1] == '/')
        path[--len] = '\0';
    if (subdir)
        return mkdirs(path);
    char *slash = strrchr(path, '/');
    if (slash == path)
        return 0;
    *slash = '\0';
    int r = mkdirs(path);
    *slash = '/';
    return r;
}

/* "store: why", lowercase (errors are short lowercase strings) */
static const char *text(const char *why)
{
    snprintf(errbuf, sizeof errbuf, "store: %s", why);
    for (char *p = errbuf; *p; p++)
        if (*p >= 'A' && *p <= 'Z')
            *p = (char)(*p - 'A' + 'a');
    return errbuf;
}

static const char *fail_text(int rc)
{
    return rc == MDB_MAP_FULL ? "store full" : text(mdb_strerror(rc));
}

/*
 * Gives the whole map its disk blocks now. Commits write straight into
 * the shared map (MDB_WRITEMAP), and a page the file system cannot back
 * would be SIGBUS in the worker that touched it, not an error: so a disk
 * that cannot hold the map fails the open instead, and a disk that fills
 * later never reaches the store. A file system without the call
 * (EINVAL, EOPNOTSUPP) keeps the sparse file, as knot-resolver does.
 */
static int reserve_fd(int fd, off_t size, const char *what, const char **err)
{
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        *err = text(strerror(errno));
        return -1;
    }
    off_t want = size > sb.st_size ? size : sb.st_size;
    int rc = posix_fallocate(fd, 0, want);
    if (rc == 0 || rc == EINVAL || rc == EOPNOTSUPP)
        return 0;
    char why[160];
    snprintf(why, sizeof why, "cannot reserve the %s's %lld bytes on disk%s: %s",
             what, (long long)want, size ? " (--store-map-size)" : "",
             strerror(rc));
    *err = text(why);
    return -1;
}

static int reserve(MDB_env *e, const char **err)
{
    mdb_filehandle_t fd;
    MDB_envinfo info;
    int rc;
    if ((rc = mdb_env_get_fd(e, &fd)) || (rc = mdb_env_info(e, &info))) {
        *err = fail_text(rc);
        return -1;
    }
    return reserve_fd(fd, (off_t)info.me_mapsize, "map", err);
}

/*
 * The lock file is a shared map too (LMDB's reader table), reserved alike,
 * but only while this process has no environment open on it: closing any
 * descriptor of a file drops all of the process's fcntl locks on it, and
 * LMDB's locks telling that a reader's process is alive are such locks
 * (without them another process's mdb_reader_check frees our slots). A
 * lock file not made yet is reserved by the next open.
 */
static int reserve_lock(const char **err)
{
    char lock[sizeof path + 16];
    snprintf(lock, sizeof lock, subdir ? "%s/lock.mdb" : "%s-lock", path);
    int fd = open(lock, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return 0;
        *err = text(strerror(errno));
        return -1;
    }
    int rc = reserve_fd(fd, 0, "lock file", err);
    close(fd);
    return rc;
}

static void on_fork(void) { fork_gen++; }

static int env_mine(void)
{
    return env && (atfork_set ? env_gen == fork_gen : env_pid == getpid());
}

/* This process's environment, opened now if need be; NULL with *err. */
static MDB_env *open_env(const char **err)
{
    static int atfork_tried; /* once: a late success would miss earlier forks */
    if (!atfork_tried) {
        atfork_tried = 1;
        atfork_set = pthread_atfork(NULL, NULL, on_fork) == 0;
    }
    if (env_mine())
        return env;
    env = NULL; /* a parent's, inherited across fork: left alone */
    if (resolve() < 0) {
        *err = text(strerror(errno));
        return NULL;
    }
    if (reserve_lock(err) < 0)
        return NULL;
    MDB_env *e;
    MDB_txn *txn;
    int rc = mdb_env_create(&e);
    if (rc) {
        *err = fail_text(rc);
        return NULL;
    }
    /* MDB_WRITEMAP: a commit is stores into the map, not a pwrite(2)
     * per page; see reserve() for what that asks of the disk */
    unsigned flags = MDB_NOSYNC | MDB_WRITEMAP | (subdir ? 0 : MDB_NOSUBDIR);
    if ((rc = mdb_env_set_mapsize(e, map_size)) ||
        (rc = mdb_env_open(e, path, flags, 0640))) {
        mdb_env_close(e);
        *err = fail_text(rc);
        return NULL;
    }
    if (reserve(e, err) < 0) {
        mdb_env_close(e);
        return NULL;
    }
    if ((rc = mdb_txn_begin(e, NULL, 0, &txn))) {
        mdb_env_close(e);
        *err = fail_text(rc);
        return NULL;
    }
    if ((rc = mdb_dbi_open(txn, NULL, 0, &dbi))) {
        mdb_txn_abort(txn);
        mdb_env_close(e);
        *err = fail_text(rc);
        return NULL;
    }
    if ((rc = mdb_txn_commit(txn))) {
        mdb_env_close(e);
        *err = fail_text(rc);
        return NULL;
    }
    int dead = 0;
    mdb_reader_check(e, &dead); /* slots of workers that were killed */
    env = e;
    env_gen = fork_gen;
    env_pid = getpid();
    return env;
}

const char *store_redis_url(void) { return redis_url[0] ? redis_url : NULL; }

int store_check(char *err, size_t n)
{
    const char *why;
    if (redis_url[0])
        return 0; /* nothing to open: calls connect, and fail, on their own */
    int ok = open_env(&why) != NULL;
    if (ok) {
        store_close();
        ok = reserve_lock(&why) == 0; /* the lock file open_env made */
    }
    if (!ok) {
        snprintf(err, n, "cannot open the store at %s: %s", path,
                 why + (strncmp(why, "store: ", 7) == 0 ? 7 : 0));
        return -1;
    }
    return 0;
}

void store_close(void)
{
    if (env_mine()) {
        mdb_env_sync(env, 1);
        mdb_env_close(env);
    }
    env = NULL;
}

/* ---- values ---------------------------------------------------------- */

static int64_t expiry_of(const MDB_val *v)
{
    int64_t x;
    memcpy(&x, (const char *)v->mv_data + 1, 8);
    return x;
}

static int expired(const MDB_val *v, int64_t now)
{
    int64_t x = expiry_of(v);
    return v->mv_size < HDR || (x != 0 && x <= now);
}

static int64_t expiry_for(double ttl, int64_t now)
{
    return ttl > 0 ? now + (int64_t)ceil(ttl) * 1000 : 0;
}

/* A value's bytes: type, expiry, payload (p has room for HDR + len). */
static void encode(char *p, int type, int64_t exp, const void *data,
                   size_t len)
{
    p[0] = (char)type;
    memcpy(p + 1, &exp, 8);
    if (len)
        memcpy(p + HDR, data, len);
}

/* Writes type, expiry and payload into a value of the right size. */
static int put(MDB_txn *txn, const MDB_val *k, int type, int64_t exp,
               const void *data, size_t len)
{
    MDB_val v = {.mv_size = HDR + len, .mv_data = NULL};
    int rc = mdb_put(txn, dbi, (MDB_val *)k, &v, MDB_RESERVE);
    if (rc == 0)
        encode(v.mv_data, type, exp, data, len);
    return rc;
}

/*
 * Deletes up to scan expired entries from where the last sweep stopped
 * (wrapping at the end). Its own write transaction: a failure here never
 * undoes a caller's write. Returns the number deleted.
 */
static int sweep(size_t scan)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    if (mdb_txn_begin(env, NULL, 0, &txn))
        return 0;
    if (mdb_cursor_open(txn, dbi, &cur)) {
        mdb_txn_abort(txn);
        return 0;
    }
    int64_t now = now_ms();
    MDB_val k = {.mv_size = sweep_klen, .mv_data = sweep_key}, v;
    int rc = sweep_klen ? mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE)
                        : mdb_cursor_get(cur, &k, &v, MDB_FIRST);
    int deleted = 0, bad = 0;
    size_t seen = 0;
    for (; rc == 0 && seen < scan; seen++) {
        if (expired(&v, now)) {
            if (mdb_cursor_del(cur, 0)) {
                bad = 1;
                break;
            }
            deleted++;
        }
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    if (rc == 0 && !bad && k.mv_size <= sizeof sweep_key) {
        memcpy(sweep_key, k.mv_data, k.mv_size); /* the next one to look at */
        sweep_klen = k.mv_size;
    } else {
        sweep_klen = 0; /* the end: start again from the first */
    }
    mdb_cursor_close(cur);
    if (bad || !deleted) {
        mdb_txn_abort(txn);
        return 0;
    }
    return mdb_txn_commit(txn) ? 0 : deleted;
}

static void after_write(void)
{
    added += adding;
    if (added >= SWEEP_EVERY) {
        added = 0;
        sweep(SWEEP_SCAN);
    }
}

/*
 * One write: fn runs in a write transaction and returns an LMDB code,
 * NOTHING when there is nothing to commit, or -1 with *err set for a
 * refusal of its own. A full map is retried once
 * after sweeping more expired entries: "store full" means full of live
 * data, as far as FULL_SCAN entries tell.
 */
typedef int (*write_fn)(MDB_txn *txn, void *arg, const char **err);

static int write_txn(write_fn fn, void *arg, const char **err)
{
    if (!open_env(err))
        return -1;
    for (int attempt = 0;; attempt++) {
        MDB_txn *txn;
        int rc = mdb_txn_begin(env, NULL, 0, &txn);
        if (rc) {
            *err = fail_text(rc);
            return -1;
        }
        adding = 0;
        rc = fn(txn, arg, err);
        if (rc == -1 || rc == NOTHING) {
            mdb_txn_abort(txn);
            return rc == -1 ? -1 : 0;
        }
        if (rc == 0)
            rc = mdb_txn_commit(txn);
        else
            mdb_txn_abort(txn);
        if (rc == 0) {
            after_write();
            return 0;
        }
        if (rc == MDB_MAP_FULL && attempt == 0) {
            sweep_klen = 0;
            if (sweep(FULL_SCAN) > 0)
                continue;
        }
        *err = fail_text(rc);
        return -1;
    }
}

struct op {
    MDB_val k;
    const struct store_val *v;
    double ttl, by, result;
};

static int do_set(MDB_txn *txn, void *arg, const char **err)
{
    (void)err;
    struct op *o = arg;
    int64_t exp = expiry_for(o->ttl, now_ms());
    MDB_stat before, after;
    int rc = mdb_stat(txn, dbi, &before);
    if (rc)
        return rc;
    if (o->v->type == STORE_NUMBER)
        rc = put(txn, &o->k, STORE_NUMBER, exp, &o->v->num, 8);
    else
        rc = put(txn, &o->k, STORE_STRING, exp, o->v->str, o->v->len);
    if (rc == 0 && mdb_stat(txn, dbi, &after) == 0)
        adding = after.ms_entries > before.ms_entries;
    return rc;
}

static int do_del(MDB_txn *txn, void *arg, const char **err)
{
    (void)err;
    struct op *o = arg;
    int rc = mdb_del(txn, dbi, &o->k, NULL);
    return rc == MDB_NOTFOUND ? NOTHING : rc;
}

int store_number(const char *s, size_t len, double *out)
{
    char tmp[64];
    if (len == 0 || len >= sizeof tmp)
        return -1;
    for (size_t i = 0; i < len; i++) /* decimal only: no hex, inf, space */
        if (!strchr("0123456789+-.eE", s[i]) || s[i] == '\0')
            return -1;
    memcpy(tmp, s, len);
    tmp[len] = '\0';
    char *end;
    errno = 0;
    double d = strtod(tmp, &end);
    if (errno || end != tmp + len || !isfinite(d))
        return -1;
    *out = d;
    return 0;
}

/* One search: the cursor finds the key, and a number already stored is
 * rewritten where it lies (MDB_CURRENT, same size) rather than looked up
 * again by mdb_put. The flags must be MDB_CURRENT alone: with any other
 * flag beside it (MDB_RESERVE, say) LMDB searches for the key again. */
static int do_incr(MDB_txn *txn, void *arg, const char **err)
{
    struct op *o = arg;
    int64_t now = now_ms();
    MDB_cursor *cur;
    int rc = mdb_cursor_open(txn, dbi, &cur);
    if (rc)
        return rc;
    MDB_val k = o->k, v;
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY);
    if (rc && rc != MDB_NOTFOUND) {
        mdb_cursor_close(cur);
        return rc;
    }
    double n = 0;
    int64_t exp = expiry_for(o->ttl, now);
    int in_place = 0;
    if (rc == 0 && !expired(&v, now)) {
        const char *p = v.mv_data;
        exp = expiry_of(&v);
        if (p[0] == STORE_NUMBER && v.mv_size == HDR + 8) {
            memcpy(&n, p + HDR, 8);
            in_place = 1;
        } else if (p[0] != STORE_STRING ||
                   store_number(p + HDR, v.mv_size - HDR, &n) < 0) {
            mdb_cursor_close(cur);
            *err = "not a number";
            return -1;
        }
    } else if (rc == 0 && v.mv_size == HDR + 8) {
        in_place = 1; /* expired, same size: a new value in its place */
    }
    o->result = n + o->by;
    if (!isfinite(o->result)) {
        mdb_cursor_close(cur);
        *err = "not a number";
        return -1;
    }
    if (!in_place) {
        mdb_cursor_close(cur);
        adding = rc == MDB_NOTFOUND; /* else a value of another size */
        return put(txn, &o->k, STORE_NUMBER, exp, &o->result, 8);
    }
    /* the caller's key, not k: k points into the page the put copies */
    char nb[HDR + 8];
    encode(nb, STORE_NUMBER, exp, &o->result, 8);
    MDB_val nv = {.mv_size = sizeof nb, .mv_data = nb};
    rc = mdb_cursor_put(cur, &o->k, &nv, MDB_CURRENT);
    mdb_cursor_close(cur);
    return rc;
}

int store_set(const char *key, size_t klen, const struct store_val *v,
              double ttl, const char **err)
{
    struct op o = {.k = {klen, (void *)key}, .v = v, .ttl = ttl};
    return write_txn(do_set, &o, err);
}

int store_del(const char *key, size_t klen, const char **err)
{
    struct op o = {.k = {klen, (void *)key}};
    return write_txn(do_del, &o, err);
}

int store_incr(const char *key, size_t klen, double by, double ttl,
               double *out, const char **err)
{
    struct op o = {.k = {klen, (void *)key}, .ttl = ttl, .by = by};
    if (write_txn(do_incr, &o, err) < 0)
        return -1;
    *out = o.result;
    return 0;
}

/* Deletes key if it is (still) expired: the reader met it. */
static int del_expired(MDB_txn *txn, void *arg, const char **err)
{
    (void)err;
    struct op *o = arg;
    MDB_val v;
    int rc = mdb_get(txn, dbi, &o->k, &v);
    if (rc)
        return rc == MDB_NOTFOUND ? NOTHING : rc;
    if (!expired(&v, now_ms()))
        return NOTHING; /* set again meanwhile */
    return mdb_del(txn, dbi, &o->k, NULL);
}

int store_get(const char *key, size_t klen, struct store_val *out,
              const char **err)
{
    if (!open_env(err))
        return -1;
    MDB_txn *txn;
    MDB_val k = {klen, (void *)key}, v;
    int rc = mdb_txn_begin(env, NULL, MDB_RDONLY, &txn);
    if (rc) {
        *err = fail_text(rc);
        return -1;
    }
    rc = mdb_get(txn, dbi, &k, &v);
    if (rc) {
        mdb_txn_abort(txn);
        if (rc == MDB_NOTFOUND)
            return 0;
        *err = fail_text(rc);
        return -1;
    }
    if (expired(&v, now_ms())) {
        mdb_txn_abort(txn);
        struct op o = {.k = k};
        const char *ignored;
        write_txn(del_expired, &o, &ignored); /* absent either way */
        return 0;
    }
    const char *p = v.mv_data;
    size_t len = v.mv_size - HDR;
    if (p[0] == STORE_NUMBER && len == 8) {
        out->type = STORE_NUMBER;
        memcpy(&out->num, p + HDR, 8);
    } else {
        if (len + 1 > vcap) {
            char *nb = realloc(vbuf, len + 1);
            if (!nb) {
                mdb_txn_abort(txn);
                *err = "out of memory";
                return -1;
            }
            vbuf = nb;
            vcap = len + 1;
        }
        memcpy(vbuf, p + HDR, len);
        out->type = STORE_STRING;
        out->str = vbuf;
        out->len = len;
    }
    mdb_txn_abort(txn);
    return 1;
}
