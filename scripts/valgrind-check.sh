#!/bin/sh
# One run of daemon sessions under valgrind (supervisor and worker): any
# memory error or definite leak fails. Used by `make test`.
set -u
cd "$(dirname "$0")/.."
bin=${1:-build/luamilter}
dir=$(mktemp -d /tmp/luamilter-vg.XXXXXX)
trap 'kill -KILL "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
cat >"$dir/policy.lua" <<'LUA'
local milter = require "milter"
return {
  envfrom = function(ctx, sender)
    if sender:find("raise") then error("raised on purpose") end
    if sender:find("badverdict") then return { action = "accept", nonsense = 1 } end
  end,
  envrcpt = function(ctx, rcpt)
    if rcpt:find("bad") then return milter.reject{ xcode = "5.1.1", reason = { "no such", "user" } } end
  end,
  header = function(ctx, name, value) ctx.msg.n = (ctx.msg.n or 0) + 1 end,
  body = function(ctx, chunk) ctx.msg.bytes = (ctx.msg.bytes or 0) + #chunk end,
  eom = function(ctx)
    return milter.accept{
      add_header = { { "X-Count", tostring(ctx.msg.n) } },
      insert_header = { { 0, "X-Top", "1" } },
      change_header = { { "Subject", 1, "[x] " .. (ctx:header("Subject") or "") } },
      delete_header = { { "X-Dup", 2 } },
      add_rcpt = { "<audit@example.org>" },
      replace_body = ("new body\r\n"):rep(10000),
    }
  end,
}
LUA
valgrind -q --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite \
  --log-file="$dir/vg.%p.log" "$bin" --workers 1 -l "unix:$dir/s.sock" "$dir/policy.lua" \
  2>"$dir/daemon.log" &
pid=$!
luajit scripts/valgrind-sessions.lua "unix:$dir/s.sock"
drive=$?
kill -TERM "$pid"
i=0
while kill -0 "$pid" 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
wait "$pid"
status=$?
found=0
for f in "$dir"/vg.*.log; do
  if [ -s "$f" ]; then echo "valgrind report $f:"; cat "$f"; found=1; fi
done
if [ $drive -ne 0 ] || [ $status -ne 0 ] || [ $found -ne 0 ]; then
  echo "valgrind-check: FAILED (driver $drive, daemon exit $status, reports $found)"
  cat "$dir/daemon.log"
  exit 1
fi
echo "valgrind-check: no errors, no definite leaks ($(ls "$dir"/vg.*.log | wc -l) processes)"
