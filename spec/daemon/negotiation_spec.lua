-- luacheck: std +busted
-- OPTNEG: what the server asks each MTA for, and full sessions under each offer.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local mc = U.mc
local P, F = mc.SMFIP, mc.SMFIF
local band, bnot = U.band, U.bnot

local ALL = U.script [[
function H.connect(ctx) end
function H.helo(ctx) end
function H.envfrom(ctx) end
function H.envrcpt(ctx) end
function H.data(ctx) end
function H.header(ctx) end
function H.eoh(ctx) end
function H.body(ctx) end
function H.eom(ctx) return milter.accept{ add_header = { { "X-Seen", "yes" } } } end
function H.abort(ctx) end
function H.close(ctx) end
function H.unknown(ctx) end
return H
]]

local function only(...)
  local src = {}
  for _, h in ipairs({ ... }) do src[#src + 1] = ("function H.%s(ctx) end"):format(h) end
  src[#src + 1] = "return H"
  return U.script(table.concat(src, "\n") .. "\n")
end

local OFFERS = { "postfix", "sendmail", "stalwart", "stalwart2", "postfix2" }

local function has(v, b) return band(v, b) ~= 0 end

-- the invariants every answer must keep
local function check_common(offer, neg)
  local ver, act, proto = offer[1], offer[2], offer[3]
  assert.are.equal(math.min(6, ver), neg.version, "version")
  assert.are.equal(0, band(neg.actions, bnot(act)), ("actions 0x%x not within offered 0x%x")
    :format(neg.actions, act))
  assert.are.equal(0, band(neg.protocol, bnot(proto)), ("protocol 0x%x not within offered 0x%x")
    :format(neg.protocol, proto))
end

describe("OPTNEG reply", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  for _, name in ipairs(OFFERS) do
    local offer = mc.OFFER[name]

    it(name .. " offer, script with every handler: nothing suppressed, every action offered", function()
      d = U.start(ALL)
      c = U.client(d, offer)
      local neg = c.neg
      check_common(offer, neg)
      assert.are.equal(band(offer[2], 0xff), band(neg.actions, 0xff), "modification actions")
      -- header, eoh and body verdicts are held: reply-free iff offered
      local held = { NR_HDR = true, NOHREPL = true, NR_EOH = true, NR_BODY = true }
      for bname, b in pairs(P) do
        if held[bname] then
          assert.are.equal(has(offer[3], b), has(neg.protocol, b), bname .. " iff offered")
        elseif bname:match("^NO") or bname:match("^NR_") then
          assert.is_false(has(neg.protocol, b), bname .. " must not be requested")
        end
      end
      -- SKIP answers a BODY: only where body chunks are answered
      assert.are.equal(has(offer[3], P.SKIP) and not has(offer[3], P.NR_BODY),
        has(neg.protocol, P.SKIP), "SKIP iff offered and BODY answered")
    end)

    it(name .. " offer, eom-only script: no event it cannot observe, no reply it does not use", function()
      d = U.start(only("eom"))
      c = U.client(d, offer)
      local neg, proto = c.neg, offer[3]
      check_common(offer, neg)
      assert.are.equal(band(offer[2], 0xff), band(neg.actions, 0xff), "modification actions")
      -- ctx.client/helo/sender/rcpts/headers must be complete in eom
      for _, b in ipairs({ "NOCONNECT", "NOHELO", "NOMAIL", "NORCPT", "NOHDRS" }) do
        assert.is_false(has(neg.protocol, P[b]), b .. " must not be requested")
      end
      -- not observable: ask them away where the MTA allows it
      for _, b in ipairs({ "NOBODY", "NOEOH", "NODATA", "NOUNKNOWN" }) do
        assert.are.equal(has(proto, P[b]), has(neg.protocol, P[b]), b .. " iff offered")
      end
      -- received but not handled: no reply where the MTA allows it
      for _, b in ipairs({ "NR_CONN", "NR_HELO", "NR_MAIL", "NR_RCPT", "NR_HDR" }) do
        assert.are.equal(has(proto, P[b]), has(neg.protocol, P[b]), b .. " iff offered")
      end
      assert.is_false(has(neg.protocol, P.SKIP), "no SKIP without a body handler")
    end)
  end

  it("script without eom requests no action at all", function()
    d = U.start(only("connect", "helo", "envfrom", "envrcpt", "header", "body"))
    c = U.client(d)
    assert.are.equal(0, c.neg.actions)
  end)

  it("envrcpt-only script: later events suppressed, earlier ones reply-free", function()
    d = U.start(only("envrcpt"))
    c = U.client(d)
    local p = c.neg.protocol
    for _, b in ipairs({ "NODATA", "NOHDRS", "NOEOH", "NOBODY", "NOUNKNOWN", "NR_CONN", "NR_HELO",
        "NR_MAIL" }) do
      assert.is_true(has(p, P[b]), b .. " expected")
    end
    for _, b in ipairs({ "NOCONNECT", "NOHELO", "NOMAIL", "NORCPT", "NR_RCPT", "SKIP" }) do
      assert.is_false(has(p, P[b]), b .. " not expected")
    end
    assert.are.equal(0, c.neg.actions)
  end)

  it("header-only script: headers reply-free (verdict held), EOH/BODY/DATA suppressed", function()
    d = U.start(only("header"))
    c = U.client(d)
    local p = c.neg.protocol
    for _, b in ipairs({ "NOEOH", "NOBODY", "NODATA", "NOUNKNOWN", "NR_HDR" }) do
      assert.is_true(has(p, P[b]), b .. " expected")
    end
    for _, b in ipairs({ "NOHDRS", "NOMAIL", "NORCPT" }) do
      assert.is_false(has(p, P[b]), b .. " not expected")
    end
  end)

  it("header-only script behind Stalwart: headers answered", function()
    d = U.start(only("header"))
    c = U.client(d, mc.OFFER.stalwart)
    assert.is_false(has(c.neg.protocol, P.NR_HDR), "NR_HDR not offered")
    assert.is_false(has(c.neg.protocol, P.NOHDRS), "NOHDRS")
  end)

  it("body-only script: body and headers reply-free, no SKIP", function()
    d = U.start(only("body"))
    c = U.client(d)
    local p = c.neg.protocol
    assert.is_false(has(p, P.SKIP), "SKIP: no BODY is answered")
    assert.is_true(has(p, P.NR_HDR), "NR_HDR")
    assert.is_false(has(p, P.NOHDRS), "NOHDRS")
    assert.is_false(has(p, P.NOBODY), "NOBODY")
    assert.is_true(has(p, P.NR_BODY), "NR_BODY")
    assert.is_true(has(p, P.NOEOH), "NOEOH")
  end)

  it("body-only script, an offer without NR_BODY: SKIP requested, body answered", function()
    d = U.start(only("body"))
    c = U.client(d, { 6, 0x1ff, band(0x1fffff, bnot(P.NR_BODY)) })
    local p = c.neg.protocol
    assert.is_true(has(p, P.SKIP), "SKIP")
    assert.is_false(has(p, P.NR_BODY), "NR_BODY")
  end)

  it("unknown-only script: UNKNOWN answered, not suppressed", function()
    d = U.start(only("unknown"))
    c = U.client(d)
    assert.is_false(has(c.neg.protocol, P.NOUNKNOWN))
    assert.is_false(has(c.neg.protocol, P.NR_UNKN))
  end)

  it("eom-only script behind Postfix asks exactly NO{DATA,EOH,BODY,UNKNOWN} + NR_{CONN,HELO,MAIL,RCPT,HDR}", function()
    d = U.start(only("eom"))
    c = U.client(d)
    local want = P.NODATA + P.NOEOH + P.NOBODY + P.NOUNKNOWN + P.NR_CONN + P.NR_HELO
      + P.NR_MAIL + P.NR_RCPT + P.NR_HDR
    assert.are.equal(("0x%x"):format(want), ("0x%x"):format(c.neg.protocol))
  end)

  for _, v in ipairs({ 3, 4, 5, 7, 255 }) do
    it("offered version " .. v .. " gets min(6, " .. v .. ")", function()
      d = U.start(ALL)
      c = assert(d:client())
      local neg = assert(c:optneg(v, 0x1ff, 0x1fffff))
      assert.are.equal(math.min(6, v), neg.version)
    end)
  end

  it("never asks for an action the MTA did not offer", function()
    d = U.start(ALL)
    c = assert(d:client())
    local neg = assert(c:optneg(6, F.ADDHDRS + F.CHGHDRS, 0x1fffff))
    assert.are.equal(0, band(neg.actions, bnot(F.ADDHDRS + F.CHGHDRS)))
  end)

  it("never asks for a protocol bit the MTA did not offer (offer 0)", function()
    d = U.start(only("eom"))
    c = assert(d:client())
    local neg = assert(c:optneg(6, 0x1ff, 0))
    assert.are.equal(0, neg.protocol)
  end)

  it("refuses an MTA offering version 1 (closes the connection)", function()
    d = U.start(ALL)
    c = assert(d:client())
    assert(c:send("O", mc.u32(1) .. mc.u32(0xf) .. mc.u32(0x3f)))
    local err = U.read_until_closed(c, 3)
    assert.is_truthy(err == "closed" or tostring(err):find("reset"), "got " .. tostring(err))
  end)
end)

describe("a full session under each offer", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  local function is_reply(r, cmd) return type(r) == "table" and r.cmd == cmd end

  for _, name in ipairs(OFFERS) do
    local offer = mc.OFFER[name]
    it(name .. ": every handler script, every event answered 'c' or held, eom modifies", function()
      d = U.start(ALL)
      c = U.client(d, offer)
      local res = c:session { rcpts = { "<r1@example.org>", "<r2@example.org>" }, body = "body\r\n" }
      assert.is_nil(res.error)
      for _, st in ipairs({ "connect", "helo", "mail" }) do
        assert.is_true(is_reply(res[st], "c"), st .. ": " .. tostring(res[st]))
      end
      for i, r in ipairs(res.rcpts) do assert.is_true(is_reply(r, "c"), "rcpt " .. i) end
      if offer[1] >= 4 then assert.is_true(is_reply(res.data, "c"), "data") end
      -- header, eoh and body: reply-free where offered, 'c' elsewhere
      local function held(r, bit, what)
        if has(offer[3], bit) then assert.are.equal("noreply", r, what)
        else assert.is_true(is_reply(r, "c"), what) end
      end
      for i, r in ipairs(res.headers) do held(r, P.NR_HDR, "header " .. i) end
      held(res.eoh, P.NR_EOH, "eoh")
      for i, r in ipairs(res.body) do held(r, P.NR_BODY, "body " .. i) end
      assert.are.equal("a", res.eom.cmd)
      assert.are.same({ { op = "addheader", name = "X-Seen", value = "yes" } }, res.eom.mods)
    end)

    it(name .. ": eom-only script, ctx complete at eom", function()
      d = U.start(U.script [[
function H.eom(ctx)
  return milter.accept{ add_header = { { "X-Env", table.concat({ ctx.client.host, ctx.helo or "-",
    ctx.sender, table.concat(ctx.rcpts, ","), #ctx.headers, ctx:header("Subject") }, "|") } } }
end
return H
]])
      c = U.client(d, offer)
      local res = c:session { helo = "helo.example.org", mail = "<s@example.org>",
        rcpts = { "<r1@example.org>", "<r2@example.org>" },
        headers = { { "From", "f" }, { "Subject", "subj" } } }
      assert.is_nil(res.error)
      -- whatever can be answered must be 'c' (Stalwart cannot suppress replies)
      for _, st in ipairs({ "connect", "helo", "mail", "data", "eoh" }) do
        local r = res[st]
        assert.is_true(r == nil or r == "noreply" or r == "skipped" or is_reply(r, "c"),
          st .. ": " .. tostring(type(r) == "table" and r.cmd or r))
      end
      for _, list in ipairs({ res.rcpts, res.headers, res.body }) do
        for _, r in ipairs(list) do
          assert.is_true(r == "noreply" or r == "skipped" or is_reply(r, "c"))
        end
      end
      if not has(offer[3], P.NR_CONN) then assert.is_true(is_reply(res.connect, "c"), "connect") end
      if not has(offer[3], P.NR_MAIL) then assert.is_true(is_reply(res.mail, "c"), "mail") end
      if not has(offer[3], P.NOBODY) then assert.is_true(is_reply(res.body[1], "c"), "body") end
      assert.are.equal("a", res.eom.cmd)
      assert.are.same({ { op = "addheader", name = "X-Env",
        value = "client.example.org|helo.example.org|<s@example.org>|<r1@example.org>,<r2@example.org>|2|subj" } },
        res.eom.mods)
    end)
  end
end)
