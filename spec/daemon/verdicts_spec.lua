-- luacheck: std +busted
-- Every verdict at every stage where it is legal, and the replies' bytes.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local mc = U.mc

local HANDLERS = { "connect", "helo", "envfrom", "envrcpt", "data", "header", "eoh",
  "body", "eom", "unknown" }

-- a script where every handler records its call; `stage` returns expr, but
-- (for message stages) only in the first message of the connection
local function script_for(stage, expr)
  local out = { "local function first(ctx) return (ctx.conn.n or 0) <= 1 end" }
  for _, h in ipairs(HANDLERS) do
    local pre = h == "envfrom" and "ctx.conn.n = (ctx.conn.n or 0) + 1; " or ""
    if h == stage then
      out[#out + 1] = ("function H.%s(ctx) %sseen(ctx, %q, true); if first(ctx) then return %s end end")
        :format(h, pre, h, expr)
    else
      out[#out + 1] = ("function H.%s(ctx) %sseen(ctx, %q, true) end"):format(h, pre, h)
    end
  end
  out[#out + 1] = 'function H.abort(ctx) seen(ctx, "abort", true) end'
  out[#out + 1] = 'function H.close(ctx) seen(ctx, "close", true) end'
  out[#out + 1] = "return H"
  return U.script(table.concat(out, "\n") .. "\n")
end

local SEND = {
  connect = function(c)
    return c:connect_ev("client.example.org", "4", 40000, "192.0.2.1",
      { { "j", "mta.example.org" }, { "v", "Postfix 3.7.11" } })
  end,
  helo = function(c) return c:helo("client.example.org") end,
  envfrom = function(c, n) return c:mail("<sender" .. (n or 1) .. "@example.org>", {}) end,
  envrcpt = function(c) return c:rcpt("<rcpt@example.org>") end,
  data = function(c) return c:data({ { "i", "QID1" } }) end,
  header = function(c) return c:header("Subject", "hello") end,
  eoh = function(c) return c:eoh() end,
  body = function(c) return c:body("Hello.\r\n") end,
  eom = function(c) return c:eom() end,
  unknown = function(c) return c:unknown("XFOO") end,
}
local ORDER = { "connect", "helo", "envfrom", "envrcpt", "data", "header", "eoh", "body", "eom" }

-- sends events up to target (all earlier ones must get 'c'); returns the
-- target's reply
local function drive(c, target)
  local order = ORDER
  if target == "unknown" then order = { "connect", "helo", "unknown" } end
  for _, st in ipairs(order) do
    local r, err = SEND[st](c)
    assert(type(r) == "table", st .. ": no reply (" .. tostring(r) .. ", " .. tostring(err) .. ")")
    if st == target then return r end
    assert.are.equal("c", r.cmd, "reply to " .. st)
  end
end

-- a second, normal message on the same connection gets 'c' everywhere
local function next_message_ok(c)
  c:abort()
  for _, st in ipairs({ "envfrom", "envrcpt", "data", "header", "eoh", "body", "eom" }) do
    local r, err = SEND[st](c, 2)
    assert(type(r) == "table", st .. ": no reply (" .. tostring(err) .. ")")
    assert.are.equal("c", r.cmd, "second message, reply to " .. st)
  end
end

local VERDICTS = {
  { name = "nil", expr = "nil", cmd = "c" },
  { name = "milter.continue()", expr = "milter.continue()", cmd = "c" },
  { name = "{action='continue'}", expr = "{ action = 'continue' }", cmd = "c" },
  { name = "accept", expr = "milter.accept()", cmd = "a" },
  { name = "accept{}", expr = "milter.accept{}", cmd = "a" },
  { name = "reject", expr = "milter.reject()", cmd = "r" },
  { name = "reject custom", expr = "milter.reject{ code = 554, xcode = '5.7.1', reason = 'go away' }",
    cmd = "y", text = "554 5.7.1 go away" },
  { name = "tempfail", expr = "milter.tempfail()", cmd = "t" },
  { name = "tempfail custom", expr = "milter.tempfail{ code = 452, xcode = '4.2.2', reason = 'full' }",
    cmd = "y", text = "452 4.2.2 full" },
  { name = "discard", expr = "milter.discard()", cmd = "d", from_envfrom = true },
  { name = "discard{}", expr = "milter.discard{}", cmd = "d", from_envfrom = true },
  { name = "skip", expr = "milter.skip()", cmd = "s", body_only = true },
}

local MSG_STAGE = { envfrom = true, envrcpt = true, data = true, header = true, eoh = true,
  body = true, eom = true }

describe("verdicts at every legal stage", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  for _, stage in ipairs(HANDLERS) do
    for _, v in ipairs(VERDICTS) do
      local legal = true
      if v.from_envfrom and not MSG_STAGE[stage] then legal = false end
      if v.body_only and stage ~= "body" then legal = false end
      if stage == "unknown" and (v.cmd == "a" or v.cmd == "d") then legal = false end
      if legal then
        it(stage .. " returning " .. v.name .. " sends '" .. v.cmd .. "'", function()
          d = U.start(script_for(stage, v.expr))
          c = U.client(d, U.REPLIES)
          local r = drive(c, stage)
          assert.are.equal(v.cmd, r.cmd)
          assert.are.same({}, r.mods)
          if v.text then assert.are.equal(v.text, r.text) end
          if MSG_STAGE[stage] and stage ~= "envrcpt" and v.cmd ~= "c" and v.cmd ~= "s" then
            next_message_ok(c)
            assert.are.equal(2, #U.seen(d, "envfrom"))
          end
          assert.is_true(d:alive())
        end)
      end
    end
  end
end)

describe("message and connection level verdicts", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  it("reject at envrcpt applies to that recipient only; ctx.rcpts keeps the others", function()
    d = U.start(U.script [[
function H.envrcpt(ctx, rcpt)
  if rcpt == "<bad@example.org>" then
    return milter.reject{ code = 550, xcode = "5.1.1", reason = "no such user" }
  elseif rcpt == "<later@example.org>" then
    return milter.tempfail()
  elseif rcpt == "<plain@example.org>" then
    return milter.reject()
  end
end
function H.eom(ctx) seen(ctx, "rcpts", ctx.rcpts) end
return H
]])
    c = U.client(d)
    local res = c:session {
      rcpts = { "<good1@example.org>", "<bad@example.org>", "<later@example.org>",
        "<good2@example.org>", "<plain@example.org>", "<good3@example.org>" },
    }
    assert.are.equal("c", res.rcpts[1].cmd)
    assert.are.equal("y", res.rcpts[2].cmd)
    assert.are.equal("550 5.1.1 no such user", res.rcpts[2].text)
    assert.are.equal("t", res.rcpts[3].cmd)
    assert.are.equal("c", res.rcpts[4].cmd)
    assert.are.equal("r", res.rcpts[5].cmd)
    assert.are.equal("c", res.rcpts[6].cmd)
    assert.are.equal("c", res.eom.cmd)
    assert.are.same({ { "<good1@example.org>", "<good2@example.org>", "<good3@example.org>" } },
      U.seen(d, "rcpts"))
  end)

  it("ctx.rcpts read in envrcpt still drops a rejected recipient", function()
    d = U.start(U.script [[
function H.envrcpt(ctx, rcpt)
  seen(ctx, "now", ctx.rcpts)
  if rcpt:match("^<bad") then return milter.reject() end
end
function H.eom(ctx) seen(ctx, "rcpts", ctx.rcpts) end
return H
]])
    c = U.client(d)
    local res = c:session { rcpts = { "<a@example.org>", "<bad1@example.org>", "<b@example.org>",
      "<bad2@example.org>", "<c@example.org>" } }
    assert.are.equal("c", res.eom.cmd)
    assert.are.same({ { "<a@example.org>", "<b@example.org>", "<c@example.org>" } },
      U.seen(d, "rcpts"))
    local now = U.seen(d, "now")
    assert.are.same({ "<a@example.org>" }, now[1])
    assert.are.same({ "<a@example.org>", "<b@example.org>" }, now[3])
    assert.are.same({ "<a@example.org>", "<b@example.org>", "<c@example.org>" }, now[5])
  end)

  it("after a message-level reject the same connection serves the next message", function()
    d = U.start(U.script [[
function H.envfrom(ctx, sender)
  if sender == "<spammer@example.org>" then return milter.reject{ reason = "go away" } end
end
function H.header(ctx, name, value)
  if value == "bad" then return milter.reject() end
end
function H.eom(ctx) seen(ctx, "eom", { ctx.sender, ctx.headers }) end
return H
]])
    c = U.client(d)
    U.open(c)
    local r1 = U.message(c, { mail = "<spammer@example.org>" })
    assert.are.equal("y", r1.mail.cmd)
    assert.are.equal("mail", r1.stopped)
    local r2 = U.message(c, { headers = { { "Subject", "bad" } } })
    assert.are.equal("noreply", r2.headers[1]) -- held: Postfix gets it at eom
    assert.are.equal("r", r2.eom.cmd)
    local r3 = U.message(c, { mail = "<ok@example.org>", headers = { { "Subject", "fine" } } })
    assert.are.equal("c", r3.eom.cmd)
    assert.are.same({ { "<ok@example.org>", { { "Subject", "fine" } } } }, U.seen(d, "eom"))
  end)

  it("accept at envfrom ends filtering of that message only", function()
    d = U.start(U.script [[
function H.envfrom(ctx, sender)
  seen(ctx, "envfrom", sender)
  if sender == "<trusted@example.org>" then return milter.accept() end
end
function H.envrcpt(ctx, rcpt) seen(ctx, "envrcpt", rcpt) end
function H.eom(ctx) seen(ctx, "eom", ctx.sender) end
return H
]])
    c = U.client(d)
    U.open(c)
    local r1 = U.message(c, { mail = "<trusted@example.org>", rcpts = { "<r1@example.org>" } })
    assert.are.equal("a", r1.mail.cmd)
    local r2 = U.message(c, { mail = "<other@example.org>", rcpts = { "<r2@example.org>" } })
    assert.are.equal("c", r2.eom.cmd)
    assert.are.same({ "<trusted@example.org>", "<other@example.org>" }, U.seen(d, "envfrom"))
    assert.are.same({ "<r2@example.org>" }, U.seen(d, "envrcpt"))
    assert.are.same({ "<other@example.org>" }, U.seen(d, "eom"))
  end)

  it("accept at connect stops filtering the connection", function()
    d = U.start(U.script [[
function H.connect(ctx) return milter.accept() end
function H.helo(ctx, name) seen(ctx, "helo", name) end
function H.envfrom(ctx, sender) seen(ctx, "envfrom", sender) end
function H.eom(ctx) seen(ctx, "eom", true) end
function H.close(ctx) seen(ctx, "close", true) end
return H
]])
    c = U.client(d)
    local r = assert(c:connect_ev("h", "4", 1, "192.0.2.1"))
    assert.are.equal("a", r.cmd)
    -- an MTA that keeps talking anyway must not reach the handlers
    c:helo("x")
    c:mail("<a@example.org>")
    c:quit()
    assert.are.equal(1, #U.wait_seen(d, "close", 1))
    assert.are.same({}, U.seen(d, "helo"))
    assert.are.same({}, U.seen(d, "envfrom"))
  end)

  it("skip is 's' with SMFIP_SKIP and no more body calls follow", function()
    d = U.start(U.script [[
function H.body(ctx, chunk) seen(ctx, "body", chunk); return milter.skip() end
function H.eom(ctx) seen(ctx, "eom", true) end
return H
]])
    c = U.client(d, U.REPLIES)
    assert.are_not.equal(0, U.band(c.neg.protocol, mc.SMFIP.SKIP), "SKIP negotiated")
    local res = c:session { body = "chunk1" }
    assert.are.equal("s", res.body[1].cmd)
    assert.are.equal("c", res.eom.cmd)
    assert.are.same({ "chunk1" }, U.seen(d, "body"))
  end)

  it("skip is 'c' without SMFIP_SKIP and later chunks do not reach body", function()
    d = U.start(U.script [[
function H.body(ctx, chunk) seen(ctx, "body", chunk); return milter.skip() end
function H.eom(ctx) seen(ctx, "eom", true) end
return H
]])
    c = assert(d:client())
    local neg = assert(c:optneg(6, 0x1ff, U.REPLIES[3] - mc.SMFIP.SKIP))
    assert.are.equal(0, U.band(neg.protocol, mc.SMFIP.SKIP))
    assert(c:connect_ev("h", "4", 1, "192.0.2.1"))
    assert(c:helo("h"))
    assert(c:mail("<a@example.org>"))
    assert(c:rcpt("<b@example.org>"))
    assert(c:data())
    assert(c:header("Subject", "x"))
    assert(c:eoh())
    for i = 1, 3 do
      local r = assert(c:body("chunk" .. i))
      assert.are.equal("c", r.cmd, "reply to body chunk " .. i)
    end
    assert.are.equal("c", assert(c:eom()).cmd)
    assert.are.same({ "chunk1" }, U.seen(d, "body"))
    assert.are.same({ true }, U.seen(d, "eom"))
  end)

  it("skip under a version-2 offer (no SKIP bit) is 'c'", function()
    d = U.start(U.script [[
function H.body(ctx, chunk) seen(ctx, "body", #chunk); return milter.skip() end
function H.eom(ctx) seen(ctx, "eom", true) end
return H
]])
    c = U.client(d, mc.OFFER.postfix2)
    local res = c:session { body = string.rep("x", 70000) }
    assert.are.equal("c", res.body[1].cmd)
    assert.are.equal("c", res.body[2].cmd)
    assert.are.equal("c", res.eom.cmd)
    assert.are.equal(1, #U.seen(d, "body"))
  end)
end)

describe("custom reply text", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  local function reply_of(expr, stage)
    stage = stage or "envfrom"
    d = U.start(script_for(stage, expr))
    c = U.client(d, U.REPLIES)
    return drive(c, stage)
  end

  it("code + xcode + reason", function()
    local r = reply_of("milter.reject{ code = 553, xcode = '5.1.8', reason = 'bad sender domain' }")
    assert.are.equal("y", r.cmd)
    assert.are.equal("553 5.1.8 bad sender domain", r.text)
  end)

  it("a plain table verdict works like the constructor", function()
    local r = reply_of("{ action = 'reject', code = 551, xcode = '5.1.6', reason = 'moved' }")
    assert.are.equal("y", r.cmd)
    assert.are.equal("551 5.1.6 moved", r.text)
  end)

  it("reason alone means 550 for reject", function()
    local r = reply_of("milter.reject{ reason = 'no thanks' }")
    assert.are.equal("y", r.cmd)
    assert.are.equal("550 ", r.text:sub(1, 4))
    assert.are.equal("no thanks", r.text:sub(-9))
  end)

  it("reason alone means 451 for tempfail", function()
    local r = reply_of("milter.tempfail{ reason = 'busy' }")
    assert.are.equal("y", r.cmd)
    assert.are.equal("451 ", r.text:sub(1, 4))
    assert.are.equal("busy", r.text:sub(-4))
  end)

  it("xcode alone gives a 550 reply carrying it", function()
    local r = reply_of("milter.reject{ xcode = '5.7.26' }")
    assert.are.equal("y", r.cmd)
    assert.are.equal("550 5.7.26 ", r.text:sub(1, 11))
  end)

  it("multi-line reason gives ddd-/ddd lines joined by CRLF", function()
    local r = reply_of("milter.reject{ code = 550, xcode = '5.7.1', "
      .. "reason = { 'line one', 'line two', 'line three' } }")
    assert.are.equal("y", r.cmd)
    assert.are.equal("550-5.7.1 line one\r\n550-5.7.1 line two\r\n550 5.7.1 line three", r.text)
  end)

  it("multi-line tempfail", function()
    local r = reply_of("milter.tempfail{ code = 450, xcode = '4.2.0', reason = { 'a', 'b' } }")
    assert.are.equal("450-4.2.0 a\r\n450 4.2.0 b", r.text)
  end)

  it("multi-line reason without xcode gets 5.7.1 on every line", function()
    local r = reply_of("milter.reject{ code = 554, reason = { 'first', 'second' } }")
    assert.are.equal("554-5.7.1 first\r\n554 5.7.1 second", r.text)
  end)

  it("32 lines are allowed", function()
    local r = reply_of([[(function()
  local t = {}
  for i = 1, 32 do t[i] = "line " .. i end
  return milter.reject{ code = 550, xcode = "5.7.1", reason = t }
end)()]])
    assert.are.equal("y", r.cmd)
    local lines = {}
    for i = 1, 32 do lines[i] = "line " .. i end
    assert.are.equal(U.mlreply(550, "5.7.1", lines), r.text)
  end)

  it("'%' in the reason is sent as '%%'", function()
    local r = reply_of("milter.reject{ code = 550, xcode = '5.7.1', reason = '100% spam, 5%s' }")
    assert.are.equal("550 5.7.1 100%% spam, 5%%s", r.text)
  end)

  it("'%' in every line of a multi-line reason is escaped", function()
    local r = reply_of("milter.tempfail{ code = 451, xcode = '4.7.1', reason = { '50% full', '%' } }")
    assert.are.equal("451-4.7.1 50%% full\r\n451 4.7.1 %%", r.text)
  end)

  it("tempfail with code 421", function()
    local r = reply_of("milter.tempfail{ code = 421, xcode = '4.7.0', reason = 'closing' }")
    assert.are.equal("y", r.cmd)
    assert.are.equal("421 4.7.0 closing", r.text)
  end)

  it("tempfail 421 at connect", function()
    local r = reply_of("milter.tempfail{ code = 421, reason = 'go away' }", "connect")
    assert.are.equal("y", r.cmd)
    assert.are.equal("421 ", r.text:sub(1, 4))
    assert.are.equal("go away", r.text:sub(-7))
  end)

  it("custom reject at eom", function()
    local r = reply_of("milter.reject{ code = 550, xcode = '5.7.0', reason = 'spam detected' }", "eom")
    assert.are.equal("y", r.cmd)
    assert.are.equal("550 5.7.0 spam detected", r.text)
    assert.are.same({}, r.mods)
  end)

  it("custom reject at unknown", function()
    local r = reply_of("milter.reject{ code = 502, xcode = '5.5.2', reason = 'not here' }", "unknown")
    assert.are.equal("502 5.5.2 not here", r.text)
  end)
end)
