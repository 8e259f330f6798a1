#!/bin/sh
# shellcheck disable=SC2317  # functions called from traps
# The Debian package installed for real (make deb-check, after
# spec/deb/deb_spec.lua), as root on this machine:
#
#   scripts/deb-install-check.sh [build/deb/luamilter_VERSION_ARCH.deb]
#
# 1. Refuses to run when anything the package would own is already there
#    (a luamilter package this script did not install, the user or group
#    luamilter, /etc/luamilter...); a package left by an earlier run of
#    this script (its marker, /var/tmp/luamilter-deb-install-check, names
#    it) is purged first.  Refuses where systemd runs (postinst would
#    start the unit itself).  Installs Postfix and swaks first when they
#    are missing (as scripts/e2e-postfix.sh does).  A root-owned
#    /var/lib/luamilter holding only a store is the default store of
#    root-run luamilter daemons (the specs, the e2e suites): saved, and
#    put back after the purge.
# 2. Records the state that matters: every file under the trees below
#    (type, owner, mode, symlink target), the checksums of the user and
#    group databases, getent of the user and group.
# 3. dpkg -i the package, checks the layout: files, conffiles, the system
#    user and group, /var/spool/postfix/luamilter luamilter:postfix 2750,
#    the unit enabled (multi-user.target.wants symlink).
# 4. Starts /usr/sbin/luamilter as the installed unit would
#    (scripts/unit-exec.py: its Environment=, /etc/default/luamilter as an
#    EnvironmentFile, ExecStart, User=, Group=, UMask=, its directories),
#    waits (10 s at most) for the socket, checks who runs it and the
#    socket's owner and mode.
# 5. Has a private Postfix deliver through it: the e2e suite's example-lua
#    case (example.lua is the packaged policy) in external-milter mode,
#    its smtpd (user postfix) reaching the socket through the packaged
#    directory's permissions.
# 6. Stops it by pid as the unit would (SIGTERM to the supervisor,
#    KillMode=mixed, TimeoutStopSec=), checks it exited 0, left no process
#    and removed its socket, removes RuntimeDirectory= as systemd does.
# 7. dpkg --purge, and compares the state with the one recorded: nothing
#    left, nothing changed.
# On any failure or signal the trap stops the daemon and purges the
# package.  Every wait is bounded.
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "deb-install: needs root (dpkg -i)" >&2; exit 1; }
  exec sudo -E "$0" "$@"
fi

log() { echo "deb-install: $*"; }
fail() { echo "deb-install: FAIL: $*" >&2; exit 1; }

