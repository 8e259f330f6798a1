# shellcheck shell=sh
# shellcheck disable=SC2317  # functions called from traps
# The helpers both end-to-end suites use, scripts/e2e-postfix.sh and
# scripts/e2e-sendmail.sh: sourced by each once it has set ROOT (the
# repository, its working directory) and SUITE (the prefix of its
# messages: e2e, e2e-sendmail).  Only functions: sourcing runs nothing, so
# each suite keeps its own order of steps and its MTA's setup.
#
# They read and set the suite's globals: T (the temp dir), PY,
# LUAMILTER_BIN, SMTP_UNIX SMTP_INET SINK_PORT MILTER_PORT, SINK_PID and
# DRIVER_PID.  The suite defines stop_mta (cleanup calls it), and may
# redefine preseed and py (below).

log() { echo "$SUITE: $*"; }

# re-runs the suite under sudo, environment kept, unless it is root: the
# MTA ($1, for the message) must start as root.  Call: need_root MTA "$@"
need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "$SUITE: needs root ($1 must start as root)" >&2; exit 1; }
    shift
    exec sudo -E "$0" "$@"
  fi
}

# --- packages ---------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# what runs after the "installing" line and before apt-get: nothing, unless
# the suite has debconf questions to answer first (Postfix has)
preseed() { :; }

# installs those of the Debian packages "$@" that are missing
install_missing() {
  missing=""
  for p in "$@"; do installed "$p" || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    log "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    preseed
    apt-get update -qq || true
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
}

# PY: Debian's python3, else the one on PATH.  Called after install_missing,
# which may have just installed it.
find_python() {
  PY=/usr/bin/python3
  [ -x "$PY" ] || PY=python3
}

# how the helpers below run python: the Sendmail suite redefines it once its
# LD_PRELOAD shim is exported, to keep the shim out of python
py() { "$PY" "$@"; }

# --- luamilter --------------------------------------------------------------
# LUAMILTER_BIN: as given (relative to the repository) or build/luamilter,
# built now; it must be executable
find_luamilter() {
  if [ -z "${LUAMILTER_BIN:-}" ]; then
    make -s all >/dev/null
    LUAMILTER_BIN=$ROOT/build/luamilter
  fi
  case $LUAMILTER_BIN in /*) ;; *) LUAMILTER_BIN=$ROOT/$LUAMILTER_BIN ;; esac
  [ -x "$LUAMILTER_BIN" ] || { echo "$SUITE: no binary at $LUAMILTER_BIN" >&2; exit 1; }
}

# --- processes and cleanup --------------------------------------------------
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# waits (bounded, tenths of a second) until pid $1 is gone
wait_gone() {
  n=0
  while alive "$1" && [ "$n" -lt "$2" ]; do sleep 0.1; n=$((n + 1)); done
  ! alive "$1"
}

stop_pid() { # pid name
  alive "$1" || return 0
  kill -TERM "$1" 2>/dev/null || true
  wait_gone "$1" 50 || { log "$2 ($1) ignored SIGTERM, killing"; kill -KILL "$1" 2>/dev/null || true; wait_gone "$1" 50 || true; }
}

# the EXIT trap: stops by pid what the suite started (the driver, luamilter,
# the MTA by the suite's stop_mta, the sink), removes the temp dir unless
# E2E_KEEP=1, and exits with the status the suite was exiting with
cleanup() {
  rc=$?
  trap - EXIT INT TERM
  # luamilter processes the driver may have left behind (it stops its own;
  # this covers a driver killed by the timeout): only pids that still run
  # luamilter are signalled.
  stop_pid "$DRIVER_PID" driver
  for f in "$T"/pids/*.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    if alive "$p" && grep -q luamilter "/proc/$p/cmdline" 2>/dev/null; then stop_pid "$p" luamilter; fi
  done
  # and any luamilter process serving a policy from this temp dir (workers
  # the driver never saw)
  for d in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null < "$d/cmdline" | grep -q "luamilter.* $T/work/policy-"; then
      stop_pid "${d#/proc/}" luamilter
    fi
  done
  stop_mta
  stop_pid "$SINK_PID" sink
  if [ "${E2E_KEEP:-0}" = 1 ]; then log "kept $T"; else rm -rf "$T"; fi
  exit "$rc"
}

# --- ports ------------------------------------------------------------------
# four free loopback ports: SMTP_UNIX and SMTP_INET (the MTA's listeners,
# one per milter transport), SINK_PORT (the sink), MILTER_PORT (luamilter's
# TCP)
pick_ports() {
  # shellcheck disable=SC2046  # four numbers, split on purpose
  set -- $(py - <<'PYEOF'
import socket
socks = []
for _ in range(4):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PYEOF
)
  # shellcheck disable=SC2034  # the suite's globals: it uses them
  SMTP_UNIX=$1 SMTP_INET=$2 SINK_PORT=$3 MILTER_PORT=$4
}

wait_port() { # port name: bounded wait (10 s) until 127.0.0.1:port accepts
  py - "$1" <<'PYEOF' || { echo "$SUITE: $2 not listening on 127.0.0.1:$1" >&2; return 1; }
import socket, sys, time
deadline = time.time() + 10
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
PYEOF
}

# --- the cases --------------------------------------------------------------
# runs the driver, the command "$@" with a deadline of SECONDS, and exits
# with its status.  In the background so that INT/TERM reach this shell at
# once; the traps stop the driver (it stops its luamilter) and the EXIT trap
# the rest.  Call: run_driver SECONDS COMMAND...
run_driver() {
  secs=$1
  shift
  timeout -s TERM "$secs" "$@" &
  DRIVER_PID=$!
  trap 'stop_pid "$DRIVER_PID" driver; exit 130' INT
  trap 'stop_pid "$DRIVER_PID" driver; exit 143' TERM
  set +e
  wait "$DRIVER_PID"
  rc=$?
  set -e
  DRIVER_PID=""
  [ $rc -eq 124 ] && echo "$SUITE: FAIL: the suite did not finish within $secs s" >&2
  exit $rc
}
