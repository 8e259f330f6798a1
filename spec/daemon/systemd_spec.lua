-- luacheck: std +busted
-- Running under systemd: the sd_notify(3) messages a Type=notify unit
-- gets (READY=1 once every worker serves the script, RELOADING=1 then
-- READY=1 around a reload, good or failed, STOPPING=1 at shutdown, STATUS=
-- with the generation), read from a datagram socket of the spec's own
-- named by NOTIFY_SOCKET; and scripts/luamilter.service as systemd-analyze
-- verify sees it (no systemd needs to run).  Every wait is bounded.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local L = require "spec.daemon.lifecycle_util"
local psock = require "posix.sys.socket"
local ppoll = require "posix.poll"
local unistd = require "posix.unistd"
local stdlib = require "posix.stdlib"
local socket = require "socket"

-- the top level takes a while (in the check and in each worker), so that a
-- READY sent before the workers loaded would come before their log lines.
-- Its line is one write(2): the two workers run it at the same moment, and
-- io.write with several arguments writes each one apart, so that their
-- pieces interleaved ("TOPLEVEL NOTIFY_SOCKET=TOPLEVEL NOTIFY_SOCKET=nilnil")
local POLICY = [[
local t = os.clock() + 0.3; while os.clock() < t do end
io.stderr:write("TOPLEVEL NOTIFY_SOCKET=" .. tostring(os.getenv("NOTIFY_SOCKET")) .. "\n")
return { connect = function() end }
]]

-- a unix datagram socket in dir, as systemd's notify socket is
local function notify_socket(dir)
  local path = dir .. "/notify"
  local fd = assert(psock.socket(psock.AF_UNIX, psock.SOCK_DGRAM, 0))
  assert(psock.bind(fd, { family = psock.AF_UNIX, path = path }))
  return fd, path
end

-- the next message as {READY="1", STATUS=..., _raw=...}, or nil after timeout
local function next_message(fd, timeout)
  if ppoll.rpoll(fd, math.floor(timeout * 1000)) ~= 1 then return nil end
  local data = assert(psock.recv(fd, 4096))
  local m = { _raw = data }
  for line in data:gmatch("[^\n]+") do
    local k, v = line:match("^([A-Z_]+)=(.*)$")
    assert(k, "not a KEY=VALUE line: " .. line)
    m[k] = v
  end
  return m
end

local function count(s, pat)
  local n = 0
  for _ in s:gmatch(pat) do n = n + 1 end
  return n
end

