-- luacheck: std +busted
-- Held verdicts: where the MTA offers SMFIP_NR_HDR/NR_EOH/NR_BODY, header,
-- eoh and body run reply-free and their verdict reaches the MTA at the next
-- event it waits on (eom at the latest); elsewhere, a reply per event.
-- Either way the same handlers run and the MTA gets the same reply bytes.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local mc = U.mc
local P = mc.SMFIP
local band = U.band

local OFFERS = {
  { name = "postfix", offer = mc.OFFER.postfix, held = true },
  { name = "sendmail", offer = mc.OFFER.sendmail, held = true },
  { name = "stalwart", offer = mc.OFFER.stalwart, held = false },
  { name = "bare", offer = { 6, 0x1ff, 0 }, held = false },
}

local HELD = P.NR_HDR + P.NR_EOH + P.NR_BODY

-- the verdicts that end a message, and the reply the MTA must get
local VERDICTS = {
  { name = "reject", expr = "milter.reject{ code = 554, xcode = '5.7.1', reason = 'go away' }",
    cmd = "y", text = "554 5.7.1 go away" },
  { name = "plain reject", expr = "milter.reject()", cmd = "r" },
  { name = "tempfail", expr = "milter.tempfail{ code = 452, xcode = '4.2.2', reason = 'full' }",
    cmd = "y", text = "452 4.2.2 full" },
  { name = "discard", expr = "milter.discard()", cmd = "d" },
  { name = "accept", expr = "milter.accept()", cmd = "a" },
}

local BIG = ("x"):rep(70000) .. "\r\n" -- two BODY chunks
local HEADERS = { { "From", "<sender@example.org>" }, { "Subject", "decide" },
  { "To", "<rcpt@example.org>" } }

-- every handler records its calls; `stage` returns expr in the first
-- message of a connection (at the Subject header, or the first chunk)
local function script_for(stage, expr)
  local cond = ({
    header = "name == 'Subject'",
    eoh = "true",
    body = "ctx.msg.chunks == 1",
  })[stage]
  return U.script(([[
local function first(ctx) return ctx.conn.n == 1 end
function H.envfrom(ctx) ctx.conn.n = (ctx.conn.n or 0) + 1; seen(ctx, "envfrom", ctx.conn.n) end
function H.envrcpt(ctx) seen(ctx, "envrcpt", ctx.conn.n) end
function H.header(ctx, name)
  seen(ctx, "header", ctx.conn.n)
  if STAGE == "header" and first(ctx) and COND then return EXPR end
end
function H.eoh(ctx)
  seen(ctx, "eoh", ctx.conn.n)
  if STAGE == "eoh" and first(ctx) and COND then return EXPR end
end
function H.body(ctx)
  ctx.msg.chunks = (ctx.msg.chunks or 0) + 1
  seen(ctx, "body", ctx.conn.n)
  if STAGE == "body" and first(ctx) and COND then return EXPR end
end
function H.eom(ctx)
  seen(ctx, "eom", ctx.conn.n)
  return milter.accept{ add_header = { { "X-Seen", "yes" } } }
end
function H.abort(ctx) seen(ctx, "abort", ctx.conn.n) end
function H.close(ctx) seen(ctx, "close", ctx.conn.n) end
return H
]]):gsub("STAGE", ("%q"):format(stage)):gsub("COND", cond):gsub("EXPR", expr))
end

-- what runs up to and including the deciding handler, and nothing after
local RUNS = {
  header = { envfrom = 1, envrcpt = 1, header = 2, eoh = 0, body = 0, eom = 0, abort = 0 },
  eoh = { envfrom = 1, envrcpt = 1, header = 3, eoh = 1, body = 0, eom = 0, abort = 0 },
  body = { envfrom = 1, envrcpt = 1, header = 3, eoh = 1, body = 1, eom = 0, abort = 0 },
}

local function is_reply(r, cmd) return type(r) == "table" and r.cmd == cmd end

