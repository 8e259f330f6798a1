-- luacheck: std +busted
-- Held headers in batches: where HEADER is reply-free, the headers that
-- come in one read are handed to the header handler in one call (one
-- resume of the connection's coroutine), in order. Each handler still sees
-- what it saw with a call of its own: the headers up to its own, the
-- macros sent before it, a --script-timeout of its own; the first verdict
-- that ends the message ends the batch, and the headers after it reach no
-- handler.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local mc = U.mc

-- MAIL, RCPT and DATA as Postfix sends them, then the headers, EOH and
-- BODYEOB in one write: the daemon reads them together. Each header comes
-- after Postfix's MACRO L (the queue id, the same every time) unless
-- hmacros gives the macros before each one.
local function one_write(c, headers, hmacros)
  assert(c:mail("<a@example.org>", {}, { { "i", "Q1" } }))
  assert(c:rcpt("<b@example.org>"))
  assert(c:data({ { "i", "Q1" } }))
  local out = {}
  for i, h in ipairs(headers) do
    local list = {}
    for _, kv in ipairs(hmacros and hmacros[i] or { { "i", "Q1" } }) do
      list[#list + 1] = kv[1] .. "\0" .. kv[2] .. "\0"
    end
    out[#out + 1] = mc.frame("D", "L" .. table.concat(list))
    out[#out + 1] = mc.frame("L", h[1] .. "\0" .. h[2] .. "\0")
  end
  if U.band(c.neg.protocol, mc.SMFIP.NOEOH) == 0 then out[#out + 1] = mc.frame("N", "") end
  out[#out + 1] = mc.frame("E", "")
  assert(c:send_raw(table.concat(out)))
  return c:read_reply(10)
end

-- GET /metrics on a unix socket: {["name{labels}"] = number}
local function metrics(path)
  local s = assert(require("socket.unix")())
  s:settimeout(2)
  assert(s:connect(path))
  s:send("GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
  local data, _, partial = s:receive("*a")
  s:close()
  local t = {}
  for k, v in (data or partial):gmatch("\n(luamilter_handler_[%w_]+{event=\"header\"[^}]*}) (%S+)") do
    t[k] = tonumber(v)
  end
  return t
end

-- a daemon for src (extra arguments args), a client, and one message
-- whose headers come in one write; returns the final reply
local d, c
local function run(src, headers, args, hmacros)
  d = U.start(src, args and { args = args } or nil)
  c = U.client(d)
  U.open(c)
  return one_write(c, headers, hmacros)
end

local FIVE = { { "From", "<a@example.org>" }, { "Subject", "one" }, { "To", "<b@example.org>" },
  { "X-A", "a" }, { "X-B", "b" } }

describe("held headers in batches", function()
  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  it("run in one call, in order, each seeing the headers up to its own", function()
    local r = run(U.script [[
function H.header(ctx, name, value)
  local last = ctx.headers[#ctx.headers]
  seen(ctx, "header", { name, value, #ctx.headers, last[1], last[2], ctx:header("X-B") or "none" })
end
function H.eom(ctx) seen(ctx, "eom", #ctx.headers); return milter.accept() end
return H
]], FIVE, { "--log-level", "debug" })
    assert.are.equal("a", r.cmd)
    local got = U.seen(d, "header")
    assert.are.equal(5, #got)
    for i, h in ipairs(FIVE) do
      -- header 5 is X-B: only its own handler finds it
      assert.are.same({ h[1], h[2], i, h[1], h[2], i == 5 and "b" or "none" }, got[i], "header " .. i)
    end
    assert.are.same({ 5 }, U.seen(d, "eom"))
    -- they were one call: the daemon says so at debug level
    local log = d:log()
    assert.are.equal(1, #U.lines_with(log, "runs for 5 held header(s) in one call"), log)
  end)

  it("a reject at header 2 of 5: headers 3 to 5 reach no handler, eom gets the reply", function()
    local r = run(U.script [[
function H.header(ctx, name, value)
  seen(ctx, "header", name)
  if value == "one" then return milter.reject{ code = 550, xcode = "5.7.1", reason = "no" } end
end
function H.eoh(ctx) seen(ctx, "eoh", #ctx.headers) end
function H.eom(ctx) seen(ctx, "eom", #ctx.headers); return milter.accept() end
return H
]], FIVE)
    assert.are.equal("y", r.cmd)
    assert.are.equal("550 5.7.1 no", r.text)
    assert.are.same({ "From", "Subject" }, U.seen(d, "header"))
    assert.are.same({}, U.seen(d, "eoh"))
    assert.are.same({}, U.seen(d, "eom"))
    assert.are.equal(1, #U.lines_with(d:log(), "header verdict reject kept"))
    -- the next message on the connection is whole again
    local res = U.message(c, { headers = { { "Subject", "fine" }, { "X-C", "c" } } })
    assert.are.equal("a", res.eom.cmd)
    assert.are.same({ 2 }, U.seen(d, "eom"))
  end)

  it("each handler has a --script-timeout of its own, waits included", function()
    -- three 0.9 s waits under a 1.6 s budget: only per handler do they fit
    -- (0.7 s to spare for each, on a loaded machine)
    local r = run(U.script [[
function H.header(ctx, name)
  local ok, err = milter.sleep(0.9) -- nil, "timeout" when the budget cuts it
  seen(ctx, "slept", { name, ok or err })
end
function H.eom(ctx) return milter.accept() end
return H
]], { FIVE[1], FIVE[2], FIVE[3] }, { "--script-timeout", "1.6" })
    assert.are.equal("a", r.cmd)
    assert.are.same({ { "From", true }, { "Subject", true }, { "To", true } }, U.seen(d, "slept"))
    assert.are.equal(0, #U.lines_with(d:log(), "ERROR"))
  end)

  it("a macro that changes between headers is the one each handler sees", function()
    local r = run(U.script [[
function H.header(ctx, name) seen(ctx, "header", { name, ctx:macro("x") or "none" }) end
function H.eom(ctx) return milter.accept() end
return H
]], { FIVE[1], FIVE[2], FIVE[3] }, nil, { { { "x", "1" } }, { { "x", "1" } }, { { "x", "2" } } })
    assert.are.equal("a", r.cmd)
    assert.are.same({ { "From", "1" }, { "Subject", "1" }, { "To", "2" } }, U.seen(d, "header"))
  end)

  it("an error in header 2: reported at its line without the batch's own frame; "
    .. "under --on-error continue header 3 still runs", function()
    local src = U.script [[
function H.header(ctx, name)
  seen(ctx, "header", name)
  if name == "Subject" then error("boom") end -- BOOM
end
function H.eom(ctx) return milter.accept() end
return H
]]
    local r = run(src, { FIVE[1], FIVE[2], FIVE[3] }, { "--on-error", "continue" })
    assert.are.equal("a", r.cmd)
    assert.are.same({ "From", "Subject", "To" }, U.seen(d, "header"))
    local log = U.wait_log(d, "handler header failed")
    local lines = U.lines_with(log, "handler header failed")
    assert.are.equal(1, #lines)
    assert.is_truthy(log:find(":" .. U.line_of(src, "-- BOOM") .. ": boom", 1, true), log)
    assert.is_falsy(log:find("milter.held", 1, true), log)
  end)

  it("a waiting handler in a batch: the rest of the batch runs after it, in order", function()
    local r = run(U.script [[
function H.header(ctx, name)
  if name == "Subject" then milter.sleep(0.1) end
  seen(ctx, "header", { name, #ctx.headers })
end
function H.eom(ctx) seen(ctx, "eom", #ctx.headers); return milter.accept() end
return H
]], FIVE)
    assert.are.equal("a", r.cmd)
    assert.are.same({ { "From", 1 }, { "Subject", 2 }, { "To", 3 }, { "X-A", 4 }, { "X-B", 5 } },
      U.seen(d, "header"))
    assert.are.same({ 5 }, U.seen(d, "eom"))
  end)

  it("--metrics counts each header's call, and a failure once, whatever the batches", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir) == 0)
    local msock = dir .. "/metrics.sock"
    d = U.start(U.script [[
function H.header(ctx, name, value)
  if value == "stop" then return milter.reject() end
  if value == "boom" then error("boom") end
end
function H.eom(ctx) return milter.accept() end
return H
]], { args = { "--metrics", "unix:" .. msock, "--on-error", "continue" } })
    c = U.client(d)
    U.open(c)
    -- 2 of 5 run (a reject at the second), then 3 of 3 with a failure
    assert.are.equal("r", one_write(c, { FIVE[1], { "Subject", "stop" }, FIVE[3], FIVE[4], FIVE[5] }).cmd)
    assert.are.equal("a", one_write(c, { FIVE[1], { "Subject", "boom" }, FIVE[3] }).cmd)
    local m = metrics(msock)
    assert.are.equal(5, m['luamilter_handler_calls_total{event="header"}'])
    assert.are.equal(1, m['luamilter_handler_errors_total{event="header"}'])
    assert.are.equal(5, m['luamilter_handler_duration_seconds_count{event="header"}'])
    os.execute("rm -rf " .. dir)
  end)

  it("the batch's strings are not kept once their handlers ran", function()
    -- eom collects and reports the Lua heap: none of 8 headers of 60 KB
    -- may stay referenced after its handler ran (each read of at most
    -- 64 KB ends a batch, so a kept batch would be one of them at least)
    run(U.script [[
function H.header(ctx, name, value) end
function H.eom(ctx)
  collectgarbage("collect")
  collectgarbage("collect")
  seen(ctx, "kb", math.floor(collectgarbage("count")))
  return milter.accept()
end
return H
]], { FIVE[1] })
    local big = {}
    for i = 1, 8 do big[i] = { "X-Big-" .. i, ("v"):rep(60000) .. i } end
    assert.are.equal("a", one_write(c, big).cmd)
    local kb = U.seen(d, "kb")
    assert.are.equal(2, #kb)
    assert.is_true(kb[2] - kb[1] < 30, ("%d KB before, %d KB after"):format(kb[1], kb[2]))
  end)

  it("nor after a handler failed in the middle of a batch", function()
    -- the message ends at the failing header (--on-error tempfail): the
    -- headers after it, never reached, must not stay referenced either
    run(U.script [[
function H.header(ctx, name, value) if name == "X-Big-1" then error("boom") end end
function H.eom(ctx)
  collectgarbage("collect")
  collectgarbage("collect")
  seen(ctx, "kb", collectgarbage("count"))
  return milter.accept()
end
return H
]], { FIVE[1] })
    -- 8 headers of 900 bytes come in one read (LuaSocket sends 8 KiB at a
    -- time): one batch, failing at its first; the 7 it did not reach
    -- would hold 6.3 KB
    local big = {}
    for i = 1, 8 do big[i] = { "X-Big-" .. i, ("v"):rep(900) .. i } end -- 8 strings, not one
    assert.are.equal("y", one_write(c, big).cmd)
    assert.are.equal("a", one_write(c, { FIVE[1] }).cmd)
    local kb = U.seen(d, "kb")
    assert.are.equal(2, #kb)
    assert.is_true(kb[2] - kb[1] < 3, ("%.1f KB before, %.1f KB after"):format(kb[1], kb[2]))
  end)

  it("error(msg, 2) and a constructor's misuse in a tail call name the script, not the batch", function()
    local src = U.script [[
function H.header(ctx, name)
  if name == "From" then error("blame the caller", 2) end -- LEVEL2
  if name == "Subject" then return milter.reject(5) end
end
function H.eom(ctx) return milter.accept() end
return H
]]
    run(src, { FIVE[1], FIVE[2] }, { "--on-error", "continue" })
    local log = U.wait_log(d, "milter.reject expects")
    assert.is_falsy(log:find("milter.held", 1, true), log)
    assert.is_truthy(log:find("handler header failed: [^\n]*:" .. U.line_of(src, "-- LEVEL2") ..
      ": blame the caller"), log)
    assert.is_truthy(log:find("handler header failed: milter.reject expects", 1, true), log)
  end)

  it("held headers before a malformed frame in the same read still reach their handler and abort", function()
    d = U.start(U.script [[
function H.header(ctx, name) seen(ctx, "header", name) end
function H.abort(ctx) seen(ctx, "abort", #ctx.headers) end
function H.eom(ctx) return milter.accept() end
return H
]])
    c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>", {}))
    assert(c:rcpt("<b@example.org>"))
    assert(c:data({}))
    assert(c:send_raw(mc.frame("L", "A\0a\0") .. mc.frame("L", "B\0b\0") .. "\0\0\0\1Z"))
    assert.are.same({ 2 }, U.wait_seen(d, "abort", 1))
    assert.are.same({ "A", "B" }, U.seen(d, "header"))
  end)

  it("a batch that waited and then failed: the rest of it runs at once, not at the next packet", function()
    d = U.start(U.script [[
function H.header(ctx, name)
  if name == "Sl" then milter.sleep(0.05) end
  if name == "Err" then error("boom") end
  seen(ctx, "header", name)
end
function H.eom(ctx) return milter.accept() end
return H
]], { args = { "--on-error", "continue" } })
    c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>", {}))
    assert(c:rcpt("<b@example.org>"))
    assert(c:data({}))
    assert(c:send_raw(mc.frame("L", "A\0a\0") .. mc.frame("L", "Sl\0s\0") ..
      mc.frame("L", "Err\0e\0") .. mc.frame("L", "C\0c\0")))
    -- nothing more comes from the MTA meanwhile
    assert.are.same({ "A", "Sl", "C" }, U.wait_seen(d, "header", 3, 3))
    if U.band(c.neg.protocol, mc.SMFIP.NOEOH) == 0 then assert(c:send_raw(mc.frame("N", ""))) end
    assert(c:send_raw(mc.frame("E", "")))
    assert.are.equal("a", c:read_reply(5).cmd)
  end)

  it("names that share a slot of the name cache reach each handler as they came, held or not", function()
    -- the runner keeps the names it made in 128 slots: 300 names, some
    -- differing only in case, share slots; message 2 sends them in reverse
    -- and message 3 again, so both a hit and a replaced slot are seen
    local names = {}
    for i = 1, 300 do
      local n = "X-N" .. i .. ("abcdefg"):sub(1, i % 7)
      names[#names + 1] = { i % 3 == 0 and n:lower() or n, "v" .. i }
    end
    local src = U.script [[
function H.header(ctx, name, value) seen(ctx, "h", name .. "=" .. value) end
function H.eom(ctx) return milter.accept() end
return H
]]
    local want = {}
    local function expect(list)
      for _, h in ipairs(list) do want[#want + 1] = h[1] .. "=" .. h[2] end
    end
    assert.are.equal("a", run(src, names).cmd)
    local rev = {}
    for i = #names, 1, -1 do rev[#rev + 1] = names[i] end
    assert.are.equal("a", one_write(c, rev).cmd)
    assert.are.equal("a", one_write(c, names).cmd)
    expect(names); expect(rev); expect(names)
    assert.are.same(want, U.seen(d, "h"))
    -- the same cache behind an MTA that wants a reply per header (a call
    -- per header, no runner), on the daemon whose slots the batches filled
    c:close()
    c = U.client(d, { 6, 0x1ff, 0 })
    U.open(c)
    assert.are.equal("a", U.message(c, { headers = rev }).eom.cmd)
    assert.are.equal("a", U.message(c, { headers = names }).eom.cmd)
    expect(rev); expect(names)
    assert.are.same(want, U.seen(d, "h"))
  end)
end)
