-- luacheck: std +busted
-- headers = {...} in the eom verdict: the whole header list the message
-- should end up with; the server sends the fewest packets, in the MTA's
-- own counting (Postfix §7, Sendmail §13b), and nothing for an equal list.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local mc = U.mc

local SENDMAIL = { cmacros = { { "j", "mta.example.org" }, { "_", "client [192.0.2.1]" },
  { "{daemon_name}", "MTA" }, { "{if_name}", "localhost" } }, offer = mc.OFFER.sendmail }
local HEADERS = { { "From", "<sender@example.org>" }, { "To", "<rcpt@example.org>" },
  { "X-Internal", "secret" }, { "Subject", "hello" }, { "X-Dup", "1" }, { "X-Dup", "2" } }
local A = 0x7fffffff

describe("header lists (headers = {...} at eom)", function()
  local d, c
  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  -- runs one message; body is the eom handler's body (h: a copy of
  -- ctx.headers). Returns the eom reply.
  local function eom(body, opts)
    opts = opts or {}
    d = U.start(U.script(([[function H.eom(ctx)
  local h = {}
  for i, x in ipairs(ctx.headers) do h[i] = { x[1], x[2] } end
  %s
end
return H
]]):format(body)))
    c = U.client(d, opts.offer)
    U.open(c, { cmacros = opts.cmacros })
    local res = U.message(c, { headers = opts.headers or HEADERS })
    assert(type(res.eom) == "table", "no eom reply: " .. tostring(res.error) .. "\n" .. d:log())
    return res.eom
  end

  it("an equal list sends no packets at all, then the final reply", function()
    local r = eom("return milter.accept{ headers = h }")
    assert.are.same({}, r.mods)
    assert.are.equal("a", r.cmd)
    assert.are.equal(1, #r.frames)
  end)

  it("an equal list sends nothing on Sendmail either", function()
    local r = eom("return milter.continue{ headers = h }", SENDMAIL)
    assert.are.same({}, r.mods)
    assert.are.equal("c", r.cmd)
  end)

  it("the README's example on Postfix: one delete, one insert under the hidden Received:", function()
    local r = eom([[
  local out = {}
  for _, x in ipairs(h) do if x[1]:lower() ~= "x-internal" then out[#out + 1] = x end end
  table.insert(out, 1, { "X-Scanned", "yes" })
  return milter.accept{ headers = out }]])
    assert.are.same({ { op = "chgheader", index = 1, name = "X-Internal", value = "" },
      { op = "insheader", index = 1, name = "X-Scanned", value = "yes" } }, r.mods)
  end)

  it("a changed value is one CHGHEADER in place; a new name's case is a change on Postfix", function()
    local r = eom([[h[4][2] = "[EXT] hello"; h[6][1] = "x-dup"
  return milter.accept{ headers = h }]])
    assert.are.same({ { op = "chgheader", index = 1, name = "Subject", value = "[EXT] hello" },
      { op = "chgheader", index = 2, name = "x-dup", value = "2" } }, r.mods)
  end)

  it("inserts in the middle and at the end on Postfix", function()
    local r = eom([[table.insert(h, 3, { "X-Mid", "m" }); h[#h + 1] = { "X-End", "e" }
  return milter.accept{ headers = h }]])
    assert.are.same({ { op = "insheader", index = 3, name = "X-Mid", value = "m" },
      { op = "addheader", name = "X-End", value = "e" } }, r.mods)
  end)

  it("a reorder moves as few headers as it can (Postfix)", function()
    local r = eom([[h[1], h[2] = h[2], h[1]
  return milter.accept{ headers = h }]])
    assert.are.equal(2, #r.mods) -- one delete, one insert
    assert.are.same({ "chgheader", "insheader" }, U.ops(r.mods))
  end)

  it("on Sendmail: a header on top means the rest deleted and appended past the end", function()
    local r = eom([[table.insert(h, 1, { "X-Scanned", "yes" })
  return milter.accept{ headers = h }]], SENDMAIL)
    local want = { { op = "chgheader", index = 1, name = "From", value = "" },
      { op = "chgheader", index = 1, name = "To", value = "" },
      { op = "chgheader", index = 1, name = "X-Internal", value = "" },
      { op = "chgheader", index = 1, name = "Subject", value = "" },
      { op = "chgheader", index = 1, name = "X-Dup", value = "" },
      { op = "chgheader", index = 2, name = "X-Dup", value = "" } } -- the deleted slot counts
    want[#want + 1] = { op = "insheader", index = A, name = "X-Scanned", value = "yes" }
    for _, x in ipairs(HEADERS) do
      want[#want + 1] = { op = "insheader", index = A, name = x[1], value = x[2] }
    end
    assert.are.same(want, r.mods)
  end)

  it("on Sendmail: deletes keep their slot, appends go past the end", function()
    local r = eom([[table.remove(h, 5); h[#h + 1] = { "X-Dup", "3" }
  return milter.accept{ headers = h }]], SENDMAIL)
    -- X-Dup 2 stays where it is; the new X-Dup goes past the end
    assert.are.same({ { op = "chgheader", index = 1, name = "X-Dup", value = "" },
      { op = "insheader", index = A, name = "X-Dup", value = "3" } }, r.mods)
  end)

  it("empty and folded values", function()
    local r = eom([[h[4][2] = "folded\n\tline"; h[#h + 1] = { "X-Empty", "" }
  return milter.accept{ headers = h }]])
    assert.are.same({ { op = "chgheader", index = 1, name = "Subject", value = "folded\n\tline" },
      { op = "addheader", name = "X-Empty", value = "" } }, r.mods)
  end)

  it("combines with the other modifications", function()
    local r = eom([[return milter.accept{ headers = { h[1] }, add_rcpt = { "<x@example.org>" } }]],
      { headers = { { "From", "f" }, { "To", "t" } } })
    assert.are.same({ { op = "chgheader", index = 1, name = "To", value = "" },
      { op = "addrcpt", addr = "<x@example.org>" } }, r.mods)
  end)

  describe("misuse", function()
    it("with add_header raises at the script's line", function()
      local r = eom([[return milter.accept{ headers = h, add_header = { { "X", "y" } } }]])
      assert.are.equal("y", r.cmd) -- --on-error tempfail
      assert.matches("headers %(the whole list%) cannot be combined with add_header", d:log())
      assert.matches("script%.lua:%d+", d:log())
    end)

    it("an entry that is not {name, value} raises", function()
      eom([[return milter.accept{ headers = { { "X-Ok", "v" }, { "X-Bad" } } }]])
      assert.matches("headers%[2%] must be {name, value} %(two strings%)", d:log())
    end)

    it("a plain table is checked by the server: a bad name is a bad verdict", function()
      local r = eom([[return { action = "accept", headers = { { "Bad Name", "v" } } }]])
      assert.are.equal("y", r.cmd)
      assert.matches("bad verdict from eom.*headers%[1%]: bad header name", d:log())
    end)

    it("with change_header in a plain table is a bad verdict", function()
      eom([[return { action = "accept", headers = h, change_header = { { "To", 1, "x" } } }]])
      assert.matches("bad verdict from eom.*cannot be combined with add_header, insert_header", d:log())
    end)

    it("needs an MTA that offers adding and changing headers", function()
      local r = eom("return milter.accept{ headers = h }",
        { offer = { 6, mc.SMFIF.ADDHDRS, 0x1fffff } })
      assert.are.equal("y", r.cmd)
      assert.matches("the MTA does not allow headers %(action 0x11 not offered%)", d:log())
    end)
  end)
end)
