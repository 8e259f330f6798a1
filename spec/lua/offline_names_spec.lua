-- lua/milter.lua under plain busted: every name the daemon gives, with an
-- offline meaning, so that a handler runs with a fake ctx.
local milter = require "milter"

-- a fake ctx, as a policy's own spec would make it
local function fake_ctx(t)
  local ctx = { conn = {}, msg = {}, id = "1", client = t and t.client or { address = "192.0.2.1" } }
  function ctx.log() end
  function ctx.macro() return nil end
  return ctx
end

-- captures what milter.log writes to stderr
local function capture_stderr(fn)
  local real = io.stderr
  local got = {}
  io.stderr = { write = function(_, ...) for _, s in ipairs({ ... }) do got[#got + 1] = s end end } -- luacheck: ignore
  local ok, err = pcall(fn)
  io.stderr = real -- luacheck: ignore
  assert(ok, err)
  return table.concat(got)
end

describe("lua/milter.lua offline", function()
  it("logs with milter.log (a policy that logs runs under busted)", function()
    local H = {}
    function H.connect(ctx, host)
      milter.log("info", "connect from", host, 42)
      ctx.conn.seen = true
    end
    local ctx = fake_ctx()
    local out = capture_stderr(function() assert.is_nil(H.connect(ctx, "[192.0.2.1]")) end)
    assert.matches("^INFO %[lua%] spec/lua/offline_names_spec.lua:%d+: connect from %[192.0.2.1%] 42\n$", out)
    assert.is_true(ctx.conn.seen)
    assert.are.equal("", capture_stderr(function() milter.log("debug", "quiet") end))
    assert.has_error(function() milter.log("loud", "x") end)
  end)

  it("fails every lookup as a lookup fails: nil, 'not available offline'", function()
    local function nil_err(...)
      assert.are.same({ nil, "not available offline" }, { ... })
    end
    nil_err(milter.dns.query("example.org", "MX"))
    nil_err(milter.dns.rbl("192.0.2.1", "zen.example"))
    nil_err(milter.tcp.connect("127.0.0.1", 3310, { timeout = 2 }))
    nil_err(milter.tcp.connect("unix:/run/x.sock"))
    local r = milter.redis.new("redis://127.0.0.1:6379/0")
    assert.are.equal("milter.redis", tostring(r))
    nil_err(r:call("INCR", "k"))
    nil_err(r:pipeline { { "INCR", "k" } })
    nil_err(milter.http.request { url = "http://127.0.0.1/" })
    assert.is_true(milter.sleep(0.5))
  end)

  it("raises for misuse, as the daemon does", function()
    assert.has_error(function() milter.dns.query("example.org", "BOGUS") end)
    assert.has_error(function() milter.dns.query(nil, "A") end)
    assert.has_error(function() milter.tcp.connect("127.0.0.1", 0) end)
    assert.has_error(function() milter.http.request("http://x/") end)
    assert.has_error(function() milter.sleep("1") end)
    assert.has_error(function() milter.sleep(-1) end)
    assert.has_error(function() milter.redis.new("x"):call() end)
  end)

  it("lets a test fake a lookup: a DNSBL answer", function()
    local H = {}
    function H.connect(ctx, _, addr)
      local hit, err = milter.dns.rbl(addr.address, "zen.example")
      if hit then return milter.reject { code = 554, reason = "listed" } end
      if err then ctx:log("warn", "dnsbl: " .. err) end
    end
    local real = milter.dns.rbl
    milter.dns.rbl = function(ip, zone)
      assert.are.equal("zen.example", zone)
      if ip == "192.0.2.66" then return { "127.0.0.2" } end
      return false
    end
    local v = H.connect(fake_ctx(), "[192.0.2.66]", { family = "inet", address = "192.0.2.66" })
    local v2 = H.connect(fake_ctx(), "[192.0.2.1]", { family = "inet", address = "192.0.2.1" })
    milter.dns.rbl = real
    assert.are.same({ action = "reject", code = 554, reason = "listed" }, v)
    assert.is_nil(v2)
  end)

  it("keeps milter.store in memory: get, set, del, incr with ttl", function()
    local store = milter.store
    assert.are.equal("milter.store", tostring(store))
    assert.are.equal("milter.store", getmetatable(store))
    assert.is_nil(store:get("offline:a"))
    assert.are.equal(1, store:incr("offline:a", 1, 60))
    assert.are.equal(3, store:incr("offline:a", 2))
    assert.are.equal(3, store:get("offline:a"))
    assert.is_true(store:set("offline:s", "v", 10))
    assert.are.equal("v", store:get("offline:s"))
    assert.is_true(store:set("offline:n", "41"))
    assert.are.equal(42, store:incr("offline:n"))
    store:set("offline:s", "word")
    assert.are.same({ nil, "not a number" }, { store:incr("offline:s") })
    assert.is_true(store:del("offline:s"))
    assert.is_true(store:del("offline:s"))
    assert.is_nil(store:get("offline:s"))
    -- an expired key is gone
    local real_time = os.time
    local now = real_time()
    store:set("offline:t", 1, 5)
    os.time = function() return now + 6 end -- luacheck: ignore
    local after = store:get("offline:t")
    os.time = real_time -- luacheck: ignore
    assert.is_nil(after)
  end)

  it("checks the store's arguments as the daemon does", function()
    local store = milter.store
    assert.has_error(function() store.get("k") end)
    assert.has_error(function() store:get(1) end)
    assert.has_error(function() store:get("") end)
    assert.has_error(function() store:get(("x"):rep(512)) end)
    assert.has_error(function() store:set("k", {}) end)
    assert.has_error(function() store:set("k", 0 / 0) end)
    assert.has_error(function() store:set("k", "v", 0) end)
    assert.has_error(function() store:incr("k", "1") end)
  end)

  it("has settings and script_dir for a test to fill in", function()
    assert.are.same({}, milter.settings)
    assert.is_string(milter.script_dir)
  end)
end)

describe("the README", function()
  local function read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
  end
  it("shows the DNSBL recipe's fake and its spec verbatim", function()
    local readme = read("README.md")
    for _, path in ipairs { "spec/cookbook/dnsbl_fake.lua", "spec/lua/dnsbl_policy_spec.lua" } do
      assert.truthy(readme:find("```lua\n" .. read(path) .. "```", 1, true), path .. " differs from the README")
    end
  end)
end)
