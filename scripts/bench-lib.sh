# shellcheck shell=bash
# scripts/bench-lib.sh: what scripts/bench and scripts/bench-callgrind
# share for their servers (sourced; needs $BIN, where benchgen is).

# stops pid: SIGTERM, up to 5 s, then SIGKILL (nothing when pid is empty)
stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

# waits until SPEC answers OPTNEG, while pid lives: up to TRIES tries
# (100) 0.05 s apart, each waiting up to REPLY seconds (2); prints
# "version=.. actions=.. protocol=..", or returns 1
probe() { # spec pid [tries [reply]]
  local out
  for _ in $(seq "${3:-100}"); do
    kill -0 "$2" 2>/dev/null || return 1
    if out=$("$BIN/benchgen" -s "$1" --probe -T "${4:-2}" 2>/dev/null); then
      echo "$out"; return 0
    fi
    sleep 0.05
  done
  return 1
}
