#!/bin/sh
# shellcheck disable=SC2317  # functions called from traps
# End-to-end suite on Sendmail: a private Sendmail 8.17 (Debian 12's
# sendmail-bin, unpacked, never installed) on loopback, luamilter as its
# milter (one listener over a unix socket, one over TCP), swaks as the SMTP
# client and the loopback sink of the Postfix suite storing the exact bytes
# Sendmail delivers.  The cases are spec/e2e/run.py's, with E2E_MTA=sendmail.
#
#   scripts/e2e-sendmail.sh [CASE-PREFIX ...]     (as root, or with sudo)
#
# scripts/sendmail-root.sh fetches sendmail-bin, sendmail-base, sendmail-cf
# and two libraries with `apt-get download` and unpacks them into
# build/sendmail-root (once; cached).  sendmail-bin is never installed: it
# conflicts with postfix.  This script writes a sendmail.mc under a fresh
# temp dir, makes the .cf with the unpacked sendmail-cf m4 files, and runs
# `sendmail -bD` (the daemon in the foreground, as root) with that .cf, with
# LD_LIBRARY_PATH at the unpacked libraries and LD_PRELOAD at
# build/sendmail-shim.so (spec/e2e/sendmail_shim.c: its syslog(3) lines go
# to $T/log/maillog, its host name is mta.e2e.test).  /etc/mail, port 25
# and every system service are left alone.  Sendmail listens on two free
# loopback ports, each daemon with its own milter (InputMailFilters=):
# MTA-unix uses unix:$T/run/luamilter.sock, MTA-inet inet:PORT@127.0.0.1,
# and relays every recipient to the sink (SMART_HOST).  Everything started
# here is stopped by pid on exit; the temp dir is removed unless
# E2E_KEEP=1.  E2E_TRANSPORTS=unix or =inet runs one phase.  The milter
# macros are the .cf's defaults (confMILTER_MACROS_*, no v at connect);
# E2E_SM_CONNECT_MACROS='j, _, {daemon_name}, {if_name}, {if_addr}, v'
# (for one) replaces the connect list.  A CASE-PREFIX
# runs the cases whose names start with it; 'NAME$' the case of that name.
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# the helpers this suite shares with scripts/e2e-postfix.sh; their
# messages start with $SUITE
SUITE=e2e-sendmail
# shellcheck source-path=SCRIPTDIR source=e2e-lib.sh
. "$ROOT/scripts/e2e-lib.sh"

need_root Sendmail "$@"

# --- packages and Sendmail ---------------------------------------------------
install_missing swaks python3 m4
SMROOT=$ROOT/build/sendmail-root
scripts/sendmail-root.sh "$SMROOT"
SM=$SMROOT/usr/libexec/sendmail/sendmail
SMCF=$SMROOT/usr/share/sendmail/cf
SHIM=$ROOT/build/sendmail-shim.so
if [ ! -f "$SHIM" ] || [ -n "$(find spec/e2e/sendmail_shim.c -newer "$SHIM")" ]; then
  ${CC:-cc} -std=c11 -Wall -Wextra -Werror -O2 -shared -fPIC -o "$SHIM" spec/e2e/sendmail_shim.c
fi
find_python

# --- luamilter -------------------------------------------------------------
find_luamilter

# --- temp dir and cleanup ----------------------------------------------------
T=$(mktemp -d /tmp/luamilter-e2e-sm.XXXXXX)
SINK_PID=""
SM_PID=""
DRIVER_PID=""

# pids of this run's Sendmail processes: our binary, working in our queue
# directory (Sendmail rewrites its command line, and a delivery process can
# outlive the session that forked it)
sm_procs() {
  for d in /proc/[0-9]*; do
    [ "$(readlink "$d/exe" 2>/dev/null)" = "$SM" ] || continue
    [ "$(readlink "$d/cwd" 2>/dev/null)" = "$T/queue" ] || continue
    echo "${d#/proc/}"
  done
}