describe("sd_notify", function()
  local d, dir, fd
  before_each(function()
    dir = assert(stdlib.mkdtemp("/tmp/luamilter-notify-XXXXXX"))
  end)
  after_each(function()
    if d then d:stop(); d = nil end
    if fd then unistd.close(fd); fd = nil end
    L.rmtree(dir)
  end)

  it("READY after every worker loaded, RELOADING/READY around reloads, STOPPING", function()
    local path
    fd, path = notify_socket(dir)
    local err
    d, err = U.start(POLICY, { args = { "--workers", "2", "--log-level", "debug" },
                               env = { NOTIFY_SOCKET = path } })
    assert(d, err)
    local log = function() return "\n" .. d:log() end

    local m = next_message(fd, 10)
    assert(m, "no message on the notify socket" .. log())
    assert.are.equal("1", m.READY, m._raw)
    assert.are.equal("serving generation 1 with 2 workers", m.STATUS)
    -- both workers had loaded generation 1 when READY came
    assert.are.equal(2, count(d:log(), "worker %d+ now serves generation 1\n"), log())
    -- the notify socket is the supervisor's alone: no worker, no script sees it
    assert.are.equal(3, count(d:log(), "TOPLEVEL NOTIFY_SOCKET=nil\n"), log()) -- the check + 2 workers

    -- a good reload: RELOADING=1 then READY=1 once both serve generation 2
    d:rewrite_script(POLICY .. "-- v2\n")
    assert(d:signal("HUP"))
    m = next_message(fd, 10)
    assert(m, "no RELOADING after SIGHUP" .. log())
    assert.are.equal("1", m.RELOADING, m._raw)
    assert.truthy(m.MONOTONIC_USEC and m.MONOTONIC_USEC:match("^%d+$"), m._raw)
    assert.are.equal("reloading: generation 1 serving", m.STATUS)
    m = next_message(fd, 10)
    assert(m, "no READY after the reload" .. log())
    assert.are.equal("1", m.READY, m._raw)
    assert.are.equal("serving generation 2 with 2 workers", m.STATUS)
    assert.are.equal(2, count(d:log(), "worker %d+ now serves generation 2\n"), log())

    -- a failed reload: READY again, generation 2 keeps serving, and says so
    d:rewrite_script("return {\n")
    assert(d:signal("HUP"))
    m = next_message(fd, 10)
    assert(m and m.RELOADING == "1", "no RELOADING after the second SIGHUP" .. log())
    m = next_message(fd, 10)
    assert(m, "no READY after the failed reload" .. log())
    assert.are.equal("1", m.READY, m._raw)
    assert.are.equal("serving generation 2 with 2 workers (the last reload failed: see the log)",
                     m.STATUS)
    assert.truthy(d:log():find("reload failed, generation 2 keeps serving", 1, true), log())

    -- SIGTERM: STOPPING=1, then a clean exit
    assert(d:signal("TERM"))
    m = next_message(fd, 10)
    assert(m, "no STOPPING after SIGTERM" .. log())
    assert.are.equal("1", m.STOPPING, m._raw)
    assert.truthy(m.STATUS:find("stopping", 1, true), m._raw)
    assert.are.equal(0, (d:wait(10)), log())
    assert.is_nil(next_message(fd, 0.2)) -- nothing after STOPPING
    assert.falsy(d:log():find("cannot notify", 1, true), log())
  end)

  it("STATUS follows a worker that dies and is replaced", function()
    local path
    fd, path = notify_socket(dir)
    local err
    d, err = U.start(POLICY, { args = { "--workers", "2" }, env = { NOTIFY_SOCKET = path } })
    assert(d, err)
    local log = function() return "\n" .. d:log() end
    local m = next_message(fd, 10)
    assert(m and m.READY == "1", "no READY" .. log())
    local workers = L.wait_until(function()
      local w = L.children(d.pid)
      return #w == 2 and w
    end, 10)
    assert(workers, "not 2 workers" .. log())
    assert.are.equal(0, L.kill(workers[1], "KILL"))
    m = next_message(fd, 10)
    assert(m, "no STATUS after a worker died" .. log())
    assert.is_nil(m.READY, m._raw)
    assert.are.equal("serving generation 1 with 1 of 2 workers (replacing a worker)", m.STATUS)
    m = next_message(fd, 15)
    assert(m, "no STATUS once the new worker serves" .. log())
    assert.is_nil(m.READY, m._raw)
    assert.are.equal("serving generation 1 with 2 workers", m.STATUS)
    assert.truthy(d:log():find("was killed by signal 9", 1, true), log())
  end)

  it("a SIGHUP during a check gets one READY, after the last check", function()
    local path
    fd, path = notify_socket(dir)
    -- the check child's top level takes a while: the second HUP lands in it
    local slow = "local t0 = os.clock() + 0.5; while os.clock() < t0 do end\n" .. POLICY
    local err
    d, err = U.start(POLICY, { env = { NOTIFY_SOCKET = path } })
    assert(d, err)
    local m = next_message(fd, 10)
    assert(m and m.READY == "1", "no READY at start\n" .. d:log())
    d:rewrite_script(slow)
    assert(d:signal("HUP"))
    socket.sleep(0.3) -- (two signals at once would be one)
    assert(d:signal("HUP"))
    m = next_message(fd, 10)
    assert(m and m.RELOADING == "1", "no RELOADING\n" .. d:log())
    m = next_message(fd, 15)
    assert(m and m.READY == "1", "no READY after the reloads\n" .. d:log())
    assert.is_nil(next_message(fd, 0.5), "a second message after READY\n" .. d:log())
    -- and the last generation is the one READY names
    local gens = {}
    for g in d:log():gmatch("reloaded [^\n]*: generation (%d+)") do gens[#gens + 1] = g end
    assert.are.equal("serving generation " .. gens[#gens] .. " with 1 worker", m.STATUS)
  end)

  it("without NOTIFY_SOCKET nothing is sent and nothing is logged about it", function()
    local err
    d, err = U.start(POLICY, { args = { "--log-level", "debug" } })
    assert(d, err)
    -- (the socket listens before the supervisor handles SIGHUP)
    assert(L.wait_until(function() return d:log():find("now serves generation 1", 1, true) end, 10), d:log())
    assert(d:signal("HUP"))
    assert(L.wait_until(function() return d:log():find("generation 2", 1, true) end, 10), d:log())
    d:stop()
    assert.falsy(d:log():find("systemd", 1, true), d:log())
  end)
end)

describe("scripts/luamilter.service", function()
  local dir
  after_each(function() if dir then L.rmtree(dir); dir = nil end end)

  it("passes systemd-analyze verify (ExecStart pointed at the built binary, man page found)", function()
    local unit = assert(L.read("scripts/luamilter.service"))
    assert.truthy(unit:find("\nType=notify\n", 1, true))
    assert.truthy(unit:find("\nExecReload=/bin/kill -HUP $MAINPID\n", 1, true))
    assert.truthy(unit:find("\nEnvironmentFile=-/etc/default/luamilter\n", 1, true))
    assert.truthy(unit:find("\nKillMode=mixed\n", 1, true)) -- SIGTERM to the supervisor only
    assert.falsy(unit:match("\nExecStart=[^\n]*%-%-daemon"))
    assert.falsy(assert(L.read("scripts/luamilter.default")):match("\nLUAMILTER_OPTIONS=[^\n]*%-%-daemon"))
    assert.falsy(unit:find("\nMemoryDenyWriteExecute=yes", 1, true)) -- LuaJIT's JIT writes code
    local exec = unit:match("\nExecStart=(%S+)")
    assert.are.equal("/usr/local/sbin/luamilter", exec)
    dir = L.tmpdir("luamilter-unit")
    local bin = unistd.getcwd() .. "/" .. (os.getenv("LUAMILTER_BIN") or "build/luamilter")
    local sbindir = dir .. "/sbin"
    assert(os.execute("mkdir -p " .. sbindir .. " && ln -s " .. bin .. " " .. sbindir .. "/luamilter") == 0)
    L.write(dir .. "/luamilter.service", (unit:gsub("/usr/local/sbin/", sbindir .. "/")))
    -- Documentation=man:luamilter(8): verify runs man, which finds our page
    assert(os.execute("mkdir -p " .. dir .. "/man/man8 && cp scripts/luamilter.8 " .. dir .. "/man/man8/") == 0)
    local function verify(path)
      local p = assert(io.popen("MANPATH=" .. dir .. "/man systemd-analyze verify " .. path .. " 2>&1; echo rc=$?"))
      local out = p:read("*a")
      p:close()
      return out
    end
    local out = verify(dir .. "/luamilter.service")
    assert.truthy(out:find("rc=0\n", 1, true), out)
    -- verify reports some problems without failing: any line about ours fails
    assert.falsy(out:find("luamilter.service", 1, true), out)
    -- and it does read the unit: a broken copy is reported
    L.write(dir .. "/broken.service", (unit:gsub("/usr/local/sbin/", sbindir .. "/")
      :gsub("\nType=notify\n", "\nType=notifyx\n")))
    out = verify(dir .. "/broken.service")
    assert.truthy(out:find("broken.service:%d+: Failed to parse service type"), out)
  end)
end)