VERSION=$(sed -n 's/^#define VERSION "\(.*\)"/\1/p' src/main.c)
DEB=${1:-build/deb/luamilter_${VERSION}_$(dpkg --print-architecture).deb}
case $DEB in /*) ;; *) DEB=$ROOT/$DEB ;; esac
[ -f "$DEB" ] || fail "no package at $DEB: run make deb"
PY=/usr/bin/python3
UNIT=/lib/systemd/system/luamilter.service
SOCK_DIR=/var/spool/postfix/luamilter
MARK=/var/tmp/luamilter-deb-install-check
# the trees compared before and after (dpkg's and apt's own databases
# change with every install: what dpkg keeps of luamilter is checked by
# dpkg-query instead)
TREES="/etc /lib/systemd /usr/lib/systemd /usr/sbin /usr/share/doc /usr/share/lintian /usr/share/lua /usr/share/luamilter /usr/share/man/man8 /var/lib /var/spool/postfix"
PRUNE="/var/lib/dpkg /var/lib/apt"

installed_status() { dpkg-query -W -f='${db:Status-Status}' luamilter 2>/dev/null || true; }

# dpkg with its lock: another engineer's apt may hold it for a while
dpkg_locked() { # args...: dpkg, retried while the lock is held (120 s at most)
  n=0
  while :; do
    if out=$(timeout 300 dpkg "$@" 2>&1); then printf '%s\n' "$out"; return 0; fi
    case $out in
      *"frontend lock"*|*"database is locked"*|*"lock was locked"*)
        [ $n -lt 60 ] || { printf '%s\n' "$out" >&2; return 1; }
        n=$((n + 1)); sleep 2 ;;
      *) printf '%s\n' "$out" >&2; return 1 ;;
    esac
  done
}

# pid $1 runs (a zombie, exited but not yet reaped by wait, does not)
alive() {
  [ -n "$1" ] && [ -r "/proc/$1/stat" ] || return 1
  [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" != Z ] && kill -0 "$1" 2>/dev/null
}
wait_gone() { # pid tenths
  n=0
  while alive "$1" && [ "$n" -lt "$2" ]; do sleep 0.1; n=$((n + 1)); done
  ! alive "$1"
}
# pids of processes running as the user luamilter (uid $1)
user_pids() {
  [ -n "$1" ] || return 0
  for d in /proc/[0-9]*; do
    u=$(awk '/^Uid:/ {print $2; exit}' "$d/status" 2>/dev/null) || continue
    [ "$u" = "$1" ] && echo "${d#/proc/}"
  done
  return 0
}

T=""
DAEMON_PID=""
E2E_PID=""
LM_UID=""
RUNTIME_DIRS=""
STOP_TIMEOUT=45
INSTALLED_BY_US=0
SAVED_STORE=""

restore_store() {
  [ -n "$SAVED_STORE" ] || return 0
  if [ ! -e /var/lib/luamilter ]; then cp -a "$SAVED_STORE" /var/lib/luamilter; fi
  SAVED_STORE=""
}

stop_daemon() { # SIGTERM to the supervisor (KillMode=mixed), then SIGKILL to the rest
  if alive "$DAEMON_PID"; then
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait_gone "$DAEMON_PID" "$((STOP_TIMEOUT * 10))" || { log "luamilter ($DAEMON_PID) still running after ${STOP_TIMEOUT}s, killing"; kill -KILL "$DAEMON_PID" 2>/dev/null || true; wait_gone "$DAEMON_PID" 50 || true; }
  fi
  for p in $(user_pids "$LM_UID"); do kill -KILL "$p" 2>/dev/null || true; done
  for d in $RUNTIME_DIRS; do rm -rf "$d"; done
}

cleanup() {
  rc=$?
  trap - EXIT INT TERM HUP
  if alive "$E2E_PID"; then
    kill -TERM "$E2E_PID" 2>/dev/null || true
    wait_gone "$E2E_PID" 200 || kill -KILL "$E2E_PID" 2>/dev/null || true
  fi
  if [ -n "$DAEMON_PID" ]; then stop_daemon; DAEMON_PID=""; fi
  if [ "$INSTALLED_BY_US" = 1 ] && [ -n "$(installed_status)" ] && [ "$(installed_status)" != not-installed ]; then
    log "cleanup: purging luamilter"
    dpkg_locked --purge luamilter >/dev/null || log "cleanup: dpkg --purge luamilter failed"
  fi
  case $(installed_status) in
    installed|config-files) ;;   # the next run purges it (the marker says so)
    *) restore_store; [ "$INSTALLED_BY_US" = 1 ] && rm -rf "$MARK" ;;
  esac
  [ -n "$T" ] && rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# one run at a time on this machine (another worktree's, a CI run's): the
# package, its user and the marker are machine-wide
LOCK=/run/lock/luamilter-deb-install-check.lock
exec 9>>"$LOCK"
flock -w 900 9 || fail "another run of this test held $LOCK for 900 s"

# --- 1. the machine must hold nothing of luamilter's -------------------------
[ -d /run/systemd/system ] && fail "systemd runs here: postinst would start luamilter.service itself; this test is for a machine without a running systemd"
# Postfix and swaks before the package (the socket directory's group is
# postfix only if Postfix is there first), as scripts/e2e-postfix.sh
# installs them: "No configuration", no system instance of its own
missing=""
for p in postfix swaks python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  timeout 300 apt-get update -qq || true
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
for c in setpriv postfix swaks "$PY"; do command -v "$c" >/dev/null || fail "$c is missing"; done
getent group postfix >/dev/null || fail "no group postfix: install postfix first (the socket directory's group comes from it)"

status=$(installed_status)
if [ -n "$status" ] && [ "$status" != not-installed ]; then
  [ -f "$MARK/installed" ] || fail "a luamilter package ($status, $(dpkg-query -W -f='${Version}' luamilter)) is on this machine and this script did not install it: not touching it"
  log "purging the luamilter package an earlier run left ($status)"
  if [ -f "$MARK/daemon.pid" ]; then
    p=$(cat "$MARK/daemon.pid")
    if alive "$p" && [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = /usr/sbin/luamilter ]; then
      kill -KILL "$p" 2>/dev/null || true
      wait_gone "$p" 50 || true
    fi
  fi
  LM_UID=$(id -u luamilter 2>/dev/null || true)
  for p in $(user_pids "$LM_UID"); do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf /run/luamilter
  dpkg_locked --purge luamilter >/dev/null || fail "could not purge the leftover package"
  LM_UID=""
fi
# the temp dir of a killed run, and the store it saved if it did not put
# it back
if [ -f "$MARK/tmpdir" ]; then
  case $(cat "$MARK/tmpdir") in /tmp/luamilter-debinst.*) rm -rf "$(cat "$MARK/tmpdir")" ;; esac
fi
if [ -d "$MARK/store-saved" ] && [ ! -e /var/lib/luamilter ]; then
  cp -a "$MARK/store-saved" /var/lib/luamilter
fi
rm -rf "$MARK"
for p in /etc/luamilter /etc/default/luamilter /run/luamilter "$SOCK_DIR" "$UNIT" /usr/sbin/luamilter; do
  if [ -e "$p" ] || [ -L "$p" ]; then fail "$p exists without the package: not touching it"; fi
done
if getent passwd luamilter >/dev/null; then fail "a user luamilter exists without the package (purge would remove it)"; fi
if getent group luamilter >/dev/null; then fail "a group luamilter exists without the package (purge would remove it)"; fi

T=$(mktemp -d /tmp/luamilter-debinst.XXXXXX)
chmod 755 "$T"

# /var/lib/luamilter without the package: the default store of a luamilter
# run as root without --store (README "Shared state: milter.store"), which
# the daemon specs and the e2e suites make and other runs may be using
# right now.  The package owns that path (the unit's StateDirectory=,
# removed by purge): it is saved here and put back after the purge, unless
# a root daemon has made it again meanwhile.
if [ -e /var/lib/luamilter ] || [ -L /var/lib/luamilter ]; then
  other=$(find /var/lib/luamilter -mindepth 1 ! -name store.mdb ! -name store.mdb-lock | head -3)
  if [ -L /var/lib/luamilter ] || [ "$(stat -c %U:%G /var/lib/luamilter)" != root:root ] || [ -n "$other" ]; then
    fail "/var/lib/luamilter exists without the package and is not a root daemon's default store: not touching it"
  fi
  mkdir -p "$MARK"
  cp -a /var/lib/luamilter "$MARK/store-saved"
  SAVED_STORE=$MARK/store-saved
  log "saved /var/lib/luamilter (the default store of root-run luamilter daemons: put back after the purge)"
fi

# --- 2. the state before -------------------------------------------------------
snapshot() { # file
  {
    # shellcheck disable=SC2086,SC2046  # lists of paths, split on purpose
    find $TREES -xdev \( $(for p in $PRUNE; do printf -- '-path %s -o ' "$p"; done) -false \) -prune \
      -o -printf '%y %u:%g %m %p -> %l\n' 2>/dev/null | sort
    sha256sum /etc/passwd /etc/group /etc/shadow /etc/gshadow
    echo "getent passwd luamilter: $(getent passwd luamilter || true)"
    echo "getent group luamilter: $(getent group luamilter || true)"
    ls /var/lib/dpkg/info/luamilter.* 2>/dev/null || true
  } > "$1"
}
snapshot "$T/before"
log "recorded $(wc -l < "$T/before") entries of $TREES"

# --- 3. install ----------------------------------------------------------------
mkdir -p "$MARK"
echo "$T" > "$MARK/tmpdir"
echo "$DEB" > "$MARK/installed"
INSTALLED_BY_US=1
t0=$(date +%s)
log "dpkg -i $DEB"
dpkg_locked -i "$DEB" > "$T/dpkg-i.log" || { cat "$T/dpkg-i.log"; fail "dpkg -i failed"; }
[ "$(installed_status)" = installed ] || fail "after dpkg -i: luamilter is $(installed_status)"
[ "$(dpkg-query -W -f='${Version}' luamilter)" = "$VERSION" ] || fail "installed version is not $VERSION"

for f in /usr/sbin/luamilter /etc/luamilter/policy.lua /etc/default/luamilter "$UNIT" \
         /usr/share/man/man8/luamilter.8.gz /usr/share/lua/5.1/milter/test.lua \
         /usr/share/luamilter/example.lua; do
  [ -f "$f" ] || fail "$f was not installed"
  dpkg -S "$f" >/dev/null 2>&1 || fail "$f does not belong to the package"
done
[ -x /usr/sbin/luamilter ] || fail "/usr/sbin/luamilter is not executable"
cmp -s example.lua /etc/luamilter/policy.lua || fail "/etc/luamilter/policy.lua is not example.lua"
cmp -s scripts/debian/luamilter.default.deb /etc/default/luamilter || fail "/etc/default/luamilter is not scripts/debian/luamilter.default.deb"
# both conffiles registered, with the checksums of the files on disk
# (a third field would be a flag: obsolete, remove-on-upgrade)
conff=$(dpkg-query -W -f='${Conffiles}\n' luamilter | awk 'NF {print $1, $2, $3}' | sed 's/ $//')
for f in /etc/default/luamilter /etc/luamilter/policy.lua; do
  echo "$conff" | grep -qx "$f $(md5sum < "$f" | cut -d' ' -f1)" || fail "$f is not a conffile with its installed checksum: $conff"
done
[ "$(echo "$conff" | wc -l)" = 2 ] || fail "conffiles: $conff"

# the system user and group
pw=$(getent passwd luamilter) || fail "no user luamilter after install"
LM_UID=$(echo "$pw" | cut -d: -f3)
lm_gid=$(echo "$pw" | cut -d: -f4)
[ "$(getent group luamilter | cut -d: -f3)" = "$lm_gid" ] || fail "user luamilter's primary group is not luamilter: $pw"
# shellcheck disable=SC1091
first=$(. /etc/adduser.conf 2>/dev/null; echo "${FIRST_SYSTEM_UID:-100}")
# shellcheck disable=SC1091
lastu=$(. /etc/adduser.conf 2>/dev/null; echo "${LAST_SYSTEM_UID:-999}")
if [ "$LM_UID" -lt "$first" ] || [ "$LM_UID" -gt "$lastu" ]; then fail "uid $LM_UID is not a system uid ($first-$lastu)"; fi
[ "$(echo "$pw" | cut -d: -f6,7)" = "/var/lib/luamilter:/usr/sbin/nologin" ] || fail "home and shell: $pw"

# the socket directory
[ "$(stat -c '%U:%G %a' "$SOCK_DIR")" = "luamilter:postfix 2750" ] || fail "$SOCK_DIR is $(stat -c '%U:%G %a' "$SOCK_DIR"), not luamilter:postfix 2750"

# the unit enabled: what systemctl enable makes (dh_installsystemd's
# deb-systemd-helper enable)
wants=/etc/systemd/system/multi-user.target.wants/luamilter.service
if [ ! -L "$wants" ] || [ "$(readlink "$wants")" != "$UNIT" ]; then fail "$wants is not a symlink to $UNIT"; fi
[ "$(systemctl is-enabled luamilter.service 2>&1)" = enabled ] || fail "systemctl is-enabled luamilter.service: $(systemctl is-enabled luamilter.service 2>&1)"
[ -e /var/lib/systemd/deb-systemd-helper-enabled/luamilter.service.dsh-also ] || fail "deb-systemd-helper has no record of enabling luamilter.service"
log "installed: files, conffiles, user $LM_UID:$lm_gid, $SOCK_DIR luamilter:postfix 2750, unit enabled"

# --- 4. start it as the unit would --------------------------------------------
# shellcheck disable=SC2016  # the unit's text, not expanded here
grep -qx 'ExecStart=/usr/sbin/luamilter $LUAMILTER_OPTIONS ${LUAMILTER_SCRIPT}' "$UNIT" || \
  fail "the unit's ExecStart changed: $(grep '^ExecStart=' "$UNIT") (check scripts/unit-exec.py still replicates it)"
grep -qx 'EnvironmentFile=-/etc/default/luamilter' "$UNIT" || fail "the unit does not read /etc/default/luamilter"
grep -qx 'KillMode=mixed' "$UNIT" || fail "the unit's KillMode changed: teach stop_daemon"
STOP_TIMEOUT=$("$PY" scripts/unit-exec.py get "$UNIT" TimeoutStopSec)
RUNTIME_DIRS=$(for d in $("$PY" scripts/unit-exec.py get "$UNIT" RuntimeDirectory); do echo "/run/$d"; done)
listen=$(sed -n 's/^LUAMILTER_OPTIONS=.*--listen unix:\([^ ]*\).*/\1/p' /etc/default/luamilter)
[ "$listen" = "$SOCK_DIR/luamilter.sock" ] || fail "/etc/default/luamilter does not listen on $SOCK_DIR/luamilter.sock"
: > "$T/daemon.log"
chmod 644 "$T/daemon.log"
"$PY" scripts/unit-exec.py exec "$UNIT" >>"$T/daemon.log" 2>&1 9>&- &
DAEMON_PID=$!
echo "$DAEMON_PID" > "$MARK/daemon.pid"
n=0
until [ -S "$listen" ] && grep -q "serving .*(generation 1\b" "$T/daemon.log"; do
  alive "$DAEMON_PID" || { cat "$T/daemon.log"; fail "luamilter exited at start"; }
  [ $n -lt 100 ] || { cat "$T/daemon.log"; fail "luamilter not serving on $listen after 10 s"; }
  n=$((n + 1)); sleep 0.1
