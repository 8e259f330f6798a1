-- luacheck: std +busted
-- The README's cookbook recipes (spec/cookbook/*.lua, shown verbatim in
-- the README) against the real servers: dnsmasq as the DNSBL, and for
-- clamd, whose signatures cannot be fetched here, a faithful INSTREAM
-- responder of the tests' own.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local S = require "spec.support.servers"
local stdlib = require "posix.stdlib"

local read = U.read

local function in_readme(path)
  local src = read(path)
  local readme = read("README.md")
  return readme:find("```lua\n" .. src .. "```", 1, true) ~= nil
end

describe("cookbook", function()
  local d, dns, fail, clamd
  setup(function()
    dns = S.dnsmasq()
    fail = S.dns_failures()
    clamd = S.clamd()
  end)
  teardown(function()
    for _, s in ipairs { dns, fail, clamd } do s:stop() end
  end)
  after_each(function()
    if d then d:stop(); d = nil end
  end)

  describe("DNSBL at connect", function()
    local SRC = "spec/cookbook/dnsbl.lua"
    it("is the README's text", function()
      assert.is_true(in_readme(SRC), SRC .. " differs from the README's recipe")
    end)

    it("refuses a listed client, lets an unlisted one through", function()
      stdlib.setenv("DNSBL_ZONE", "zen.example.test")
      d = U.start(read(SRC), { args = { "--dns", dns.server } })
      local c = U.client(d)
      local r = c:connect_ev("bad.example.org", "4", 4000, "192.0.2.66", {})
      c:close()
      assert.are.equal("y", r.cmd)
      assert.are.equal("554 5.7.1 192.0.2.66 is listed at zen.example.test (127.0.0.2)", r.text)
      c = U.client(d)
      r = c:connect_ev("good.example.org", "4", 4000, "192.0.2.67", {})
      c:close()
      assert.are.equal("c", r.cmd)
    end)

    it("fails open when the list does not answer", function()
      stdlib.setenv("DNSBL_ZONE", "silent.example.test")
      d = U.start(read(SRC), { args = { "--dns", "127.0.0.1:" .. fail.port, "--script-timeout", "5" } })
      local c = U.client(d)
      local r = c:connect_ev("x.example.org", "4", 4000, "192.0.2.66", {})
      c:close()
      assert.are.equal("c", r.cmd)
      assert.is_truthy(U.wait_log(d, "did not answer"):find("did not answer: timeout", 1, true))
    end)
  end)

  describe("clamd at eom", function()
    local SRC = "spec/cookbook/clamd.lua"
    local EICAR = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
    it("is the README's text", function()
      assert.is_true(in_readme(SRC), SRC .. " differs from the README's recipe")
    end)

    it("passes clean mail with a header, rejects infected mail, tempfails when clamd is away", function()
      stdlib.setenv("CLAMD_PORT", tostring(clamd.port))
      d = U.start(read(SRC))
      local c = U.client(d)
      local res = c:session { body = ("clean line\r\n"):rep(20000) }
      assert.are.equal("a", res.eom and res.eom.cmd, tostring(res.error))
      assert.are.equal("X-Virus-Scanned", res.eom.mods[1].name)
      c:close()
      c = U.client(d)
      res = c:session { body = "hello\r\n" .. EICAR .. "\r\n" }
      c:close()
      assert.are.equal("554 5.7.1 infected: Eicar-Test-Signature", res.eom and res.eom.text)
      d:stop()
      stdlib.setenv("CLAMD_PORT", "1") -- nothing listens there
      d = U.start(read(SRC))
      c = U.client(d)
      res = c:session {}
      c:close()
      assert.are.equal("451 4.7.1 virus scanner unavailable, try again later", res.eom and res.eom.text)
    end)
  end)
end)