describe("held verdicts", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  for _, o in ipairs(OFFERS) do
    it(o.name .. " offer: header, eoh and body reply-free iff offered", function()
      d = U.start(script_for("header", "nil"))
      c = U.client(d, o.offer)
      assert.are.equal(o.held and HELD or 0, band(c.neg.protocol, HELD),
        ("protocol 0x%x"):format(c.neg.protocol))
    end)
  end

  for _, stage in ipairs({ "header", "eoh", "body" }) do
    for _, v in ipairs(VERDICTS) do
      it(v.name .. " at " .. stage .. ": the right reply at the right event under every offer", function()
        d = U.start(script_for(stage, v.expr))
        for _, o in ipairs(OFFERS) do
          c = U.client(d, o.offer)
          U.open(c)
          local res = U.message(c, { headers = HEADERS, body = BIG })
          assert.is_nil(res.error, o.name)
          local got
          if o.held then
            -- every content event reply-free, the verdict at eom
            for i, r in ipairs(res.headers) do assert.are.equal("noreply", r, o.name .. " header " .. i) end
            assert.are.equal("noreply", res.eoh, o.name .. " eoh")
            for i, r in ipairs(res.body) do assert.are.equal("noreply", r, o.name .. " body " .. i) end
            assert.are.equal(2, #res.body, o.name .. ": the MTA sends the whole body")
            got = res.eom
          else
            -- the reply at the deciding event; the MTA stops there
            local at = stage == "header" and res.headers[2] or stage == "eoh" and res.eoh or res.body[1]
            assert.are.equal(stage == "header" and "headers" or stage, res.stopped, o.name)
            assert.is_nil(res.eom, o.name)
            got = at
          end
          assert.is_true(is_reply(got, v.cmd), o.name .. ": got " ..
            tostring(type(got) == "table" and got.cmd or got))
          assert.are.same({}, got.mods, o.name .. ": no modification")
          if v.text then assert.are.equal(v.text, got.text, o.name) end
          -- the connection's second message is filtered again
          local res2 = U.message(c, { mail = "<second@example.org>" })
          assert.is_true(is_reply(res2.eom, "a"), o.name .. ": second message")
          c:quit()
          c:close()
          c = nil
        end
        assert.are.equal(#OFFERS, #U.wait_seen(d, "close", #OFFERS))
        -- every connection ran the same handlers, whatever the offer
        local log = d:log()
        local per = {}
        for line in log:gmatch("[^\n]+") do
          local cid, tag, n = line:match("c=(%d+).- SEEN (%S+) (%d+)$")
          if cid and n == "1" then
            per[cid] = per[cid] or { envfrom = 0, envrcpt = 0, header = 0, eoh = 0, body = 0,
              eom = 0, abort = 0 }
            if per[cid][tag] then per[cid][tag] = per[cid][tag] + 1 end
          end
        end
        local nconn = 0
        for cid, got in pairs(per) do
          nconn = nconn + 1
          assert.are.same(RUNS[stage], got, "connection " .. cid)
        end
        assert.are.equal(#OFFERS, nconn)
        -- the kept verdict is logged where it was decided, once per held offer
        assert.are.equal(2, #U.lines_with(log, stage .. " verdict " ..
          v.name:match("%a+$") .. " kept"))
        assert.are.equal(0, #U.lines_with(log, "ERROR"))
        assert.is_true(d:alive())
      end)
    end
  end
end)

describe("held verdicts: around them", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  it("skip in a reply-free body: no reply, no more body calls, eom runs", function()
    d = U.start(U.script [[
function H.body(ctx, chunk) seen(ctx, "body", #chunk); return milter.skip() end
function H.eom(ctx) return milter.accept{ add_header = { { "X-Seen", "yes" } } } end
return H
]])
    c = U.client(d)
    assert.are.equal(0, band(c.neg.protocol, P.SKIP), "no SKIP without BODY replies")
    U.open(c)
    local res = U.message(c, { body = ("y"):rep(65535 * 2 + 10) })
    assert.are.same({ "noreply", "noreply", "noreply" }, res.body)
    assert.is_true(is_reply(res.eom, "a"))
    assert.are.same({ { op = "addheader", name = "X-Seen", value = "yes" } }, res.eom.mods)
    assert.are.same({ 65535 }, U.seen(d, "body"))
  end)

  it("skip where BODY is answered: SKIP where negotiated, continue where not", function()
    d = U.start(U.script [[
function H.body(ctx, chunk) seen(ctx, "body", #chunk); return milter.skip() end
return H
]])
    for _, o in ipairs({ { { 6, 0x1ff, 0x1fffff - P.NR_BODY }, "s" }, { mc.OFFER.stalwart, "c" } }) do
      c = U.client(d, o[1])
      U.open(c)
      assert(c:mail("<a@example.org>", {}))
      assert(c:rcpt("<b@example.org>"))
      local r = assert(c:body("chunk"))
      assert.are.equal(o[2], r.cmd)
      c:close()
      c = nil
    end
  end)

  for _, oe in ipairs({
    { "tempfail", "y", "451 4.3.0 Temporary mail filter failure, try again later", 0 },
    { "reject", "y", "550 5.7.1 Rejected by mail filter", 0 },
    { "accept", "a", nil, 0 },
    { "continue", "a", nil, 1 },
  }) do
    it("a header handler that fails reply-free gets --on-error " .. oe[1] .. " at eom", function()
      d = U.start(U.script [[
function H.header(ctx, name) if name == "Subject" then error("boom") end end
function H.eom(ctx) seen(ctx, "eom", true); return milter.accept() end
return H
]], { args = { "--on-error", oe[1] } })
      c = U.client(d)
      U.open(c)
      local res = U.message(c, { headers = HEADERS })
      assert.are.same({ "noreply", "noreply", "noreply" }, res.headers)
      assert.are.equal(oe[2], res.eom.cmd)
      if oe[3] then assert.are.equal(oe[3], res.eom.text) end
      assert.are.equal(oe[4], #U.seen(d, "eom"))
      -- the error is logged at the header, not at eom
      local log = U.wait_log(d, "handler header failed")
      assert.are.equal(1, #U.lines_with(log, "handler header failed"))
    end)
  end

  it("ABORT between a kept verdict and eom: no abort handler, the next message is fresh", function()
    d = U.start(U.script [[
function H.header(ctx, name, value) if value == "bad" then return milter.reject() end end
function H.abort(ctx) seen(ctx, "abort", true) end
function H.eom(ctx) seen(ctx, "eom", ctx:header("Subject")); return milter.accept() end
return H
]])
    c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>", {}))
    assert(c:rcpt("<b@example.org>"))
    assert(c:data({ { "i", "Q1" } }))
    assert.are.equal("noreply", c:header("Subject", "bad"))
    assert.are.equal("noreply", c:header("To", "x"))
    c:abort() -- the client went away mid-DATA
    local res = U.message(c, { headers = { { "Subject", "good" } } })
    assert.is_true(is_reply(res.eom, "a"))
    assert.are.same({ "good" }, U.seen(d, "eom"))
    assert.are.same({}, U.seen(d, "abort"))
  end)

  it("a reply-free header that waits on a lookup: its verdict still reaches eom", function()
    d = U.start(U.script [[
function H.header(ctx, name)
  if name == "Subject" then milter.sleep(0.2); return milter.tempfail{ reason = "later" } end
end
function H.eom(ctx) seen(ctx, "eom", true); return milter.accept() end
return H
]])
    c = U.client(d)
    U.open(c)
    local res = U.message(c, { headers = HEADERS })
    assert.are.equal("y", res.eom.cmd)
    assert.are.equal("451 4.7.1 later", res.eom.text)
    assert.are.same({}, U.seen(d, "eom"))
    local res2 = U.message(c, { headers = { { "X", "y" } } })
    assert.is_true(is_reply(res2.eom, "a"))
  end)

  it("while a reply-free handler waits and eom is pending, progress packets flow", function()
    d = U.start(U.script [[
function H.header(ctx, name)
  if name == "Subject" then milter.sleep(4.5) end -- progress every 3 s: 1.5 s to spare
end
function H.eom(ctx) return milter.accept() end
return H
]])
    c = U.client(d)
    U.open(c)
    local res = U.message(c, { headers = HEADERS })
    assert.are.equal("a", res.eom.cmd)
    local progress = 0
    for _, f in ipairs(res.eom.frames) do if f.cmd == "p" then progress = progress + 1 end end
    assert.is_true(progress >= 1, "progress packets: " .. progress)
  end)
end)
