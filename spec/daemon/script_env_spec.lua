-- luacheck: std +busted
-- What a script gets besides its handlers: the same milter names as under
-- plain Lua, milter.script_dir (on package.path), --set settings and the
-- --preload file, in check, test and serve.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local D = U.D
local mt = require "milter.test"
local stdlib = require "posix.stdlib"
local unistd = require "posix.unistd"
local dirent = require "posix.dirent"

-- "name type" lines for milter's names, its tables' and its objects' methods
local NAMES = [[
local function names(t, prefix, out)
  for k, v in pairs(t) do
    local name = prefix .. tostring(k)
    out[#out + 1] = name .. " " .. type(v)
    if type(v) == "table" and name ~= "null" and name ~= "settings" then names(v, name .. ".", out) end
  end
  return out
end
local function list(milter)
  local out = names(milter, "", {})
  names(debug.getmetatable(milter.store).__index, "store:", out)
  names(debug.getmetatable(milter.redis.new("redis://127.0.0.1:6379/0")).__index, "redis:", out)
  table.sort(out)
  return table.concat(out, "\n")
end
]]

describe("a script's environment", function()
  local dir

  before_each(function()
    dir = assert(stdlib.mkdtemp("/tmp/luamilter-env-XXXXXX"))
  end)

  after_each(function()
    for name in dirent.files(dir) do
      if name ~= "." and name ~= ".." then os.remove(dir .. "/" .. name) end
    end
    unistd.rmdir(dir)
  end)

  local function write(name, src)
    local path = dir .. "/" .. name
    local f = assert(io.open(path, "wb"))
    f:write(src)
    f:close()
    return path
  end

  local function read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
  end

  it("has every name of lua/milter.lua, and lua/milter.lua every name of the daemon's", function()
    local out = dir .. "/names.txt"
    local path = write("names.lua", NAMES .. ([[
local f = assert(io.open(%q, "wb"))
f:write(list(require "milter"))
f:close()
return {}
]]):format(out))
    local r = D.run({ "check", path }, 10)
    assert.are.equal(0, r.status, r.stderr)
    local list = assert(loadstring(NAMES .. "return list(...)"))
    local offline = list(require "milter")
    assert.are.equal(read(out), offline)
    assert.truthy(offline:find("log function", 1, true))
    assert.truthy(offline:find("store:incr function", 1, true))
  end)

  it("gives milter.script_dir (absolute) and finds modules beside the script", function()
    write("mylib.lua", "return { answer = 42 }\n")
    local out = dir .. "/out.txt"
    write("policy.lua", ([[
local milter = require "milter"
local lib = require "mylib"
local f = assert(io.open(%q, "wb"))
f:write(milter.script_dir, " ", lib.answer)
f:close()
return {}
]]):format(out))
    -- a relative path, from another directory
    local parent, base = dir:match("^(.*)/([^/]+)$")
    local bin = os.getenv("LUAMILTER_BIN") or "build/luamilter"
    if bin:sub(1, 1) ~= "/" then bin = assert(unistd.getcwd()) .. "/" .. bin end
    local ok = os.execute(("cd %q && %q check %q >/dev/null 2>&1"):format(parent, bin, base .. "/policy.lua"))
    assert.is_true(ok == 0 or ok == true)
    assert.are.equal(dir .. " 42", read(out))
  end)

  it("gives --set NAME=VALUE as milter.settings (check, test, serve)", function()
    local out = dir .. "/out.txt"
    local src = ([[
local milter = require "milter"
local f = assert(io.open(%q, "ab"))
f:write(tostring(milter.settings.limit), "|", tostring(milter.settings.zone), "|",
  type(milter.settings.limit), "\n")
f:close()
return { connect = function() end }
]]):format(out)
    local path = write("policy.lua", src)
    local r = D.run({ "--set", "limit=10", "check", path, "--set", "zone=a=b" }, 10)
    assert.are.equal(0, r.status, r.stderr)
    assert.are.equal("10|a=b|string\n", read(out))
    os.remove(out)
    local t = mt.run { script = path, file = "spec/eml/plain-lf.eml", settings = { limit = 5 } }
    assert.are.equal(0, t.status, t.stderr)
    assert.are.equal("5|nil|string\n", read(out))
    os.remove(out)
    local d = U.start(src, { args = { "--set", "limit=7", "--set", "limit=8" } })
    finally(function() d:stop() end)
    -- the socket listens before the worker has loaded the script: a
    -- served session proves the worker ran the top level
    local c = U.client(d)
    local res = c:session {}
    c:close()
    assert.is_nil(res.error)
    d:stop()
    assert.truthy(read(out):find("8|nil|string\n", 1, true))
    r = D.run({ "check", path, "--set", "novalue" }, 10)
    assert.are.equal(2, r.status)
    assert.matches("%-%-set wants NAME=VALUE", r.stderr)
  end)

  it("runs --preload before the script: a test fakes a DNSBL answer", function()
    local preload = write("fake_dns.lua", [[
local milter = require "milter"
milter.dns.rbl = function(ip, zone)
  if ip == "192.0.2.66" and zone == "zen.example" then return { "127.0.0.2" } end
  return false
end
]])
    local policy = write("policy.lua", [[
local milter = require "milter"
return { connect = function(ctx, host, addr)
  if milter.dns.rbl(addr.address, "zen.example") then
    return milter.reject{ code = 554, xcode = "5.7.1", reason = "listed" }
  end
end }
]])
    local r = mt.run { script = policy, file = "spec/eml/plain-lf.eml", client = "192.0.2.66", preload = preload }
    assert.are.equal(1, r.status, r.stderr)
    assert.are.equal("reject", r.final.action)
    assert.are.equal("554 5.7.1 listed", r.final.reply)
    r = mt.run { script = policy, file = "spec/eml/plain-lf.eml", client = "192.0.2.1", preload = preload }
    assert.are.equal(0, r.status, r.stderr)
    -- and when serving
    local d = U.start(read(policy), { args = { "--preload", preload } })
    finally(function() d:stop() end)
    local c = U.client(d)
    local rep, err = c:connect_ev("x", "4", 1234, "192.0.2.66", {})
    c:close()
    d:stop()
    assert(rep, tostring(err) .. d:log())
    assert.are.equal("y", rep.cmd)
  end)

  it("reports a --preload that fails with its file:line, a missing one as a usage error", function()
    local bad = write("bad.lua", "local x = 1\nerror('broken fake')\n")
    local policy = write("policy.lua", "return {}\n")
    local r = D.run({ "check", policy, "--preload", bad }, 10)
    assert.are.equal(1, r.status)
    assert.truthy(r.stderr:find(bad .. ":2: broken fake", 1, true), r.stderr)
    r = D.run({ "test", policy, "spec/eml/plain-lf.eml", "--preload", dir .. "/none.lua" }, 10)
    assert.are.equal(2, r.status)
    assert.matches("cannot open", r.stderr)
  end)
end)
