#!/bin/sh
# One run of daemon sessions under valgrind (supervisor and worker): any
# memory error or definite leak fails. Used by `make test`.
set -u
cd "$(dirname "$0")/.."
bin=${1:-build/luamilter}
dir=$(mktemp -d /tmp/luamilter-vg.XXXXXX)
pid="" silent=""
trap 'kill -KILL $pid $silent 2>/dev/null; rm -rf "$dir"' EXIT
# A TCP port that accepts (in the kernel's backlog) and never answers, and a
# UDP port that never answers: lookups that wait until they are abandoned.
python3 -c '
import socket, sys, time
t = socket.socket(); t.bind(("127.0.0.1", 0)); t.listen(4096)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
open(sys.argv[1] + ".tmp", "w").write("%d %d\n" % (t.getsockname()[1], u.getsockname()[1]))
import os; os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(900)' "$dir/silent" &
silent=$!
i=0
while [ ! -s "$dir/silent" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
read -r tcp_port udp_port <"$dir/silent" || { echo "valgrind-check: no silent ports"; exit 1; }
export VG_TCP_PORT=$tcp_port
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
  -- lookups that never get an answer: the MTA gives up (ABORT, hang-up)
  abort = function(ctx) ctx.conn.aborted = true end,
  body = function(ctx, chunk) ctx.msg.bytes = (ctx.msg.bytes or 0) + #chunk end,
  eom = function(ctx)
    local wait = ctx.sender:match("^<wait%-(%a+)@")
    local port = tonumber(os.getenv("VG_TCP_PORT"))
    if wait == "sleep" then milter.sleep(60)
    elseif wait == "tcp" then
      local s = milter.tcp.connect("127.0.0.1", port, 60)
      if s then s:send("hello\r\n", 60); s:receive("*l", 60) end
    elseif wait == "dns" then milter.dns.query("never.answered.test", "TXT", 60)
    elseif wait == "redis" then
      milter.redis.new("redis://127.0.0.1:" .. port .. "/0"):call("GET", "k", 60)
    elseif wait == "http" then
      milter.http.request{ url = "http://127.0.0.1:" .. port .. "/", timeout = 60 }
    end
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
  --log-file="$dir/vg.%p.log" "$bin" --workers 1 --script-timeout 120 --dns "127.0.0.1:$udp_port" \
  --store "lmdb:$dir/store.mdb" -l "unix:$dir/s.sock" "$dir/policy.lua" \
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
