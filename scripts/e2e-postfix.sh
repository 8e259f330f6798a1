#!/bin/sh
# shellcheck disable=SC2317  # functions called from traps
# End-to-end suite: a private Postfix on loopback, luamilter as its milter
# (once over a unix socket, once over TCP), swaks as the SMTP client and a
# loopback sink that stores the exact bytes Postfix delivers.
#
#   scripts/e2e-postfix.sh [CASE-PREFIX ...]     (as root, or with sudo)
#
# Installs postfix and swaks from Debian's packages when they are missing
# (the package's own instance is left alone: this suite never reads or
# writes /etc/postfix and never uses port 25), builds build/luamilter
# (or uses $LUAMILTER_BIN), writes a Postfix configuration under a fresh
# temp dir, starts Postfix and the sink, and runs spec/e2e/run.py, which
# prints one PASS/FAIL line per case and exits non-zero on any failure.
# Everything started here is stopped by pid on exit; the temp dir is
# removed unless E2E_KEEP=1.  E2E_TRANSPORTS=unix or =inet runs one phase.
# A CASE-PREFIX runs the cases whose names start with it; 'NAME$' (a
# trailing $) runs the case of exactly that name.
#
# External-milter mode: E2E_EXTERNAL_MILTER=unix:/path (or inet:HOST:PORT,
# in Postfix's notation) points Postfix at a luamilter this suite neither
# starts nor stops (scripts/deb-install-check.sh: the packaged one), whose
# log is E2E_EXTERNAL_LOG; E2E_EXTERNAL_PID (its supervisor) and
# E2E_EXTERNAL_POLICY (the policy it serves, /etc/luamilter/policy.lua by
# default) are optional.  Only that transport's phase runs, and only cases
# whose policy is that file's text (spec/e2e/harness.py, External).
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# the helpers this suite shares with scripts/e2e-sendmail.sh; their
# messages start with $SUITE
SUITE=e2e
# shellcheck source-path=SCRIPTDIR source=e2e-lib.sh
. "$ROOT/scripts/e2e-lib.sh"

need_root Postfix "$@"

# --- packages -------------------------------------------------------------
# preseed, run before apt-get: "No configuration", the package must not set
# up (or start) a system instance of its own on port 25; ours lives in the
# temp dir.
preseed() { echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; }
install_missing postfix swaks python3
for c in postfix postconf postlog postqueue postsuper sendmail swaks; do
  command -v "$c" >/dev/null || { echo "e2e: $c not found after install" >&2; exit 1; }
done
find_python

