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

-- ::1 must exist here: the IPv6 spellings fail loudly rather than skip
local function need_ipv6_loopback()
  local p = assert(io.popen("ip -6 addr show dev lo 2>&1"))
  local out = p:read("*a")
  p:close()
  assert(out:find("inet6 ::1/128", 1, true), "no ::1 on lo (ip -6 addr):\n" .. out)
  local s = assert(socket.tcp6())
  local ok, err = s:bind("::1", 0)
  s:close()
  assert(ok, "cannot bind ::1: " .. tostring(err))
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

  it("/path", function()
    serves(dir .. "/m.sock")
    assert.are_not.equal(0, pstat.S_ISSOCK(pstat.stat(dir .. "/m.sock").st_mode))
  end)

  it("inet:PORT (every IPv4 interface; reached here on 127.0.0.1)", function()
    local port = U.free_port()
    serves("inet:" .. port)
    assert.is_truthy(d:log():find("on inet:" .. port, 1, true))
  end)

  it("inet:[127.0.0.1]:PORT", function()
    serves("inet:[127.0.0.1]:" .. U.free_port())
  end)

  -- An IPv6 literal under inet: binds IPv6 (it used to fail with "Address
  -- family for hostname not supported").
  it("inet:[::1]:PORT", function()
    need_ipv6_loopback()
    serves("inet:[::1]:" .. U.free_port("::1"))
  end)

  it("inet:PORT@::1 and inet:PORT@[::1]", function()
    need_ipv6_loopback()
    serves("inet:" .. U.free_port("::1") .. "@::1")
    d:stop(); d = nil
    serves("inet:" .. U.free_port("::1") .. "@[::1]")
  end)

  it("inet6:PORT@[::1], inet6:PORT@::1 and inet6:[::1]:PORT", function()
    need_ipv6_loopback()
    serves("inet6:" .. U.free_port("::1") .. "@[::1]")
    d:stop(); d = nil
    serves("inet6:" .. U.free_port("::1") .. "@::1")
    d:stop(); d = nil
    serves("inet6:[::1]:" .. U.free_port("::1"))
  end)

  it("an IPv6 literal under inet: does not answer on IPv4", function()
    need_ipv6_loopback()
    local port = U.free_port("::1")
    serves("inet:[::1]:" .. port)
    local c = U.mc.connect("inet:" .. port .. "@127.0.0.1", { timeout = 2 })
    if c then c:close() end
    assert.is_nil(c, "127.0.0.1:" .. port .. " answered")
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
