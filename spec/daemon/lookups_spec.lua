-- luacheck: std +busted
-- Lookups from handlers: milter.sleep, milter.tcp and milter.dns against
-- real servers on loopback (dnsmasq for DNS, the tests' own responders for
-- held-back answers and failures). The handler waits; the worker does not.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local S = require "spec.support.servers"
local socket = require "socket"
local now = require "spec.support.clock" -- monotonic, for waits

local function show(r)
  if type(r) ~= "table" then return tostring(r) end
  return r.cmd .. (r.text and (" " .. r.text) or "")
end

describe("lookups", function()
  local d, tcp, dns, fail
  setup(function()
    tcp = S.tcp()
    dns = S.dnsmasq()
    fail = S.dns_failures()
  end)
  teardown(function()
    if tcp then tcp:stop() end
    if dns then dns:stop() end
    if fail then fail:stop() end
  end)
  after_each(function()
    if d then d:stop(); d = nil end
  end)

  local function start(body, args)
    local a = { "--dns", dns.server }
    for _, x in ipairs(args or {}) do a[#a + 1] = x end
    d = assert(U.start(U.script("local TCP = " .. tcp.port .. "\n" ..
      "local FAILDNS = " .. fail.port .. "\n" .. body), { args = a }))
    return d
  end

  it("a waiting handler does not block the worker: B's whole session completes while A waits", function()
    start [[
function H.envfrom(ctx, sender)
  if sender == "<a@example.org>" then
    local s = assert(milter.tcp.connect("127.0.0.1", TCP))
    assert(s:send("HOLD k1\r\n"))
    local line, err = s:receive("*l")
    seen(ctx, "a", { line, err })
    return milter.reject{ reason = "held: " .. tostring(line) }
  end
end
function H.eom(ctx) return milter.accept{ add_header = { { "X-B", "served" } } } end
return H
]]
    local a = U.client(d)
    U.open(a)
    assert(a:send("M", "<a@example.org>\0"))
    -- A's handler now waits on the TCP server, which answers only when told
    local b = U.client(d)
    local res = b:session { mail = "<b@example.org>" }
    b:close()
    assert.are.equal("a", res.eom and res.eom.cmd, tostring(res.error))
    assert.are.equal("X-B", res.eom.mods[1].name)
    assert.are.same({}, U.seen(d, "a"), "A resumed before its answer")
    assert.are.equal("ok", tcp:ask("RELEASE k1"))
    local r = assert(a:read_reply(5))
    assert.are.equal("y", r.cmd)
    assert.are.equal("550 5.7.1 held: released k1", r.text)
    assert.are.same({ { "released k1" } }, U.seen(d, "a"))
    a:close()
  end)

  it("milter.sleep waits and returns true; every stage may wait", function()
    start [[
local function nap(ctx, ev)
  local ok = milter.sleep(0.01)
  seen(ctx, ev, ok)
end
for _, ev in ipairs{ "connect", "helo", "envfrom", "envrcpt", "data", "header", "eoh",
                     "body", "abort", "close" } do
  H[ev] = function(ctx) nap(ctx, ev) end
end
function H.eom(ctx)
  nap(ctx, "eom")
  return milter.accept{ add_header = { { "X-Slept", "yes" } } }
end
return H
]]
    local c = U.client(d)
    local res = c:session { rcpts = { "<r@example.org>" } }
    assert.are.equal("a", res.eom and res.eom.cmd, tostring(res.error))
    assert.are.equal("X-Slept", res.eom.mods[1].name)
    -- a second message, aborted: abort waits too
    assert(c:mail("<x@example.org>", {}))
    assert(c:abort())
    c:quit()
    c:close()
    U.wait_seen(d, "close", 1)
    for _, ev in ipairs { "connect", "helo", "envfrom", "envrcpt", "data", "header", "eoh",
                          "body", "eom", "abort", "close" } do
      assert.is_true(#U.seen(d, ev) >= 1, ev .. " did not run")
      assert.are.equal(true, U.seen(d, ev)[1], ev)
    end
  end)

  -- libev's clock is the loop's last wake-up: a timer started from it
  -- after 30 ms of handler work fired 30 ms early (sleep(0.05) took 0.02)
  it("milter.sleep waits its whole time, however long the handler ran before", function()
    start [[
local ffi = require "ffi"
pcall(ffi.cdef, "struct lm_ts { long s, ns; }; int clock_gettime(int, struct lm_ts *);")
local function now() -- CLOCK_MONOTONIC
  local t = ffi.new("struct lm_ts")
  ffi.C.clock_gettime(1, t)
  return tonumber(t.s) + tonumber(t.ns) / 1e9
end
function H.envfrom(ctx)
  local t = now()
  while now() - t < 0.03 do end -- 30 ms of work first
  local t0 = now()
  milter.sleep(0.05)
  seen(ctx, "slept", now() - t0)
end
return H
]]
    local c = U.client(d)
    local res = c:session {}
    c:close()
    assert.is_nil(res.error)
    local slept = U.seen(d, "slept")[1]
    assert.is_true(slept >= 0.0495, "milter.sleep(0.05) slept " .. tostring(slept))
  end)

  it("dns.query: A, AAAA, MX, TXT, PTR (v4 and v6), CNAME against dnsmasq; no name is an empty list", function()
    start [[
function H.envfrom(ctx)
  local q = milter.dns.query
  seen(ctx, "a", q("mail.example.test", "A"))
  seen(ctx, "aaaa", q("mail.example.test", "AAAA"))
  seen(ctx, "mx", q("example.test", "MX"))
  seen(ctx, "txt", q("example.test", "TXT"))
  seen(ctx, "multi", q("multi.example.test", "TXT"))
  seen(ctx, "ptr", q("192.0.2.7", "PTR"))
  seen(ctx, "ptr6", q("2001:db8::7", "PTR"))
  seen(ctx, "ptrname", q("7.2.0.192.in-addr.arpa", "ptr"))
  seen(ctx, "cname", q("alias.example.test", "CNAME"))
  seen(ctx, "nx", q("nope.example.test", "A"))
  seen(ctx, "nodata", q("mail.example.test", "MX"))
end
return H
]]
    local c = U.client(d)
    local res = c:session {}
    c:close()
    assert.are.equal("c", res.mail.cmd, show(res.mail))
    assert.are.same({ { "192.0.2.7" } }, U.seen(d, "a"))
    assert.are.same({ { "2001:db8::7" } }, U.seen(d, "aaaa"))
    local mx = U.seen(d, "mx")[1]
    table.sort(mx, function(x, y) return x.pref < y.pref end)
    assert.are.same({ { host = "mx1.example.test", pref = 10 }, { host = "mx2.example.test", pref = 20 } }, mx)
    assert.are.same({ { "v=spf1 -all" } }, U.seen(d, "txt"))
    assert.are.same({ { "part one part two" } }, U.seen(d, "multi"))
    assert.are.same({ { "mail.example.test" } }, U.seen(d, "ptr"))
    assert.are.same({ { "mail6.example.test" } }, U.seen(d, "ptr6"))
    assert.are.same({ { "mail.example.test" } }, U.seen(d, "ptrname"))
    assert.are.same({ { "mail.example.test" } }, U.seen(d, "cname"))
    assert.are.same({ {} }, U.seen(d, "nx"))
    assert.are.same({ {} }, U.seen(d, "nodata"))
  end)

  it("dns.rbl: the A answers when listed, false when not; NS from the responder", function()
    start [[
function H.envfrom(ctx)
  seen(ctx, "listed", milter.dns.rbl("192.0.2.66", "zen.example.test"))
  seen(ctx, "clean", milter.dns.rbl("192.0.2.67", "zen.example.test"))
end
return H
]]
    local c = U.client(d)
    c:session {}
    c:close()
    assert.are.same({ { "127.0.0.2" } }, U.seen(d, "listed"))
    assert.are.same({ false }, U.seen(d, "clean"))
  end)

  it("DNS failures are nil, err: servfail, refused, timeout (fail-open branch runs, the worker stays)", function()
    d = assert(U.start(U.script [[
function H.envfrom(ctx)
  seen(ctx, "servfail", { milter.dns.query("servfail.example.test", "A") })
  seen(ctx, "refused", { milter.dns.query("refused.example.test", "A") })
  local r, err = milter.dns.query("silent.example.test", "A", { timeout = 0.3 })
  seen(ctx, "silent", { r, err })
  if not r then return nil end -- fail open
  return milter.reject{}
end
function H.eom(ctx) seen(ctx, "ns", milter.dns.query("ns.example.test", "NS")) end
return H
]], { args = { "--dns", "127.0.0.1:" .. fail.port } }))
    local c = U.client(d)
    local res = c:session {}
    c:close()
    assert.are.equal("c", res.mail.cmd, show(res.mail))
    assert.are.same({ { nil, "servfail" } }, U.seen(d, "servfail"))
    assert.are.same({ { nil, "refused" } }, U.seen(d, "refused"))
    assert.are.same({ { nil, "timeout" } }, U.seen(d, "silent"))
    assert.are.same({ { "ns1.example.test", "ns2.example.test" } }, U.seen(d, "ns"))
    assert.is_true(d:alive())
    local r2 = U.normal_session(d)
    assert.are.equal("c", r2.eom and r2.eom.cmd)
  end)

  it("tcp: send, receive a line, N bytes, everything; failures are nil, err", function()
    start [[
function H.envfrom(ctx)
  local s = assert(milter.tcp.connect("127.0.0.1", TCP, { timeout = 2 }))
  seen(ctx, "send", s:send("ECHO hello\r\n"))
  seen(ctx, "line", s:receive("*l"))
  s:send("BYTES 5\r\n")
  seen(ctx, "bytes", s:receive(5))
  s:send("ALL the end\r\n")
  seen(ctx, "all", s:receive("*a"))
  seen(ctx, "after", { s:receive("*l") })
  s:close()
  local n = milter.tcp.connect("127.0.0.1", TCP)
  n:send("NEVER\r\n")
  seen(ctx, "never", { n:receive("*l", 0.2) })
  local cl = milter.tcp.connect("127.0.0.1", TCP)
  cl:send("CLOSE\r\n")
  seen(ctx, "closed", { cl:receive("*l") })
  seen(ctx, "refused", { milter.tcp.connect("127.0.0.1", 1) })
end
return H
]]
    local c = U.client(d)
    c:session {}
    c:close()
    assert.are.same({ 12 }, U.seen(d, "send"))
    assert.are.same({ "hello" }, U.seen(d, "line"))
    assert.are.same({ "xxxxx" }, U.seen(d, "bytes"))
    assert.are.same({ "the end" }, U.seen(d, "all"))
    assert.are.same({ { nil, "closed" } }, U.seen(d, "after"))
    assert.are.same({ { nil, "timeout" } }, U.seen(d, "never"))
    assert.are.same({ { nil, "closed" } }, U.seen(d, "closed"))
    assert.are.same({ { nil, "connection refused" } }, U.seen(d, "refused"))
  end)

  it("a socket left open is closed when the handler returns", function()
    start [[
function H.envfrom(ctx)
  local s = milter.tcp.connect("127.0.0.1", TCP)
  s:send("ECHO x\r\n")
  s:receive("*l")
  ctx.conn.sock = s -- kept, but closed all the same
end
function H.eom(ctx)
  local ok, err = pcall(ctx.conn.sock.send, ctx.conn.sock, "x")
  seen(ctx, "reuse", { ok, err and err:match("socket is closed") })
end
return H
]]
    local before = tonumber(tcp:ask("CLOSED"))
    local c = U.client(d)
    c:session {}
    c:close()
    assert.are.same({ { false, "socket is closed" } }, U.seen(d, "reuse"))
    local deadline = now() + 5
    local after = before
    while after == before and now() < deadline do
      socket.sleep(0.02)
      after = tonumber(tcp:ask("CLOSED"))
    end
    assert.is_true(after > before, "the server never saw the close")
  end)

  it("luamilter test performs the same real lookups", function()
    local dir = os.tmpname()
    os.remove(dir)
    local f = assert(io.open(dir .. ".lua", "w"))
    f:write(([[
local milter = require "milter"
return {
  connect = function(ctx, host, addr)
    local hit = milter.dns.rbl(addr.address, "zen.example.test")
    if hit then return milter.reject{ reason = "listed: " .. hit[1] } end
  end,
  eom = function(ctx)
    local s = milter.tcp.connect("127.0.0.1", %d)
    s:send("ECHO pong\r\n")
    local a = milter.dns.query("mail.example.test", "A")
    return milter.accept{ add_header = { { "X-Lookups", s:receive("*l") .. " " .. a[1] } } }
  end,
}
]]):format(tcp.port))
    f:close()
    local m = assert(io.open(dir .. ".eml", "w"))
    m:write("From: a@example.org\r\nTo: b@example.org\r\nSubject: s\r\n\r\nbody\r\n")
    m:close()
    local ok = U.D.run({ "--dns", dns.server, "test", dir .. ".lua", dir .. ".eml", "--client", "192.0.2.9" })
    local listed = U.D.run({ "--dns", dns.server, "test", dir .. ".lua", dir .. ".eml", "--client", "192.0.2.66" })
    os.remove(dir .. ".lua")
    os.remove(dir .. ".eml")
    assert.are.equal(0, ok.status, ok.stderr)
    assert.is_truthy(ok.stdout:find("X-Lookups: pong 192.0.2.7", 1, true), ok.stdout)
    assert.are.equal(1, listed.status, listed.stderr)
    assert.is_truthy(listed.stdout:find("listed: 127.0.0.2", 1, true), listed.stdout)
  end)

  it("misuse raises: at the top level, a bad type, an unknown record type", function()
    local r = U.D.run({ "check", "/dev/stdin" })
    assert.is_not_nil(r)
    d = nil
    local top = start [[
function H.envfrom(ctx)
  seen(ctx, "type", { pcall(milter.dns.query, "x", "SRV") })
  seen(ctx, "arg", { pcall(milter.tcp.connect, {}, 1) })
  seen(ctx, "sleep", { pcall(milter.sleep, -1) })
end
return H
]]
    local c = U.client(top)
    c:session {}
    c:close()
    assert.is_false(U.seen(d, "type")[1][1])
    assert.is_truthy(U.seen(d, "type")[1][2]:find("record type", 1, true))
    assert.is_false(U.seen(d, "arg")[1][1])
    assert.is_false(U.seen(d, "sleep")[1][1])
    d:stop()
    d = nil
    local dir = os.tmpname()
    os.remove(dir)
    local f = assert(io.open(dir, "w"))
    f:write('local milter = require "milter"\nmilter.sleep(0.1)\nreturn {}\n')
    f:close()
    local res = U.D.run({ "check", dir })
    os.remove(dir)
    assert.are.equal(1, res.status)
    assert.is_truthy(res.stderr:find("only inside a handler", 1, true), res.stderr)
    assert.is_truthy(res.stderr:find(":2:", 1, true), res.stderr)
  end)

  it("the MTA's ABORT mid-wait abandons the handler; abort runs; it is never resumed", function()
    start [[
function H.eom(ctx)
  local s = milter.tcp.connect("127.0.0.1", TCP)
  if ctx.sender == "<n@example.org>" then
    s:send("ECHO quick\r\n")
    s:receive("*l")
    return
  end
  s:send("HOLD k2\r\n")
  seen(ctx, "waiting", true)
  s:receive("*l")
  seen(ctx, "resumed", true)
end
function H.abort(ctx) seen(ctx, "abort", true) end
function H.close(ctx) seen(ctx, "close", true) end
return H
]]
    -- the connection goes on: a new message is served (its eom waits
    -- on a key released at once)
    U.abandoned(d, "abort", {
      release = function() tcp:ask("RELEASE k2") end,
      mail = "<n@example.org>",
      served = function(r) assert.are.equal("c", r.eom and r.eom.cmd, tostring(r.error)) end,
    })
  end)

  it("an ABORT in the same read as the EOM it abandons is seen at once", function()
    start [[
function H.eom(ctx)
  if ctx.sender ~= "<a@example.org>" then return end
  milter.sleep(30)
  seen(ctx, "resumed", true)
end
function H.abort(ctx) seen(ctx, "abort", true) end
return H
]]
    local c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>", {}))
    assert(c:rcpt("<b@example.org>", {}))
    -- EOM and ABORT in one write: both arrive in one read
    assert(c:send_raw("\0\0\0\1E\0\0\0\1A"))
    assert.are.same({ true }, U.wait_seen(d, "abort", 1, 5))
    local r = U.message(c, {})
    assert.are.equal("c", r.eom and r.eom.cmd, tostring(r.error))
    c:close()
    assert.are.same({}, U.seen(d, "resumed"))
  end)

  it("the MTA hanging up mid-wait: close runs, the handler is never resumed", function()
    start [[
function H.envrcpt(ctx, rcpt)
  if rcpt ~= "<held@example.org>" then return end
  local s = milter.tcp.connect("127.0.0.1", TCP)
  s:send("HOLD k3\r\n")
  seen(ctx, "waiting", true)
  s:receive("*l")
  seen(ctx, "resumed", true)
end
function H.close(ctx) seen(ctx, "close", true) end
return H
]]
    U.abandoned(d, "hang up", {
      release = function() tcp:ask("RELEASE k3") end,
      served = function(res) assert.is_true(res.eom ~= nil) end,
    })
  end)

  it("--script-timeout counts waiting: a long wait returns nil, 'timeout' and the handler goes on", function()
    start([[
function H.envfrom(ctx)
  local ok, err = milter.sleep(30)
  seen(ctx, "slept", { ok, err })
  return milter.reject{ reason = "after " .. tostring(err) }
end
return H
]], { "--script-timeout", "1" })
    local c = U.client(d)
    local t0 = now()
    local res = c:session {}
    c:close()
    assert.are.equal("550 5.7.1 after timeout", res.mail and res.mail.text, show(res.mail))
    assert.are.same({ { nil, "timeout" } }, U.seen(d, "slept"))
    assert.is_true(now() - t0 < 20, "the budget did not cut the sleep")
    assert.is_nil(U.wait_log(d, "exited with status", 0.2):find("exited with status", 1, true))
  end)

  -- an eom handler that waits (body), run to its reply: the reply and
  -- the progress packets that came before it
  local function eom_waits(body)
    start(body)
    local c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>", {}))
    assert(c:rcpt("<b@example.org>", {}))
    assert(c:send("E", ""))
    local r = assert(c:read_reply(15))
    c:close()
    assert.are.equal("a", r.cmd)
    local progress = 0
    for _, m in ipairs(r.mods) do progress = progress + (m.op == "progress" and 1 or 0) end
    return r, progress
  end

  it("progress packets keep the MTA waiting while an eom handler waits", function()
    local r, progress = eom_waits [[
function H.eom(ctx)
  milter.sleep(7)
  return milter.accept{ add_header = { { "X-Waited", "7s" } } }
end
return H
]]
    assert.is_true(progress >= 2, "progress packets: " .. progress)
    assert.are.equal("X-Waited", r.mods[#r.mods].name)
  end)

  it("waits one after another keep the progress cadence: 2 x 2.5 s of sleeps get a progress packet", function()
    -- each sleep is shorter than the interval (3 s): restarting the
    -- interval at each wait would send none, leaving the MTA 5 s without
    -- a word (what made Sendmail give up, its R= timeout, in the e2e)
    local r, progress = eom_waits [[
function H.eom(ctx)
  milter.sleep(2.5)
  milter.sleep(2.5)
  return milter.accept{ add_header = { { "X-Waited", "5s" } } }
end
return H
]]
    assert.is_true(progress >= 1, "progress packets: " .. progress)
    assert.are.equal("X-Waited", r.mods[#r.mods].name)
  end)

  it("reload and SIGTERM while a handler waits: it finishes on its own script", function()
    start [[
function H.envfrom(ctx)
  local s = milter.tcp.connect("127.0.0.1", TCP)
  s:send("HOLD k4\r\n")
  seen(ctx, "waiting", true)
  local l = s:receive("*l")
  return milter.reject{ reason = "old script: " .. tostring(l) }
end
return H
]]
    local c = U.client(d)
    U.open(c)
    assert(c:send("M", "<a@example.org>\0"))
    U.wait_seen(d, "waiting", 1)
    d:rewrite_script(U.script [[
function H.envfrom(ctx) return milter.reject{ reason = "new script" } end
return H
]])
    assert(d:signal("HUP"))
    U.wait_log(d, "generation 2")
    assert(d:signal("TERM"))
    socket.sleep(0.2)
    assert.is_true(d:alive(), "SIGTERM did not wait for the handler")
    tcp:ask("RELEASE k4")
    local r = assert(c:read_reply(5))
    assert.are.equal("550 5.7.1 old script: released k4", r.text)
    c:close()
    assert.is_not_nil(d:wait(10), "the daemon did not stop after the handler finished")
  end)
end)