done
log "started as the unit would (pid $DAEMON_PID): $(sed -n 's|^unit-exec: /|/|p' "$T/daemon.log")"
sed -n 's|^unit-exec: \([^/]\)|deb-install: note: \1|p' "$T/daemon.log"
[ "$(readlink "/proc/$DAEMON_PID/exe")" = /usr/sbin/luamilter ] || fail "pid $DAEMON_PID is not /usr/sbin/luamilter"
procs=$(user_pids "$LM_UID" | tr '\n' ' ')
[ "$(echo "$procs" | wc -w)" -ge 2 ] || fail "expected the supervisor and its workers as user luamilter, got: $procs"
for p in $procs; do
  ids=$(awk '/^Uid:/ {u=$2 $3 $4 $5} /^Gid:/ {g=$2 $3 $4 $5} END {print u, g}' "/proc/$p/status")
  [ "$ids" = "$LM_UID$LM_UID$LM_UID$LM_UID $lm_gid$lm_gid$lm_gid$lm_gid" ] || fail "process $p runs as uid/gid $ids, not luamilter"
done
[ "$(stat -c '%U:%G %a' "$listen")" = "luamilter:postfix 660" ] || fail "the socket is $(stat -c '%U:%G %a' "$listen"), not luamilter:postfix 660"
[ "$(stat -c '%U:%G %a' /var/lib/luamilter)" = "luamilter:luamilter 750" ] || fail "/var/lib/luamilter is $(stat -c '%U:%G %a' /var/lib/luamilter)"
[ -f /var/lib/luamilter/store.mdb ] || fail "no store at /var/lib/luamilter/store.mdb"

