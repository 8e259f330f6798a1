/*
 * notify: tells systemd (a Type=notify unit) how the supervisor is doing,
 * through sd_notify(3): READY=1 once every worker serves the script,
 * RELOADING=1 ... READY=1 around a reload, STOPPING=1 at shutdown, and a
 * STATUS= line with the generation and the number of workers. Without
 * NOTIFY_SOCKET in the environment every call does nothing.
 *
 * Only the supervisor talks to systemd (the unit's NotifyAccess=main):
 * notify_init() takes NOTIFY_SOCKET out of the environment, so neither
 * the workers nor the scripts they run inherit it. No libev, no Lua.
 */
#ifndef LUAMILTER_NOTIFY_H
#define LUAMILTER_NOTIFY_H

/* Remembers NOTIFY_SOCKET and removes it from the environment. Call once,
 * in the supervisor, before any fork. */
void notify_init(void);

/* READY=1 with "STATUS=serving generation GEN with N worker(s)", and a
 * note that the last reload failed when reload_failed. */
void notify_ready(unsigned gen, int workers, int reload_failed);

/* A STATUS= line alone while serving: "serving generation GEN with S of N
 * workers (replacing a worker)" while fewer than all serve, the READY
 * line's STATUS again once all do. */
void notify_serving(unsigned gen, int serving, int workers, int reload_failed);

/* RELOADING=1 (with MONOTONIC_USEC) and a STATUS= saying what is loaded. */
void notify_reloading(unsigned gen);

/* STOPPING=1 and a STATUS= line. */
void notify_stopping(void);

#endif
