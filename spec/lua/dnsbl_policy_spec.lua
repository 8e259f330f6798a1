-- The DNSBL recipe's own tests: its handler called with a fake ctx (plain
-- busted, milter.dns.rbl faked or failing offline), then a whole session
-- through `luamilter test` with the fake as --preload.
local milter = require "milter"
local mt = require "milter.test"

local POLICY, FAKE = "spec/cookbook/dnsbl.lua", "spec/cookbook/dnsbl_fake.lua"
local ADDR = { family = "inet", address = "192.0.2.66", port = 4000 }

local function fake_ctx(logged)
  return { conn = {}, msg = {}, log = function(_, ...) logged[#logged + 1] = table.concat({ ... }, " ") end }
end

describe("the DNSBL policy", function()
  it("refuses a listed client", function()
    local real = milter.dns.rbl
    dofile(FAKE)
    local v = dofile(POLICY).connect(fake_ctx({}), "[192.0.2.66]", ADDR)
    milter.dns.rbl = real
    assert.are.equal("reject", v.action)
    assert.are.equal(554, v.code)
  end)

  it("fails open when the list cannot answer", function()
    local logged = {}  -- offline, milter.dns.rbl returns nil, "not available offline"
    assert.is_nil(dofile(POLICY).connect(fake_ctx(logged), "[192.0.2.66]", ADDR))
    assert.matches("did not answer: not available offline", logged[1])
  end)

  it("refuses a listed client in a whole session", function()
    local r = mt.run{ script = POLICY, file = "spec/eml/plain-lf.eml", client = "192.0.2.66", preload = FAKE }
    assert.are.equal(1, r.status, r.stderr)
    assert.matches("^554 5%.7%.1 192%.0%.2%.66 is listed at ", r.final.reply)
  end)
end)
