-- Drives a set of daemon sessions for the valgrind run (scripts/valgrind-check.sh):
-- normal mail with every modification, refused recipients, a handler error,
-- a bad verdict, QUIT_NC reuse, and malformed frames. Exits non-zero if a
-- reply is wrong. usage: luajit scripts/valgrind-sessions.lua unix:/path
package.path = "./?.lua;" .. package.path
local mc = require "spec.support.milter_client"
local spec = arg[1]
assert(mc.wait_socket(spec, 60), "daemon did not come up")

local function client()
  return assert(mc.connect(spec, { timeout = 60 }))
end

local function check(cond, what)
  if not cond then
    io.stderr:write("valgrind-sessions: " .. what .. "\n")
    os.exit(1)
  end
end

for i = 1, 10 do
  local c = client()
  local r = c:session{ rcpts = { "<a@example.org>", "<bad@example.org>" },
    headers = { { "Subject", "s" .. i }, { "X-Dup", "1" }, { "X-Dup", "2" } },
    body = ("body line\r\n"):rep(50 * i) }
  check(r.eom and r.eom.cmd == "a", "normal session " .. i .. ": " .. tostring(r.error))
  check(r.rcpts[2] and r.rcpts[2].cmd == "y", "refused recipient")
  c:quit()
  c:close()
end

local c = client()
local r = c:session{ mail = "<raise@example.org>", rcpts = { "<a@example.org>" } }
check(r.mail and r.mail.cmd == "y", "handler error gives a tempfail")
c:quit_nc()
r = c:session{ mail = "<badverdict@example.org>", rcpts = { "<a@example.org>" } }
check(r.mail and r.mail.cmd == "y", "bad verdict gives a tempfail")
c:quit_nc()
r = c:session{ rcpts = { "<a@example.org>" }, body = "x\r\n" }
check(r.eom and r.eom.cmd == "a", "session after QUIT_NC")
c:quit()
c:close()

for _, junk in ipairs({ "GET / HTTP/1.1\r\nHost: x\r\n\r\n", "\22\3\1\0\200\1\0\0\124\3\3",
                        "\0\0\0\0A", "\255\255\255\255B", "\0\0\0\5Habcd", "\0\0\0\1Z" }) do
  local j = client()
  j:send_raw(junk)
  local f, err = j:read_frame(5)
  check(f == nil and err, "junk must close the connection")
  j:close()
end
-- 1000 sessions whose eom handler waits on a lookup that never answers
-- (sleep, TCP, DNS, Redis, HTTP), abandoned by the MTA: an ABORT then
-- QUIT, or a hang-up. Nothing may leak, nothing be resumed.
local kinds = { "sleep", "tcp", "dns", "redis", "http" }
for i = 1, 1000 do
  local w = client()
  check(w:optneg(mc.OFFER.postfix), "optneg")
  w:connect_ev("w.example.org", "4", 4000, "192.0.2.9", {})
  w:helo("w.example.org", {})
  w:mail("<wait-" .. kinds[i % #kinds + 1] .. "@example.org>", {})
  w:rcpt("<a@example.org>", {})
  w:send("E", "")
  if i % 2 == 0 then
    w:abort()
    w:quit()
  end
  w:close()
end
-- the worker still serves, promptly
local last = client()
r = last:session{ rcpts = { "<a@example.org>" }, body = "x\r\n" }
check(r.eom and r.eom.cmd == "a", "a session after 1000 abandoned waits: " .. tostring(r.error))
last:quit()
last:close()
print("valgrind-sessions: ok")
