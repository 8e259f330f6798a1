-- luacheck: std +busted
-- --listen spellings (libmilter and Postfix), stale and foreign socket files.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local D = U.D
local socket = require "socket"
local stdlib = require "posix.stdlib"
local unistd = require "posix.unistd"
local pstat = require "posix.sys.stat"

local SCRIPT = U.script [[
function H.eom(ctx) return milter.accept{ add_header = { { "X-Listen", "ok" } } } end
return H
]]

local function ipv6_loopback()
  local s = socket.tcp6()
  if not s then return false, "no IPv6 socket support" end
  local ok, err = s:bind("::1", 0)
  s:close()
  if not ok then return false, "cannot bind ::1: " .. tostring(err) end
  return true
end

describe("listen", function()
  local d, dir

  before_each(function()
    dir = assert(stdlib.mkdtemp("/tmp/luamilter-listen-XXXXXX"))
  end)

  after_each(function()
    if d then d:stop(); d = nil end
    for _, f in ipairs({ "m.sock", "script.lua", "regular" }) do os.remove(dir .. "/" .. f) end
    unistd.rmdir(dir)
  end)

  local function serves(listen)
    d = U.start(SCRIPT, { listen = listen })
    local c = assert(U.mc.connect(listen))
    local res = c:session {}
    c:quit()
    c:close()
    assert.is_nil(res.error)
    assert.are.equal("a", res.eom.cmd)
    assert.are.same({ { op = "addheader", name = "X-Listen", value = "ok" } }, res.eom.mods)
  end

  it("unix:/path", function()
    serves("unix:" .. dir .. "/m.sock")
    assert.are_not.equal(0, pstat.S_ISSOCK(pstat.stat(dir .. "/m.sock").st_mode))
  end)

  it("local:/path", function()
    serves("local:" .. dir .. "/m.sock")
  end)

  it("inet:PORT@127.0.0.1", function()
    serves("inet:" .. U.free_port() .. "@127.0.0.1")
  end)

  it("inet:127.0.0.1:PORT", function()
    serves("inet:127.0.0.1:" .. U.free_port())
  end)

  it("inet:PORT@[127.0.0.1]", function()
    serves("inet:" .. U.free_port() .. "@[127.0.0.1]")
  end)

  it("inet6:PORT@[::1]", function()
    local ok, why = ipv6_loopback()
    if not ok then
      print("skipping inet6:PORT@[::1]: " .. why)
      pending("::1 not available: " .. why)
      return
    end
    serves("inet6:" .. U.free_port("::1") .. "@[::1]")
  end)

  it("the unix socket is removed at exit", function()
    serves("unix:" .. dir .. "/m.sock")
    d:stop(); d = nil
    assert.is_nil(pstat.stat(dir .. "/m.sock"))
  end)

  it("a stale unix socket file is replaced", function()
    local path = dir .. "/m.sock"
    local s = assert(require("socket.unix").stream())
    assert(s:bind(path))
    s:close() -- leaves the file behind, nobody listening
    assert.is_truthy(pstat.stat(path))
    serves("unix:" .. path)
  end)

  it("a regular file at the socket path is refused and left alone", function()
    local path = dir .. "/regular"
    local f = assert(io.open(path, "wb"))
    f:write("precious data\n")
    f:close()
    local script = dir .. "/script.lua"
    f = assert(io.open(script, "wb"))
    f:write(SCRIPT)
    f:close()
    local r = D.run({ "-l", "unix:" .. path, script }, 5)
    assert.is_falsy(r.timed_out, "the daemon started anyway")
    assert.are.equal("exited", r.how)
    assert.are.equal(1, r.status)
    assert.is_truthy(r.stderr:find(path, 1, true), r.stderr)
    f = assert(io.open(path, "rb"))
    assert.are.equal("precious data\n", f:read("*a"))
    f:close()
  end)

  it("a unix socket another daemon listens on is not taken over", function()
    local path = dir .. "/m.sock"
    serves("unix:" .. path)
    local script = dir .. "/script.lua"
    local f = assert(io.open(script, "wb"))
    f:write(SCRIPT)
    f:close()
    local r = D.run({ "-l", "unix:" .. path, script }, 5)
    assert.is_falsy(r.timed_out, "the second daemon started anyway")
    assert.are.equal(1, r.status)
    -- the first one still serves
    local c = assert(U.mc.connect("unix:" .. path))
    local res = c:session {}
    c:close()
    assert.are.equal("a", res.eom.cmd)
  end)
end)
