-- luacheck: std +busted
-- Every handler is called with the arguments API.md names.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local mc = U.mc

-- records every call: seen(ctx, event, args)
local RECORD_ALL = U.script [[
function H.connect(ctx, host, addr) seen(ctx, "connect", { host = host, addr = addr }) end
function H.helo(ctx, name) seen(ctx, "helo", name) end
function H.envfrom(ctx, sender, args) seen(ctx, "envfrom", { sender, args }) end
function H.envrcpt(ctx, rcpt, args) seen(ctx, "envrcpt", { rcpt, args }) end
function H.data(ctx) seen(ctx, "data", select("#", ctx)) end
function H.header(ctx, name, value) seen(ctx, "header", { name, value }) end
function H.eoh(ctx) seen(ctx, "eoh", true) end
function H.body(ctx, chunk) seen(ctx, "body", chunk) end
function H.eom(ctx) seen(ctx, "eom", true) end
function H.abort(ctx) seen(ctx, "abort", true) end
function H.close(ctx) seen(ctx, "close", true) end
function H.unknown(ctx, command) seen(ctx, "unknown", command) end
return H
]]

describe("handler arguments", function()
  local d, c

  before_each(function()
    d = U.start(RECORD_ALL)
    c = U.client(d, U.REPLIES) -- every event answered: each call is seen done
  end)

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  local function reply(r, err)
    assert(r, "no reply: " .. tostring(err))
    return r
  end

  it("negotiates no NO*/NR* bit when every handler is defined (and no NR_HDR/EOH/BODY is offered)", function()
    local P = mc.SMFIP
    for name, bitv in pairs(P) do
      if name:match("^NO") or name:match("^NR_") then
        assert.are.equal(0, U.band(c.neg.protocol, bitv), name .. " must not be requested")
      end
    end
  end)

  it("connect gets host and addr {family='inet', address, port} for family 4", function()
    assert.are.equal("c", reply(c:connect_ev("mx.example.net", "4", 40001, "192.0.2.7")).cmd)
    local got = U.seen(d, "connect")
    assert.are.same({ { host = "mx.example.net",
      addr = { family = "inet", address = "192.0.2.7", port = 40001 } } }, got)
  end)

  it("connect gets family 'inet6' for family 6", function()
    assert.are.equal("c", reply(c:connect_ev("[2001:db8::25]", "6", 12345, "2001:db8::25")).cmd)
    assert.are.same({ { host = "[2001:db8::25]",
      addr = { family = "inet6", address = "2001:db8::25", port = 12345 } } }, U.seen(d, "connect"))
  end)

  it("connect gets family 'unix' with the socket path for family L", function()
    assert.are.equal("c", reply(c:connect_ev("localhost", "L", 0, "/var/run/smtp.sock")).cmd)
    assert.are.same({ { host = "localhost",
      addr = { family = "unix", address = "/var/run/smtp.sock", port = 0 } } }, U.seen(d, "connect"))
  end)

  it("connect gets family 'unknown' for family U", function()
    assert.are.equal("c", reply(c:connect_ev("unknown-host", "U")).cmd)
    local got = U.seen(d, "connect")
    assert.are.equal(1, #got)
    assert.are.equal("unknown-host", got[1].host)
    assert.are.equal("unknown", got[1].addr.family)
  end)

  it("helo gets the HELO argument", function()
    reply(c:connect_ev("h", "4", 1, "192.0.2.1"))
    assert.are.equal("c", reply(c:helo("client.example.org")).cmd)
    assert.are.same({ "client.example.org" }, U.seen(d, "helo"))
  end)

  it("envfrom gets the sender as sent and the ESMTP args as a list", function()
    reply(c:connect_ev("h", "4", 1, "192.0.2.1"))
    reply(c:helo("x"))
    assert.are.equal("c", reply(c:mail("<a@example.org>", { "SIZE=42", "BODY=8BITMIME" })).cmd)
    c:abort()
    assert.are.equal("c", reply(c:mail("<>")).cmd)
    assert.are.same({ { "<a@example.org>", { "SIZE=42", "BODY=8BITMIME" } }, { "<>", {} } },
      U.seen(d, "envfrom"))
  end)

  it("envrcpt is called once per recipient with its args", function()
    reply(c:connect_ev("h", "4", 1, "192.0.2.1"))
    reply(c:mail("<a@example.org>"))
    assert.are.equal("c", reply(c:rcpt("<r1@example.org>", { "NOTIFY=NEVER" })).cmd)
    assert.are.equal("c", reply(c:rcpt("<r2@example.org>")).cmd)
    assert.are.same({ { "<r1@example.org>", { "NOTIFY=NEVER" } }, { "<r2@example.org>", {} } },
      U.seen(d, "envrcpt"))
  end)

  it("data is called with ctx only", function()
    reply(c:connect_ev("h", "4", 1, "192.0.2.1"))
    reply(c:mail("<a@example.org>"))
    reply(c:rcpt("<r@example.org>"))
    assert.are.equal("c", reply(c:data()).cmd)
    assert.are.same({ 1 }, U.seen(d, "data"))
  end)

  it("header gets name and value without the separator space; folds keep LF", function()
    reply(c:connect_ev("h", "4", 1, "192.0.2.1"))
    reply(c:mail("<a@example.org>"))
    reply(c:rcpt("<r@example.org>"))
    reply(c:data())
    -- HDR_LEADSPC: if it was negotiated the MTA keeps the space on the wire,
    -- and the script must still see the value without it
    local sp = U.band(c.neg.protocol, mc.SMFIP.HDR_LEADSPC) ~= 0 and " " or ""
    local sent = {
      { "Subject", "hello world" },
      { "X-Folded", "a folded\n subject line\n\tcontinued with a tab" },
      { "X-Tab", "\tvalue after a tab" },
      { "X-Empty", "" },
    }
    for _, h in ipairs(sent) do
      assert.are.equal("c", reply(c:header(h[1], sp .. h[2])).cmd)
    end
    assert.are.equal("c", reply(c:eoh()).cmd)
    assert.are.same(sent, U.seen(d, "header"))
    assert.are.same({ true }, U.seen(d, "eoh"))
  end)

  it("body is called once per chunk with the chunk's bytes", function()
    reply(c:connect_ev("h", "4", 1, "192.0.2.1"))
    reply(c:mail("<a@example.org>"))
    reply(c:rcpt("<r@example.org>"))
    reply(c:data())
    reply(c:header("Subject", "x"))
    reply(c:eoh())
    assert.are.equal("c", reply(c:body("first line\r\nsec")).cmd)
    assert.are.equal("c", reply(c:body("ond line\r\n\0bin\255\r\n")).cmd)
    assert.are.equal("c", reply(c:eom()).cmd)
    assert.are.same({ "first line\r\nsec", "ond line\r\n\0bin\255\r\n" }, U.seen(d, "body"))
    assert.are.same({ true }, U.seen(d, "eom"))
  end)

  it("unknown gets the command", function()
    reply(c:connect_ev("h", "4", 1, "192.0.2.1"))
    assert.are.equal("c", reply(c:unknown("XFOO")).cmd)
    assert.are.same({ "XFOO" }, U.seen(d, "unknown"))
  end)

  it("abort is called for an abandoned message and close at QUIT", function()
    reply(c:connect_ev("h", "4", 1, "192.0.2.1"))
    reply(c:mail("<a@example.org>"))
    reply(c:rcpt("<r@example.org>"))
    c:abort()
    c:quit()
    assert.are.equal(1, #U.wait_seen(d, "close", 1))
    assert.are.same({ true }, U.seen(d, "abort"))
  end)

  it("close is called once when the MTA just hangs up", function()
    reply(c:connect_ev("h", "4", 1, "192.0.2.1"))
    reply(c:helo("x"))
    c:close(); c = nil
    assert.are.equal(1, #U.wait_seen(d, "close", 1))
    require("socket").sleep(0.1)
    assert.are.equal(1, #U.seen(d, "close"))
  end)

  it("runs the handlers of a full session in protocol order", function()
    local res = c:session {
      mail = "<s@example.org>", rcpts = { "<r@example.org>" },
      headers = { { "Subject", "s" } }, body = "b\r\n",
    }
    assert.are.equal("c", res.eom.cmd)
    c:quit()
    U.wait_seen(d, "close", 1)
    local order = {}
    for line in d:log():gmatch("[^\n]+") do
      local t = line:match(" SEEN (%S+) ")
      if t then order[#order + 1] = t end
    end
    assert.are.same({ "connect", "helo", "envfrom", "envrcpt", "data", "header",
      "eoh", "body", "eom", "close" }, order)
  end)
end)

describe("ctx fields seen by handlers", function()
  local d

  after_each(function()
    if d then d:stop(); d = nil end
  end)

  it("exposes ctx.id (string), client, helo, sender, rcpts, headers and ctx:header", function()
    d = U.start(U.script [[
function H.connect(ctx) seen(ctx, "client", ctx.client); seen(ctx, "idtype", type(ctx.id)) end
function H.eom(ctx)
  seen(ctx, "eom", {
    helo = ctx.helo, sender = ctx.sender, rcpts = ctx.rcpts, headers = ctx.headers,
    subj = ctx:header("subject"), rec2 = ctx:header("RECEIVED", 2),
    rec3 = ctx:header("Received", 3), truncated = ctx.truncated,
  })
end
return H
]])
    local res = U.normal_session(d, {
      connect = { host = "mx.example.net", family = "6", port = 2525, addr = "2001:db8::1" },
      helo = "helo.example.net", mail = "<s@example.org>",
      rcpts = { "<r1@example.org>", "<r2@example.org>" },
      headers = { { "Received", "from a" }, { "Subject", "Hi" }, { "Received", "from b" } },
    })
    assert.are.equal("c", res.eom.cmd)
    assert.are.same({ { host = "mx.example.net", family = "inet6", address = "2001:db8::1",
      port = 2525 } }, U.seen(d, "client"))
    assert.are.same({ "string" }, U.seen(d, "idtype"))
    assert.are.same({ {
      helo = "helo.example.net", sender = "<s@example.org>",
      rcpts = { "<r1@example.org>", "<r2@example.org>" },
      headers = { { "Received", "from a" }, { "Subject", "Hi" }, { "Received", "from b" } },
      subj = "Hi", rec2 = "from b", truncated = false,
    } }, U.seen(d, "eom"))
  end)

  it("ctx.client of a unix socket and of an unknown family", function()
    d = U.start(U.script [[
function H.connect(ctx) seen(ctx, "client", ctx.client) end
return H
]])
    local c = U.client(d, U.REPLIES)
    c:connect_ev("localhost", "L", 0, "/var/run/smtp.sock")
    c:close()
    c = U.client(d, U.REPLIES)
    c:connect_ev("unknown-host", "U")
    c:close()
    U.wait_seen(d, "client", 2, 5)
    assert.are.same({ { host = "localhost", family = "unix", address = "/var/run/smtp.sock", port = 0 },
      { host = "unknown-host", family = "unknown" } }, U.seen(d, "client"))
  end)

  it("--max-body cuts the chunk that crosses the limit and sets ctx.truncated", function()
    d = U.start(U.script [[
function H.body(ctx, chunk) seen(ctx, "body", { chunk, ctx.truncated }) end
function H.eom(ctx) seen(ctx, "eom", ctx.truncated) end
return H
]], { args = { "--max-body", "10" } })
    local c = U.client(d, U.REPLIES)
    c:connect_ev("h", "4", 1, "192.0.2.1")
    c:helo("h")
    c:mail("<a@example.org>")
    c:rcpt("<b@example.org>")
    c:data()
    c:header("Subject", "x")
    c:eoh()
    local r1 = assert(c:body("123456"))
    assert.are.equal("c", r1.cmd)
    local r2 = assert(c:body("7890abcdef"))
    assert.is_truthy(r2.cmd == "c" or r2.cmd == "s")
    if r2.cmd == "c" then assert(c:body("more")) end
    assert.are.equal("c", assert(c:eom()).cmd)
    c:close()
    local bodies = U.seen(d, "body")
    assert.are.equal(2, #bodies)
    assert.are.equal("123456", bodies[1][1])
    assert.are.equal("7890", bodies[2][1])
    assert.are.same({ true }, U.seen(d, "eom"))
  end)

  it("ctx.truncated starts false again with the next message", function()
    d = U.start(U.script [[
function H.body(ctx, chunk) end
function H.eom(ctx) seen(ctx, "eom", { ctx.sender, ctx.truncated }) end
return H
]], { args = { "--max-body", "10" } })
    local c = U.client(d)
    U.open(c)
    assert.are.equal("c", U.message(c, { mail = "<big@example.org>", body = string.rep("x", 100) }).eom.cmd)
    assert.are.equal("c", U.message(c, { mail = "<small@example.org>", body = "tiny\r\n" }).eom.cmd)
    c:close()
    assert.are.same({ { "<big@example.org>", true }, { "<small@example.org>", false } }, U.seen(d, "eom"))
  end)
end)

-- The bridge makes only the arguments a handler declares (a table of ESMTP
-- args costs a table per call): one that takes `...`, or a C function,
-- still gets every argument, and one that declares fewer sees the same
-- values in the parameters it has.
describe("handler arguments a handler declares", function()
  it("`...` and a C function get every argument; fewer parameters see theirs", function()
    local d = U.start(U.script [[
function H.connect(...) seen((...), "connect", { select("#", ...), select(2, ...), (select(3, ...)).family }) end
function H.envfrom(ctx, ...) seen(ctx, "envfrom", { select("#", ...), ... }) end
-- a C function (called once here)
H.envrcpt = coroutine.wrap(function(ctx, rcpt, args) seen(ctx, "envrcpt", { rcpt, args }) end)
function H.header(ctx, name) seen(ctx, "header", { name }) end
function H.eoh(...) seen((...), "eoh", select("#", ...)) end
return H
]])
    finally(function() d:stop() end)
    local c = U.client(d, U.REPLIES)
    assert.are.equal("c", assert(c:connect_ev("mx.example.net", "4", 40001, "192.0.2.7")).cmd)
    assert.are.equal("c", assert(c:mail("<a@example.org>", { "SIZE=42" })).cmd)
    assert.are.equal("c", assert(c:rcpt("<r@example.org>", { "NOTIFY=NEVER" })).cmd)
    assert.are.equal("c", assert(c:header("Subject", "hi")).cmd)
    assert.are.equal("c", assert(c:eoh()).cmd, d:log())
    c:close()
    d:stop()
    assert.is_nil(d:log():find("ERROR"), d:log())
    assert.are.same({ { 3, "mx.example.net", "inet" } }, U.seen(d, "connect"))
    assert.are.same({ { 2, "<a@example.org>", { "SIZE=42" } } }, U.seen(d, "envfrom"))
    assert.are.same({ { "Subject" } }, U.seen(d, "header"))
    assert.are.same({ 1 }, U.seen(d, "eoh"))
    assert.are.same({ { "<r@example.org>", { "NOTIFY=NEVER" } } }, U.seen(d, "envrcpt"))
  end)
end)