# --- 5. Postfix delivers through it -------------------------------------------
log "e2e: a private Postfix delivering through unix:$listen"
# in the background so that INT/TERM reach this shell at once (the trap
# stops the suite, which stops its Postfix)
E2E_TRANSPORTS=unix E2E_EXTERNAL_MILTER="unix:$listen" E2E_EXTERNAL_LOG="$T/daemon.log" \
  E2E_EXTERNAL_PID="$DAEMON_PID" E2E_EXTERNAL_POLICY=/etc/luamilter/policy.lua \
  timeout -s TERM 300 scripts/e2e-postfix.sh 'example-lua$' 9>&- &
E2E_PID=$!
set +e
wait "$E2E_PID"
e2e_rc=$?
set -e
E2E_PID=""
[ "$e2e_rc" = 0 ] || fail "the e2e case through the installed luamilter failed (status $e2e_rc)"
alive "$DAEMON_PID" || fail "luamilter died during the e2e case"

# --- 6. stop it as the unit would ---------------------------------------------
kill -TERM "$DAEMON_PID"
wait_gone "$DAEMON_PID" "$((STOP_TIMEOUT * 10))" || fail "luamilter still running ${STOP_TIMEOUT}s (TimeoutStopSec) after SIGTERM"
set +e
wait "$DAEMON_PID"
st=$?
set -e
[ "$st" = 0 ] || { cat "$T/daemon.log"; fail "luamilter exited with status $st after SIGTERM"; }
left=$(user_pids "$LM_UID" | tr '\n' ' ')
[ -z "$left" ] || fail "processes of user luamilter outlived the supervisor (KillMode=mixed would SIGKILL them): $left"
[ ! -e "$listen" ] || fail "the supervisor left its socket $listen"
if grep -E '^\S+ (WARN|ERROR) ' "$T/daemon.log"; then fail "luamilter logged warnings or errors"; fi
DAEMON_PID=""
rm -f "$MARK/daemon.pid"
for d in $RUNTIME_DIRS; do rm -rf "$d"; done
log "stopped: exit status 0, no process left, socket removed"

# --- 7. purge and compare ------------------------------------------------------
dpkg_locked --purge luamilter > "$T/dpkg-purge.log" || { cat "$T/dpkg-purge.log"; fail "dpkg --purge failed"; }
if grep -i "warning" "$T/dpkg-purge.log"; then fail "dpkg --purge warned"; fi
[ -z "$(installed_status)" ] || [ "$(installed_status)" = not-installed ] || fail "after purge: luamilter is $(installed_status)"
if [ -e /run/luamilter ]; then fail "/run/luamilter is left"; fi
# the store: gone, or made again by a root daemon of another run (root's,
# while what purge would have left belongs to the luamilter uid)
if [ -e /var/lib/luamilter ] && [ "$(stat -c %U /var/lib/luamilter)" != root ]; then
  fail "purge left /var/lib/luamilter ($(stat -c %U:%G /var/lib/luamilter))"
fi
restore_store
rm -rf "$MARK"
snapshot "$T/after"
if ! diff -u "$T/before" "$T/after" > "$T/diff"; then
  cat "$T/diff"
  fail "the machine after dpkg --purge differs from before dpkg -i (- before, + after)"
fi
log "PASS: installed, served Postfix's mail as the unit would, purged without a trace ($(($(date +%s) - t0))s)"
