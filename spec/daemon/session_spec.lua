-- luacheck: std +busted
-- Connection and message lifetimes: macros, ctx.conn/ctx.msg, abort, close,
-- QUIT_NC, ctx after close.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local socket = require "socket"
local now = require "spec.support.clock" -- monotonic, for waits

-- "connect", "helo", ... in the order the handlers recorded them
local function event_order(d)
  local order = {}
  for line in d:log():gmatch("[^\n]+") do
    local t = line:match(" SEEN (%S+) ")
    if t then order[#order + 1] = t end
  end
  return order
end

local RECORD = U.script [[
function H.connect(ctx) seen(ctx, "connect", true) end
function H.helo(ctx) seen(ctx, "helo", true) end
function H.envfrom(ctx) seen(ctx, "envfrom", true) end
function H.envrcpt(ctx) seen(ctx, "envrcpt", true) end
function H.data(ctx) seen(ctx, "data", true) end
function H.header(ctx) seen(ctx, "header", true) end
function H.eoh(ctx) seen(ctx, "eoh", true) end
function H.body(ctx) seen(ctx, "body", true) end
function H.eom(ctx) seen(ctx, "eom", true) end
function H.abort(ctx) seen(ctx, "abort", true) end
function H.close(ctx) seen(ctx, "close", true) end
return H
]]

describe("macros", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  it("ctx:macro finds 'i', '{i}', 'auth_authen' (sent as {auth_authen}) and keeps values", function()
    d = U.start(U.script [[
local function all(ctx)
  return { i = ctx:macro("i"), bi = ctx:macro("{i}"), aa = ctx:macro("auth_authen"),
    baa = ctx:macro("{auth_authen}"), j = ctx:macro("j"), bj = ctx:macro("{j}"),
    dn = ctx:macro("daemon_name"), bdn = ctx:macro("{daemon_name}"),
    missing = ctx:macro("no_such_macro") }
end
function H.envfrom(ctx) seen(ctx, "envfrom", all(ctx)) end
function H.eom(ctx) seen(ctx, "eom", all(ctx)) end
return H
]])
    c = U.client(d)
    U.open(c)
    local r1 = U.message(c, { qid = "AAA111", mmacros = { { "{auth_type}", "PLAIN" },
      { "{auth_authen}", "alice" }, { "{mail_addr}", "sender@example.org" } } })
    assert.are.equal("c", r1.eom.cmd)
    -- the second MAIL carries no {auth_authen}: MAIL-stage and later
    -- macros belong to their message (libmilter's rule), so message 1's
    -- {auth_authen} and queue id are gone; connect macros stay
    local r2 = U.message(c, { qid = "BBB222", mmacros = {} })
    assert.are.equal("c", r2.eom.cmd)
    local base = { j = "mta.example.org", bj = "mta.example.org", dn = "mta.example.org",
      bdn = "mta.example.org" }
    local function with(t)
      local o = {}
      for k, v in pairs(base) do o[k] = v end
      for k, v in pairs(t) do o[k] = v end
      return o
    end
    local alice = { aa = "alice", baa = "alice" }
    assert.are.same({ with(alice), with({}) }, U.seen(d, "envfrom"))
    assert.are.same({ with({ aa = "alice", baa = "alice", i = "AAA111", bi = "AAA111" }),
      with({ i = "BBB222", bi = "BBB222" }) }, U.seen(d, "eom"))
  end)

  it("a macro keeps its last value (sent again with a new value before EOM)", function()
    d = U.start(U.script [[
function H.body(ctx) end
function H.eom(ctx) seen(ctx, "eom", { ctx:macro("i"), ctx:macro("{x_custom}") }) end
return H
]])
    c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>", {}, { { "{x_custom}", "one" } }))
    assert(c:rcpt("<b@example.org>", {}, {}))
    assert(c:data({ { "i", "FIRST" } }))
    assert(c:header("Subject", "s", { { "i", "FIRST" } }))
    assert(c:eoh({ { "i", "FIRST" } }))
    assert(c:body("x\r\n", { { "i", "FIRST" }, { "{x_custom}", "two" } }))
    local r = assert(c:eom({ { "i", "SECOND" } }))
    assert.are.equal("c", r.cmd)
    assert.are.same({ { "SECOND", "two" } }, U.seen(d, "eom"))
  end)
end)

describe("macros under churn", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  it("values stay right after many changes (old values are reclaimed)", function()
    d = U.start(U.script [[
function H.envfrom(ctx) end
function H.eom(ctx)
  seen(ctx, "eom", { ctx:macro("j"), ctx:macro("v"), ctx:macro("{x_a}"), ctx:macro("x_b"),
    ctx.helo, ctx.client.host, ctx.client.address, #(ctx:macro("x_big") or "") })
end
return H
]])
    c = U.client(d)
    U.open(c, { host = "host.example.org", addr = "192.0.2.9", helo = "helo.example.org" })
    local last_a, last_b
    for i = 1, 400 do
      last_a = ("a%04d"):format(i) .. string.rep("A", 300)
      last_b = ("b%04d"):format(i) .. string.rep("B", 50 + i % 7)
      -- each CONNECT-stage packet replaces the last one (as libmilter
      -- keeps macros), so j and v come along
      assert(c:macro("C", { { "j", "mta.example.org" }, { "v", "Postfix 3.7.11" },
        { "{x_a}", last_a }, { "{x_b}", last_b }, { "{x_big}", string.rep("z", 1000 + i) } }))
      if i % 50 == 0 then assert(c:helo("helo.example.org", {})) end
    end
    local r = U.message(c, {})
    assert.are.equal("c", r.eom.cmd)
    assert.are.same({ { "mta.example.org", "Postfix 3.7.11", last_a, last_b, "helo.example.org",
      "host.example.org", "192.0.2.9", 1400 } }, U.seen(d, "eom"))
  end)
end)

describe("message lifetime", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  it("two messages on one connection: fresh ctx.msg/sender/rcpts/headers, same ctx.conn", function()
    d = U.start(U.script [[
function H.envfrom(ctx, sender)
  ctx.conn.n = (ctx.conn.n or 0) + 1
  seen(ctx, "envfrom", { mark = ctx.msg.mark, sender = ctx.sender, rcpts = ctx.rcpts,
    nheaders = ctx.headers and #ctx.headers or 0, n = ctx.conn.n })
  ctx.msg.mark = sender
end
function H.eom(ctx)
  seen(ctx, "eom", { mark = ctx.msg.mark, sender = ctx.sender, rcpts = ctx.rcpts,
    headers = ctx.headers, n = ctx.conn.n })
end
return H
]])
    c = U.client(d)
    U.open(c)
    local r1 = U.message(c, { mail = "<a@example.org>", rcpts = { "<x@example.org>" },
      headers = { { "Subject", "one" } } })
    assert.are.equal("c", r1.eom.cmd)
    local r2 = U.message(c, { mail = "<b@example.org>",
      rcpts = { "<y@example.org>", "<z@example.org>" },
      headers = { { "Subject", "two" }, { "X-Two", "2" } } })
    assert.are.equal("c", r2.eom.cmd)
    assert.are.same({
      { sender = "<a@example.org>", rcpts = {}, nheaders = 0, n = 1 },
      { sender = "<b@example.org>", rcpts = {}, nheaders = 0, n = 2 },
    }, U.seen(d, "envfrom"))
    assert.are.same({
      { mark = "<a@example.org>", sender = "<a@example.org>", rcpts = { "<x@example.org>" },
        headers = { { "Subject", "one" } }, n = 1 },
      { mark = "<b@example.org>", sender = "<b@example.org>",
        rcpts = { "<y@example.org>", "<z@example.org>" },
        headers = { { "Subject", "two" }, { "X-Two", "2" } }, n = 2 },
    }, U.seen(d, "eom"))
  end)

  it("ABORT mid-message calls abort once; repeated ABORTs do not", function()
    d = U.start(RECORD)
    c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>"))
    assert(c:rcpt("<b@example.org>"))
    c:abort()
    c:abort()
    c:quit()
    U.wait_seen(d, "close", 1)
    assert.are.same({ "connect", "helo", "envfrom", "envrcpt", "abort", "close" }, event_order(d))
  end)

  it("ABORT in the body phase calls abort once and the next message is fresh", function()
    d = U.start(U.script [[
function H.envfrom(ctx, sender) ctx.msg.from = sender end
function H.body(ctx) end
function H.abort(ctx) seen(ctx, "abort", ctx.msg.from) end
function H.eom(ctx) seen(ctx, "eom", { ctx.msg.from, ctx.sender, ctx.headers }) end
function H.close(ctx) seen(ctx, "close", true) end
return H
]])
    c = U.client(d)
    U.open(c)
    assert(c:mail("<first@example.org>"))
    assert(c:rcpt("<b@example.org>"))
    assert(c:data())
    assert(c:header("Subject", "first"))
    assert(c:eoh())
    assert(c:body("part"))
    c:abort()
    c:abort()
    local r = U.message(c, { mail = "<second@example.org>", headers = { { "Subject", "second" } } })
    assert.are.equal("c", r.eom.cmd)
    c:abort()
    c:quit()
    U.wait_seen(d, "close", 1)
    assert.are.same({ "<first@example.org>" }, U.seen(d, "abort"))
    assert.are.same({ { "<second@example.org>", "<second@example.org>", { { "Subject", "second" } } } },
      U.seen(d, "eom"))
  end)

  it("ABORT after a finished message and twice before QUIT does not call abort", function()
    d = U.start(RECORD)
    c = U.client(d)
    U.open(c)
    local r = U.message(c, { headers = { { "Subject", "s" } } }) -- ends with one ABORT
    assert.are.equal("c", r.eom.cmd)
    c:abort()
    c:abort()
    c:quit()
    U.wait_seen(d, "close", 1)
    assert.are.same({ "connect", "helo", "envfrom", "envrcpt", "data", "header", "eoh",
      "body", "eom", "close" }, event_order(d))
  end)

  it("a HELO in the middle of a transaction acts as abort", function()
    d = U.start(RECORD)
    c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>"))
    assert(c:rcpt("<b@example.org>"))
    local r = assert(c:helo("again.example.org"))
    assert.are.equal("c", r.cmd)
    c:abort()
    c:abort()
    local m = U.message(c, { headers = { { "Subject", "s" } } })
    assert.are.equal("c", m.eom.cmd)
    c:abort()
    c:quit()
    U.wait_seen(d, "close", 1)
    assert.are.same({ "connect", "helo", "envfrom", "envrcpt", "abort", "helo", "envfrom",
      "envrcpt", "data", "header", "eoh", "body", "eom", "close" }, event_order(d))
  end)

  it("a new MAIL while a message is open abandons it (abort runs)", function()
    d = U.start(RECORD)
    c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>"))
    assert(c:rcpt("<b@example.org>"))
    local m = U.message(c, { headers = { { "Subject", "s" } } })
    assert.are.equal("c", m.eom.cmd)
    c:quit()
    U.wait_seen(d, "close", 1)
    assert.are.same({ "connect", "helo", "envfrom", "envrcpt", "abort", "envfrom",
      "envrcpt", "data", "header", "eoh", "body", "eom", "close" }, event_order(d))
  end)

  it("the MTA hanging up mid-message runs abort then close", function()
    d = U.start(RECORD)
    c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>"))
    assert(c:rcpt("<b@example.org>"))
    c:close(); c = nil
    U.wait_seen(d, "close", 1)
    assert.are.same({ "connect", "helo", "envfrom", "envrcpt", "abort", "close" }, event_order(d))
  end)
  it("eom-only script: ctx.msg is fresh and ctx.conn kept across messages", function()
    d = U.start(U.script [[
function H.eom(ctx)
  ctx.conn.n = (ctx.conn.n or 0) + 1
  ctx.msg.n = (ctx.msg.n or 0) + 1
  seen(ctx, "eom", { ctx.conn.n, ctx.msg.n, ctx.sender, #ctx.rcpts, #ctx.headers })
end
return H
]])
    c = U.client(d)
    U.open(c)
    for i = 1, 3 do
      local r = U.message(c, { mail = "<m" .. i .. "@example.org>",
        headers = { { "Subject", "s" .. i } } })
      assert.are.equal("c", r.eom.cmd)
    end
    assert.are.same({ { 1, 1, "<m1@example.org>", 1, 1 }, { 2, 1, "<m2@example.org>", 1, 1 },
      { 3, 1, "<m3@example.org>", 1, 1 } }, U.seen(d, "eom"))
  end)

  it("UNKNOWN in the middle of a transaction keeps the message", function()
    d = U.start(U.script [[
function H.unknown(ctx, cmd) seen(ctx, "unknown", { cmd, ctx.sender }) end
function H.abort(ctx) seen(ctx, "abort", true) end
function H.eom(ctx) seen(ctx, "eom", { ctx.sender, ctx.rcpts }) end
return H
]])
    c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>"))
    assert(c:rcpt("<b@example.org>"))
    local r = assert(c:unknown("XFOO"))
    assert.are.equal("c", r.cmd)
    assert(c:rcpt("<c@example.org>"))
    assert(c:data())
    assert(c:header("Subject", "s"))
    assert(c:eoh())
    assert(c:body("x\r\n"))
    assert.are.equal("c", assert(c:eom()).cmd)
    assert.are.same({ { "XFOO", "<a@example.org>" } }, U.seen(d, "unknown"))
    assert.are.same({ { "<a@example.org>", { "<b@example.org>", "<c@example.org>" } } }, U.seen(d, "eom"))
    assert.are.same({}, U.seen(d, "abort"))
  end)

  it("ctx:log lines carry the connection id and the queue id", function()
    d = U.start(U.script [[
function H.eom(ctx) ctx:log("info", "log-marker", "id=" .. ctx.id) end
return H
]])
    c = U.client(d)
    U.open(c)
    assert.are.equal("c", U.message(c, { qid = "QUEUE42XYZ" }).eom.cmd)
    local lines = U.lines_with(d:log(), "log-marker")
    assert.are.equal(1, #lines)
    local id = lines[1]:match("id=(%d+)")
    assert.is_truthy(id, lines[1])
    local tag = lines[1]:sub(1, lines[1]:find("log-marker", 1, true) - 1)
    assert.is_truthy(tag:find(id, 1, true), "connection id not in the tag: " .. lines[1])
    assert.is_truthy(tag:find("QUEUE42XYZ", 1, true), "queue id not in the tag: " .. lines[1])
  end)
end)

describe("concurrent connections", function()
  local d, c1, c2

  after_each(function()
    if c1 then c1:close(); c1 = nil end
    if c2 then c2:close(); c2 = nil end
    if d then d:stop(); d = nil end
  end)

  it("interleaved connections have their own ctx.conn, ctx.msg and envelope", function()
    d = U.start(U.script [[
function H.connect(ctx, host) ctx.conn.host = host end
function H.envfrom(ctx, sender) ctx.msg.sender = sender end
function H.eom(ctx)
  seen(ctx, "eom", { ctx.conn.host, ctx.msg.sender, ctx.sender, ctx.rcpts, ctx.client.host, ctx.id })
end
return H
]])
    c1 = U.client(d)
    c2 = U.client(d)
    U.open(c1, { host = "one.example.org" })
    U.open(c2, { host = "two.example.org" })
    assert(c1:mail("<one@example.org>"))
    assert(c2:mail("<two@example.org>"))
    assert(c2:rcpt("<r2@example.org>"))
    assert(c1:rcpt("<r1@example.org>"))
    assert(c1:data()); assert(c2:data())
    assert(c2:header("Subject", "2")); assert(c1:header("Subject", "1"))
    assert(c1:eoh()); assert(c2:eoh())
    assert.are.equal("c", assert(c2:eom()).cmd)
    assert.are.equal("c", assert(c1:eom()).cmd)
    local got = U.seen(d, "eom")
    assert.are.equal(2, #got)
    assert.are.same({ "two.example.org", "<two@example.org>", "<two@example.org>",
      { "<r2@example.org>" }, "two.example.org" }, { unpack(got[1], 1, 5) })
    assert.are.same({ "one.example.org", "<one@example.org>", "<one@example.org>",
      { "<r1@example.org>" }, "one.example.org" }, { unpack(got[2], 1, 5) })
    assert.are_not.equal(got[1][6], got[2][6], "ctx.id must differ")
  end)
end)

-- each tag was seen once, as a pcall that failed with text in its message
local function raised(d, tags, text)
  for _, tag in ipairs(tags) do
    local got = U.seen(d, tag)
    assert.are.equal(1, #got, tag)
    assert.is_false(got[1][1], tag .. " must raise")
    assert.is_truthy(got[1][2]:find(text, 1, true), tag .. ": " .. got[1][2])
  end
end

describe("connection lifetime", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  it("QUIT_NC then CONNECT on the same socket: close ran, fresh ctx.conn", function()
    d = U.start(U.script [[
function H.connect(ctx, host)
  seen(ctx, "connect", { host = host, mark = ctx.conn.mark, client = ctx.client.host })
  ctx.conn.mark = host
end
function H.eom(ctx) seen(ctx, "eom", { mark = ctx.conn.mark, host = ctx.client.host }) end
function H.close(ctx) seen(ctx, "close", { mark = ctx.conn.mark, host = ctx.client.host }) end
return H
]])
    c = U.client(d)
    U.open(c, { host = "one.example.org" })
    assert.are.equal("c", U.message(c).eom.cmd)
    c:quit_nc()
    U.open(c, { host = "two.example.org", addr = "192.0.2.2" })
    assert.are.equal("c", U.message(c).eom.cmd)
    c:quit()
    U.wait_seen(d, "close", 2)
    assert.are.same({ "connect", "eom", "close", "connect", "eom", "close" }, event_order(d))
    assert.are.same({ { host = "one.example.org", client = "one.example.org" },
      { host = "two.example.org", client = "two.example.org" } }, U.seen(d, "connect"))
    assert.are.same({ { mark = "one.example.org", host = "one.example.org" },
      { mark = "two.example.org", host = "two.example.org" } }, U.seen(d, "eom"))
    assert.are.same({ { mark = "one.example.org", host = "one.example.org" },
      { mark = "two.example.org", host = "two.example.org" } }, U.seen(d, "close"))
  end)

  it("QUIT_NC gives a fresh ctx.conn also when the script has no close handler", function()
    d = U.start(U.script [[
function H.connect(ctx, host)
  seen(ctx, "connect", { host, ctx.conn.mark })
  ctx.conn.mark = host
end
return H
]])
    c = U.client(d)
    U.open(c, { host = "one.example.org" })
    c:quit_nc()
    U.open(c, { host = "two.example.org" })
    c:quit_nc()
    U.open(c, { host = "three.example.org" })
    assert.are.same({ { "one.example.org" }, { "two.example.org" }, { "three.example.org" } },
      U.seen(d, "connect"))
  end)

  it("--timeout drops an idle connection, running abort and close", function()
    d = U.start(U.script [[
function H.envfrom(ctx) end
function H.abort(ctx) seen(ctx, "abort", true) end
function H.close(ctx) seen(ctx, "close", true) end
return H
]], { args = { "--timeout", "0.3" } })
    c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>"))
    local t0 = now()
    local err = U.read_until_closed(c, 5)
    assert.is_truthy(err == "closed" or tostring(err):find("reset", 1, true), tostring(err))
    assert.is_true(now() - t0 < 3, "dropped too late")
    assert.are.equal(1, #U.wait_seen(d, "close", 1))
    assert.are.same({ true }, U.seen(d, "abort"))
  end)

  it("the close line counts messages, also when the script has no eom", function()
    d = U.start(U.script [[
function H.envfrom(ctx, sender) seen(ctx, "envfrom", sender) end
return H
]])
    c = U.client(d)
    U.open(c)
    for i = 1, 2 do
      local r = U.message(c, { mail = "<m" .. i .. "@example.org>" })
      assert.is_nil(r.error)
      assert.are.equal("c", r.eom.cmd)
    end
    c:quit()
    c:close(); c = nil
    -- the start-up probe has its own close line, without a queue id
    local log = U.wait_log(d, "q=4F2A1B3C5D] closed after", 5)
    local closes = U.lines_with(log, "q=4F2A1B3C5D] closed after")
    assert.are.equal(1, #closes, log)
    assert.matches(", 2 message%(s%)$", closes[1])
    assert.are.same({ "<m1@example.org>", "<m2@example.org>" }, U.seen(d, "envfrom"))
  end)

  it("close runs once per connection, with ctx readable", function()
    d = U.start(U.script [[
function H.close(ctx) seen(ctx, "close", { ctx.client.host, ctx.helo, type(ctx.id) }) end
return H
]])
    for i = 1, 3 do
      c = U.client(d)
      U.open(c, { host = "h" .. i .. ".example.org", helo = "helo" .. i })
      c:quit()
      c:close(); c = nil
    end
    U.wait_seen(d, "close", 3)
    socket.sleep(0.1)
    assert.are.same({ { "h1.example.org", "helo1", "string" }, { "h2.example.org", "helo2", "string" },
      { "h3.example.org", "helo3", "string" } }, U.seen(d, "close"))
  end)

  it("a ctx kept in a global raises when used after its connection closed", function()
    d = U.start(U.script [[
function H.connect(ctx, host)
  if SAVED then
    local ok, err = pcall(function() return SAVED:macro("j") end)
    seen(ctx, "macro", { ok, tostring(err) })
    ok, err = pcall(function() return SAVED.conn end)
    seen(ctx, "conn", { ok, tostring(err) })
    ok, err = pcall(function() return SAVED.sender end)
    seen(ctx, "sender", { ok, tostring(err) })
    ok, err = pcall(function() return SAVED:log("info", "ghost") end)
    seen(ctx, "log", { ok, tostring(err) })
    for _, k in ipairs { "msg", "id", "client" } do -- its own fields too
      ok, err = pcall(function() return SAVED[k] end)
      seen(ctx, k, { ok, tostring(err) })
    end
  end
  SAVED = ctx
  local _ = ctx.client -- kept in ctx once read
end
return H
]])
    U.normal_session(d)
    U.normal_session(d)
    raised(d, { "macro", "conn", "sender", "log", "msg", "id", "client" }, "closed")
    assert.is_true(d:alive())
  end)

  -- ctx.client, sender and helo of the running handler's own ctx are read
  -- through the ffi, found by the ctx's id; a live ctx of another
  -- connection, read from this handler, must still give its own fields
  it("another live connection's ctx gives that connection's client, helo and sender", function()
    d = U.start(U.script [[
function H.envfrom(ctx)
  if not FIRST then FIRST = ctx return end
  local f, own = FIRST.client, ctx.client
  seen(ctx, "other", { f.host, f.family, f.address, f.port, FIRST.helo, FIRST.sender })
  seen(ctx, "own", { own.host, own.family, own.address, own.port, ctx.helo, ctx.sender })
end
return H
]])
    local first = U.client(d, U.REPLIES)
    first:connect_ev("one.example", "4", 1111, "192.0.2.1")
    first:helo("helo-one")
    assert(first:mail("<one@example.org>"))
    c = U.client(d, U.REPLIES)
    c:connect_ev("two.example", "6", 2222, "2001:db8::2")
    c:helo("helo-two")
    assert(c:mail("<two@example.org>"))
    first:close()
    assert.are.same({ { "one.example", "inet", "192.0.2.1", 1111, "helo-one", "<one@example.org>" } },
      U.seen(d, "other"))
    assert.are.same({ { "two.example", "inet6", "2001:db8::2", 2222, "helo-two", "<two@example.org>" } },
      U.seen(d, "own"))
  end)

  -- the bridge's ffi code (ctx.client, the held headers' runner, store:incr)
  -- uses the ffi's functions as they were before the script ran: a script
  -- that removes them from the shared ffi module must still be served
  it("a script that empties the ffi module still gets ctx.client, sender, its headers and store:incr", function()
    d = U.start(U.script [[
local ffi = require "ffi"
for _, k in ipairs { "cast", "typeof", "string", "new", "cdef", "metatype", "istype" } do
  ffi[k] = nil
end
function H.envfrom(ctx)
  local cl = ctx.client
  seen(ctx, "from", { cl.host, cl.family, cl.address, cl.port, ctx.helo, ctx.sender })
  seen(ctx, "incr", { milter.store:incr("ffi-spec", 2) })
end
function H.header(ctx, name, value) seen(ctx, "hdr", { name, value }) end
return H
]])
    local res = U.normal_session(d, { headers = { { "Subject", "hi" }, { "To", "<b@example.org>" } } })
    assert.is_nil(res.stopped, tostring(res.stopped) .. ": " .. tostring(res.error))
    assert.truthy(res.eom)
    assert.are.same({ { "client.example.org", "inet", "192.0.2.1", 40000, "client.example.org",
      "<sender@example.org>" } }, U.seen(d, "from"))
    assert.are.same({ { 2 } }, U.seen(d, "incr"))
    assert.are.same({ { "Subject", "hi" }, { "To", "<b@example.org>" } }, U.seen(d, "hdr"))
    assert.truthy(d:alive(), "the worker is still up")
  end)

  it("ctx.helo and ctx.sender are nil before HELO and MAIL, and client is kept for the session", function()
    d = U.start(U.script [[
function H.connect(ctx)
  seen(ctx, "connect", { ctx.helo == nil, ctx.sender == nil, rawget(ctx, "client") == nil })
  local c = ctx.client
  seen(ctx, "kept", { rawget(ctx, "client") == c, ctx.client == c })
end
return H
]])
    U.normal_session(d)
    assert.are.same({ { true, true, true } }, U.seen(d, "connect"))
    assert.are.same({ { true, true } }, U.seen(d, "kept"))
  end)

  -- a connection's coroutine is kept for the next connection once its last
  -- call returned (not one that failed, which is dead): the next one must
  -- find it as lua_newthread would make it
  it("the next connection's handlers get the kept coroutine, with the globals it started with", function()
    d = U.start(U.script [[
function H.connect(ctx, host)
  seen(ctx, "env", { host, getfenv(0) == _G })
  seen(ctx, "co", { host, tostring(coroutine.running()) })
  if host == "one" then setfenv(0, { marker = true }) end -- this coroutine's own
  if host == "boom" then error("boom") end
end
function H.close(ctx) seen(ctx, "closed", true) end
return H
]])
    for i, host in ipairs { "one", "two", "boom", "three" } do
      local cl = U.client(d, U.REPLIES)
      local r = assert(cl:connect_ev(host, "4", 25, "192.0.2.1"))
      if host == "boom" then assert.are_not.equal("c", r.cmd) else assert.are.equal("c", r.cmd) end
      cl:close()
      -- the worker ends a connection (and keeps its coroutine) right after
      -- its close handler, before it takes the next connection
      assert.are.equal(i, #U.wait_seen(d, "closed", i, 5), host)
    end
    assert.are.same({ { "one", true }, { "two", true }, { "boom", true }, { "three", true } },
      U.seen(d, "env"))
    local co = U.seen(d, "co")
    assert.are.equal(co[1][2], co[2][2], "the second connection got the first one's coroutine")
    assert.is_true(d:alive())
  end)

  -- every connection's ctx shares its functions; they find the connection
  -- through ctx's protected metatable, so nothing else passes for a ctx
  it("ctx methods called on anything but a ctx raise, and a ctx's own still work", function()
    d = U.start(U.script [[
function H.connect(ctx, host)
  local function try(f, ...) local ok, err = pcall(f, ...); return { ok, tostring(err) } end
  local fake = setmetatable({}, { io.stdout, io.stdout, __index = function() end })
  seen(ctx, "dot", try(function() return ctx.macro("j") end))
  seen(ctx, "table", try(ctx.macro, {}, "j"))
  seen(ctx, "forged", try(ctx.header, fake, "Subject"))
  seen(ctx, "string", try(ctx.log, "info", "x"))
  seen(ctx, "mt", { getmetatable(ctx), (pcall(setmetatable, ctx, {})) })
  seen(ctx, "own", { ctx:macro("j"), ctx.id == tostring(ctx.id), tostring(ctx):match("^milter%.ctx%(") ~= nil })
end
return H
]])
    U.normal_session(d)
    raised(d, { "dot", "table", "forged", "string" }, "not a ctx")
    assert.are.same({ { "milter.ctx", false } }, U.seen(d, "mt"))
    local own = U.seen(d, "own")[1]
    assert.is_string(own[1])
    assert.is_true(own[2])
    assert.is_true(own[3])
    assert.is_true(d:alive())
  end)

  -- luamilter's own Lua (the ctx's constructor, the global guard) runs
  -- after the top level: it must not depend on a global the script can
  -- change. Before, the guard read setmetatable, rawset, tostring and
  -- debug from the globals, and their loss was a Lua panic at start.
  it("a script that removes setmetatable, rawset, tostring and debug gets a whole ctx and the guard", function()
    d = U.start(U.script [[
setmetatable, getmetatable, rawset, rawget, next, tostring, debug = nil, nil, nil, nil, nil, nil, nil
function H.connect(ctx, host)
  ctx.conn.n = "one"
  -- string keys only: the prelude's ser() calls tostring for a number
  seen(ctx, "ctx", { id = type(ctx.id), n = ctx.conn.n, msg = type(ctx.msg), j = ctx:macro("j"), host = host })
  LEAKED = "x"
end
return H
]])
    U.normal_session(d)
    local got = U.seen(d, "ctx")
    assert.are.equal(1, #got)
    assert.are.same({ "string", "one", "table" }, { got[1].id, got[1].n, got[1].msg })
    assert.is_string(got[1].j)
    assert.is_string(got[1].host)
    local warn = "script writes global 'LEAKED'"
    assert.truthy(U.wait_log(d, warn, 5):find(warn, 1, true), d:log())
  end)

  it("a script that protects _G's metatable keeps it (no guard), where it was a Lua panic at start", function()
    d = U.start(U.script [[
local mine = { __metatable = "mine" }
setmetatable(_G, mine)
function H.connect(ctx) seen(ctx, "mt", { getmetatable(_G) }) end
return H
]])
    U.normal_session(d)
    assert.are.same({ { "mine" } }, U.seen(d, "mt"))
  end)

  it("an unprotected use of a dead ctx is a logged handler error, never a crash", function()
    d = U.start(U.script [[
function H.connect(ctx)
  local old = SAVED
  SAVED = ctx
  if old then return milter.reject{ reason = old.client.host } end
end
function H.eom(ctx) end
return H
]])
    local r1 = U.normal_session(d)
    assert.are.equal("c", r1.connect.cmd)
    local r2 = U.normal_session(d)
    assert.is_truthy(r2.connect.cmd == "t" or (r2.connect.cmd == "y" and r2.connect.text:match("^4")),
      "tempfail expected, got " .. tostring(r2.connect.cmd))
    local log = U.wait_log(d, "closed")
    assert.are.equal(1, #U.lines_with(log, "ERROR"), log)
    assert.is_truthy(U.lines_with(log, "ERROR")[1]:find("connection closed", 1, true))
    assert.is_true(d:alive())
    local r3 = U.normal_session(d)
    assert.is_table(r3.connect)
    assert.is_true(d:alive())
  end)
end)
