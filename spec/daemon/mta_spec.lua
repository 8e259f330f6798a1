-- luacheck: std +busted
-- Which MTA is on the other end (its header counting differs, see
-- milter-protocol.md §7, §13, §13b): recognised from what each MTA sends by
-- default, logged at debug, overridden with --mta.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local mc = U.mc

local POSTFIX = U.POSTFIX_C_MACROS
local SENDMAIL = { { "j", "mta.example.org" }, { "_", "client.example.org [192.0.2.1]" },
  { "{daemon_name}", "MTA" }, { "{if_name}", "localhost" } }
local STALWART = { { "{daemon_name}", "mx.example.org" }, { "j", "mx.example.org" },
  { "{client_addr}", "192.0.2.1" }, { "{client_port}", "40000" }, { "{client_ptr}", "client.example.org" } }
local A = 0x7fffffff

describe("MTA detection", function()
  local d, c
  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  -- one message adding a header at the end; returns the eom reply and the log
  local function run(opts)
    local args = { "--log-level", "debug" }
    for _, a in ipairs(opts.args or {}) do args[#args + 1] = a end
    d = U.start(U.script([[function H.eom(ctx)
  return milter.accept{ insert_header = { { 99, "X-End", "e" } } }
end
return H
]]), { args = args })
    c = U.client(d, opts.offer)
    U.open(c, { cmacros = opts.cmacros })
    local res = U.message(c, { dmacros = opts.dmacros })
    assert(type(res.eom) == "table", "no eom reply: " .. tostring(res.error) .. "\n" .. d:log())
    return res.eom, d:log()
  end

  it("Postfix by its macro v", function()
    local r, log = run({ cmacros = POSTFIX })
    assert.matches("MTA: postfix %(macro v names Postfix%)", log)
    -- past the end: the list's length, its hidden Received: counted
    assert.are.same({ { op = "insheader", index = 4, name = "X-End", value = "e" } }, r.mods)
  end)

  it("Sendmail by its default connect macros ({if_name}, no v)", function()
    local r, log = run({ cmacros = SENDMAIL, offer = mc.OFFER.sendmail })
    assert.matches("MTA: sendmail %(Sendmail's default connect macro", log)
    assert.are.same({ { op = "insheader", index = A, name = "X-End", value = "e" } }, r.mods)
  end)

  it("Sendmail by macro v asked for at DATA (a bare version number)", function()
    local r, log = run({ cmacros = { { "j", "mta.example.org" } }, offer = mc.OFFER.sendmail,
      dmacros = { { "v", "8.17.1.9" } } })
    assert.matches("MTA: sendmail %(macro v is a bare version number", log)
    assert.are.same({ { op = "insheader", index = A, name = "X-End", value = "e" } }, r.mods)
  end)

  it("asks for macro v at DATA where SETSYMLIST is offered, keeping Postfix's i", function()
    d = U.start(U.script("function H.eom(ctx) end\nreturn H\n"))
    c = U.client(d, mc.OFFER.sendmail)
    assert.are.equal("i v", c.neg.symlists[4])
    assert.are.equal(0x100, bit.band(c.neg.actions, 0x100))
  end)

  it("asks for nothing when SETSYMLIST is not offered (Stalwart)", function()
    d = U.start(U.script("function H.eom(ctx) end\nreturn H\n"))
    c = U.client(d, { 6, 0xff, 0x42 })
    assert.is_nil(c.neg.symlists[4])
  end)

  it("Stalwart by its connect macros and an offer without SETSYMLIST", function()
    local r, log = run({ cmacros = STALWART, offer = { 6, 0xff, 0x1fffff } })
    assert.matches("MTA: stalwart", log)
    assert.are.same({ { op = "addheader", name = "X-End", value = "e" } }, r.mods)
  end)

  it("--mta overrides what the macros say", function()
    local r, log = run({ cmacros = POSTFIX, args = { "--mta", "sendmail" } })
    assert.matches("MTA: sendmail %(%-%-mta%)", log)
    assert.are.same({ { op = "insheader", index = A, name = "X-End", value = "e" } }, r.mods)
  end)

  it("--mta auto is the default; a bad --mta is a usage error", function()
    local ok, _, code = os.execute(os.getenv("LUAMILTER_BIN") .. " --mta exim x.lua 2>/dev/null")
    assert.is_not.equal(0, type(ok) == "number" and ok or code)
  end)
end)