# cleanup's part for Sendmail: the daemon, then every process of this run
stop_mta() {
  stop_pid "$SM_PID" "sendmail daemon"
  for p in $(sm_procs); do stop_pid "$p" "sendmail child"; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$T/etc" "$T/queue" "$T/log" "$T/sink" "$T/run" "$T/work" "$T/pids"
# Sendmail wants its queue directory private to its owner
chmod 700 "$T/queue"
: > "$T/log/statistics"
: > "$T/etc/aliases"

# four free loopback ports: two Sendmail daemons, the sink, luamilter's TCP
pick_ports

# --- Sendmail configuration (the lines README's "Sendmail notes" quote) ------
# Name resolution from files only: the instance's own hosts file (the
# client's 127.0.0.1 is localhost) and no DNS, so nothing waits on a
# resolver and the recipients' domains need not exist.
printf '127.0.0.1 localhost\n127.0.1.1 mta.e2e.test\n' > "$T/etc/hosts"
printf 'hosts files\naliases files\n' > "$T/etc/service.switch"
MILTER_T='T=C:5s;S:5s;R:5s;E:5m'
MACROS=""
if [ -n "${E2E_SM_CONNECT_MACROS:-}" ]; then
  MACROS="define(\`confMILTER_MACROS_CONNECT', \`$E2E_SM_CONNECT_MACROS')dnl"
fi
cat > "$T/etc/sendmail.mc" <<MC
divert(-1)
# private instance of the luamilter e2e suite; nothing here is system-wide
divert(0)dnl
VERSIONID(\`luamilter e2e suite')dnl
OSTYPE(\`linux')dnl
define(\`confDOMAIN_NAME', \`mta.e2e.test')dnl
define(\`QUEUE_DIR', \`$T/queue')dnl
define(\`STATUS_FILE', \`$T/log/statistics')dnl
define(\`ALIAS_FILE', \`$T/etc/aliases')dnl
define(\`HELP_FILE', \`$SMROOT/etc/mail/helpfile')dnl
define(\`confPID_FILE', \`$T/run/sendmail.pid')dnl
define(\`confHOST_STATUS_DIRECTORY', \`')dnl
define(\`confSERVICE_SWITCH_FILE', \`$T/etc/service.switch')dnl
define(\`confHOSTS_FILE', \`$T/etc/hosts')dnl
define(\`confDONT_PROBE_INTERFACES', \`True')dnl
define(\`confBIND_OPTS', \`-DNSRCH -DEFNAMES')dnl
dnl the temp dir lies in /tmp: world-writable, but sticky
define(\`confDONT_BLAME_SENDMAIL', \`TrustStickyBit')dnl
dnl no SMTP AUTH, no load-average throttling on a busy test machine
define(\`confAUTH_MECHANISMS', \`')dnl
define(\`confQUEUE_LA', \`999')dnl
define(\`confREFUSE_LA', \`999')dnl
define(\`confDELAY_LA', \`0')dnl
define(\`confMAX_DAEMON_CHILDREN', \`0')dnl
define(\`confCONNECTION_RATE_THROTTLE', \`0')dnl
define(\`confEIGHT_BIT_HANDLING', \`pass8')dnl
define(\`confMAX_MESSAGE_SIZE', \`20971520')dnl
define(\`confLOG_LEVEL', \`14')dnl
dnl every recipient domain goes to the sink
define(\`SMART_HOST', \`esmtp:[127.0.0.1]')dnl
define(\`ESMTP_MAILER_ARGS', \`TCP \$h $SINK_PORT')dnl
FEATURE(\`nocanonify')dnl
FEATURE(\`promiscuous_relay')dnl
FEATURE(\`accept_unresolvable_domains')dnl
FEATURE(\`no_default_msa')dnl
dnl two listeners, each with its own milter; no port 25, no 587
DAEMON_OPTIONS(\`Port=$SMTP_UNIX, Addr=127.0.0.1, Name=MTA-unix, InputMailFilters=luamilter_unix')dnl
DAEMON_OPTIONS(\`Port=$SMTP_INET, Addr=127.0.0.1, Name=MTA-inet, InputMailFilters=luamilter_inet')dnl
dnl --- milter ---
MAIL_FILTER(\`luamilter_unix', \`S=unix:$T/run/luamilter.sock, F=T, $MILTER_T')dnl
INPUT_MAIL_FILTER(\`luamilter_inet', \`S=inet:$MILTER_PORT@127.0.0.1, F=T, $MILTER_T')dnl
$MACROS
MAILER(\`smtp')dnl
MC
# (promiscuous_relay warns on stderr: this instance listens on loopback only)
m4 -D_CF_DIR_="$SMCF/" "$SMCF/m4/cf.m4" "$T/etc/sendmail.mc" >"$T/etc/sendmail.cf" 2>"$T/log/m4.log" || {
  cat "$T/log/m4.log" >&2; echo "e2e-sendmail: m4 failed" >&2; exit 1; }
if grep -q '^O DaemonPortOptions=.*Port=\(25\|587\)\b' "$T/etc/sendmail.cf" ||
   [ "$(grep -c '^O DaemonPortOptions=' "$T/etc/sendmail.cf")" -ne 2 ]; then
  echo "e2e-sendmail: the .cf would listen elsewhere than the two test ports" >&2; exit 1
fi

export LD_LIBRARY_PATH="$SMROOT/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_PRELOAD="$SHIM" SYSLOG_SHIM_FILE="$T/log/maillog" SM_SHIM_HOSTNAME=mta.e2e.test
# the shim is Sendmail's: python (wait_port) runs without it
py() { env -u LD_PRELOAD "$PY" "$@"; }

# --- start the sink and Sendmail ----------------------------------------------
env -u LD_PRELOAD "$PY" spec/e2e/sink.py "$T/sink" "$SINK_PORT" >"$T/log/sink.log" 2>&1 &
SINK_PID=$!

wait_port "$SINK_PORT" sink
# -bD: the daemon, in the foreground (its pid is ours to stop); queue runs
# are left to the cases
(cd "$T/queue" && exec "$SM" -C "$T/etc/sendmail.cf" -bD) >"$T/log/sendmail.out" 2>&1 &
SM_PID=$!
if ! wait_port "$SMTP_UNIX" "sendmail (unix milter)" || ! wait_port "$SMTP_INET" "sendmail (inet milter)"; then
  cat "$T/log/sendmail.out" "$T/log/maillog" >&2 2>/dev/null || true
  exit 1
fi
log "$("$SM" -C "$T/etc/sendmail.cf" -d0.1 -bt </dev/null 2>&1 | sed -n 's/^Version //p' | head -1 | sed 's/^/sendmail /') in $T: 127.0.0.1:$SMTP_UNIX (milter unix:$T/run/luamilter.sock), 127.0.0.1:$SMTP_INET (milter inet:$MILTER_PORT@127.0.0.1), sink 127.0.0.1:$SINK_PORT"
log "luamilter: $LUAMILTER_BIN"

# --- the cases ----------------------------------------------------------------
export E2E_MTA=sendmail E2E_DIR="$T" E2E_SMTP_UNIX="$SMTP_UNIX" E2E_SMTP_INET="$SMTP_INET" \
  E2E_SINK_PORT="$SINK_PORT" E2E_MILTER_PORT="$MILTER_PORT" E2E_SM_BIN="$SM" \
  E2E_ROOT="$ROOT" LUAMILTER_BIN
# the driver and the programs it runs do without the shim (Sendmail's own
# commands get it back from the environment kept in E2E_SM_PRELOAD)
export E2E_SM_PRELOAD="$LD_PRELOAD"
run_driver 300 env -u LD_PRELOAD "$PY" spec/e2e/run.py "$@"