# --- luamilter -------------------------------------------------------------
EXTERNAL=${E2E_EXTERNAL_MILTER:-}
if [ -n "$EXTERNAL" ]; then
  case $EXTERNAL in
    unix:/*) ext_tp=unix ;;
    inet:*:*) ext_tp=inet ;;
    *) echo "e2e: E2E_EXTERNAL_MILTER=$EXTERNAL: expected unix:/PATH or inet:HOST:PORT" >&2; exit 1 ;;
  esac
  if [ "${E2E_TRANSPORTS:-$ext_tp}" != "$ext_tp" ]; then
    echo "e2e: E2E_EXTERNAL_MILTER=$EXTERNAL runs the $ext_tp phase only (E2E_TRANSPORTS=$E2E_TRANSPORTS)" >&2
    exit 1
  fi
  [ -r "${E2E_EXTERNAL_LOG:-}" ] || { echo "e2e: E2E_EXTERNAL_LOG (the external luamilter's log) is not a readable file" >&2; exit 1; }
  export E2E_TRANSPORTS=$ext_tp
  LUAMILTER_BIN=external
else
  find_luamilter
fi

# --- temp dir and cleanup ----------------------------------------------------
T=$(mktemp -d /tmp/luamilter-e2e.XXXXXX)
chmod 755 "$T"   # Postfix's unprivileged daemons must reach the socket dir
SINK_PID=""
MASTER_PID=""
DRIVER_PID=""

# cleanup's part for Postfix: the master (from its pid file: it daemonizes)
# and the children it had
stop_mta() {
  if [ -f "$T/spool/pid/master.pid" ]; then
    MASTER_PID=$(tr -d ' \n' < "$T/spool/pid/master.pid")
  fi
  if alive "$MASTER_PID"; then
    children=$(ps -o pid= --ppid "$MASTER_PID" 2>/dev/null || true)
    postfix -c "$T/etc" stop >/dev/null 2>&1 || true
    wait_gone "$MASTER_PID" 100 || { log "postfix master ($MASTER_PID) still running, killing"; kill -KILL "$MASTER_PID" 2>/dev/null || true; wait_gone "$MASTER_PID" 50 || true; }
    for c in $children; do stop_pid "$c" "postfix child"; done
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$T/etc" "$T/spool" "$T/data" "$T/log" "$T/sink" "$T/run" "$T/work" "$T/pids"
chown postfix "$T/data"
chmod 755 "$T/run" "$T/sink" "$T/log"

# four free loopback ports: two smtpd listeners, the sink, luamilter's TCP
pick_ports

# where the two smtpd listeners find luamilter (external mode: one of them)
MILTER_UNIX=unix:$T/run/luamilter.sock
MILTER_INET=inet:127.0.0.1:$MILTER_PORT
if [ -n "$EXTERNAL" ]; then
  if [ "$ext_tp" = unix ]; then MILTER_UNIX=$EXTERNAL; else MILTER_INET=$EXTERNAL; fi
fi

# --- Postfix configuration (the lines README's "Postfix notes" quote) -------
cat > "$T/etc/main.cf" <<CF
# private instance of the luamilter e2e suite; nothing here is system-wide
compatibility_level = 3.6
queue_directory = $T/spool
data_directory = $T/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = $T/log/maillog
maillog_file_prefixes = $T/log
myhostname = mta.e2e.test
mydomain = e2e.test
myorigin = e2e.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
relay_domains =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:$SINK_PORT
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_banner = \$myhostname ESMTP
biff = no
smtputf8_enable = no
message_size_limit = 20971520
# deliver the header bytes as the client sent them (no address rewriting)
local_header_rewrite_clients =
disable_mime_output_conversion = yes

# --- milter ---
luamilter_unix = $MILTER_UNIX
luamilter_inet = $MILTER_INET
smtpd_milters = \$luamilter_unix
non_smtpd_milters = \$luamilter_unix
milter_protocol = 6
milter_default_action = tempfail
milter_connect_timeout = 5s
milter_command_timeout = 5s
milter_content_timeout = 10s
CF

cat > "$T/etc/master.cf" <<CF
# service          type  private unpriv chroot wakeup maxproc command
127.0.0.1:$SMTP_UNIX inet  n       -      n      -      -       smtpd
127.0.0.1:$SMTP_INET inet  n       -      n      -      -       smtpd
  -o smtpd_milters=\$luamilter_inet -o cleanup_service_name=cleanup_inet
# the TCP listener's own cleanup, so that its non_smtpd_milters is the TCP
# luamilter too (Postfix asks non_smtpd_milters about a message a milter
# discarded at MAIL FROM / first RCPT TO; see README "Postfix notes")
cleanup_inet unix n      -       n       -       0       cleanup
  -o non_smtpd_milters=\$luamilter_inet
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
CF

# --- start the sink and Postfix ---------------------------------------------
"$PY" spec/e2e/sink.py "$T/sink" "$SINK_PORT" >"$T/log/sink.log" 2>&1 &
SINK_PID=$!

wait_port "$SINK_PORT" sink
postfix -c "$T/etc" check
if ! postfix -c "$T/etc" start >"$T/log/start.log" 2>&1; then
  cat "$T/log/start.log" >&2
  echo "e2e: postfix did not start" >&2
  exit 1
fi
[ -f "$T/spool/pid/master.pid" ] && MASTER_PID=$(tr -d ' \n' < "$T/spool/pid/master.pid")
wait_port "$SMTP_UNIX" "postfix smtpd (unix milter)"
wait_port "$SMTP_INET" "postfix smtpd (inet milter)"
log "postfix $(postconf -c "$T/etc" -h mail_version) in $T: smtpd 127.0.0.1:$SMTP_UNIX (milter $MILTER_UNIX), 127.0.0.1:$SMTP_INET (milter $MILTER_INET), sink 127.0.0.1:$SINK_PORT"
if [ -n "$EXTERNAL" ]; then
  log "luamilter: external, at $EXTERNAL (log $E2E_EXTERNAL_LOG), serving ${E2E_EXTERNAL_POLICY:-/etc/luamilter/policy.lua}"
else
  log "luamilter: $LUAMILTER_BIN"
fi

# --- the cases ----------------------------------------------------------------
export E2E_DIR="$T" E2E_SMTP_UNIX="$SMTP_UNIX" E2E_SMTP_INET="$SMTP_INET" \
  E2E_SINK_PORT="$SINK_PORT" E2E_MILTER_PORT="$MILTER_PORT" \
  E2E_ROOT="$ROOT" LUAMILTER_BIN
run_driver 600 "$PY" spec/e2e/run.py "$@"
