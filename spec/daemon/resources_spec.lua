-- luacheck: std +busted
-- Resource limits a hostile or broken peer runs into: the write queue of a
-- peer that pipelines without reading, and running out of file descriptors.
-- Every wait is bounded.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local L = require "spec.daemon.lifecycle_util"
local mc = U.mc

local SANITIZED = os.getenv("LUAMILTER_SANITIZED")

-- the worker of a one-worker daemon (a child of the supervisor)
local function worker_of(d)
  local ch = L.wait_workers(d.pid, 1, d.log_path, 5)
  assert(ch, "no single worker under supervisor " .. d.pid)
  return ch[1]
end

local function hwm_kb(pid)
  local st = assert(L.status(pid), "no /proc/" .. pid .. "/status")
  return assert(tonumber((st.VmHWM or ""):match("^(%d+)")), "no VmHWM")
end

local function normal(d)
  local r = U.normal_session(d, { rcpts = { "<a@example.org>" }, body = "b\r\n" })
  assert.are.equal("a", r.eom and r.eom.cmd, tostring(r.error))
end

describe("--max-write-queue", function()
  local d
  after_each(function()
    if d then d:stop(); d = nil end
  end)

  -- envfrom rejects with the longest reply a verdict may give (32 lines)
  local LONG_REJECT = U.script [[
local lines = {}
for i = 1, 32 do lines[i] = string.rep(string.char(96 + i % 26), 970) end
function H.envfrom(ctx, sender)
  if sender == "<bad@example.org>" then
    return milter.reject{ code = 550, xcode = "5.7.1", reason = lines }
  end
end
function H.eom(ctx)
  local size = tonumber(ctx:header("X-Body-Size") or "")
  if size then return milter.accept{ replace_body = string.rep("b", size) } end
  return milter.accept{}
end
return H
]]

  it("closes a peer that keeps sending while a replayed long reply piles up", function()
    d = U.start(LONG_REJECT)
    local worker = worker_of(d)
    local bystander = U.client(d)
    U.open(bystander)
    local c = U.client(d)
    U.open(c)
    local r = assert(c:mail("<bad@example.org>"))
    assert.are.equal("y", r.cmd)
    assert.is_true(#r.text > 30000, "the reject is long")
    local before = hwm_kb(worker)
    -- one read's worth of 5-byte BODY frames: each one is answered by
    -- replaying the 31 KB reject (380 MB in all if nothing stops it)
    local frames = mc.frame("B", ""):rep(13107)
    assert(c:send_raw(frames))
    local log = U.wait_log(d, "--max-write-queue", 10)
    assert.matches("WARN .*replies queued.*%-%-max%-write%-queue 4194304%): closing the connection",
      log)
    local e = U.read_until_closed(c, 5)
    assert.truthy(e == "closed" or e:find("reset"), tostring(e))
    c:close()
    local grown = hwm_kb(worker) - before
    if not SANITIZED then -- ASan's quarantine and shadow memory say nothing here
      assert(grown < 16 * 1024, "the worker grew by " .. grown .. " kB")
    end
    assert.are.same({ worker }, L.children(d.pid)) -- the same worker serves on
    r = U.message(bystander, { rcpts = { "<a@example.org>" } })
    assert.are.equal("a", r.eom and r.eom.cmd, "the bystander was disturbed")
    normal(d)
  end)

  it("does not refuse one eom reply larger than the cap (replace_body)", function()
    d = U.start(LONG_REJECT, { args = { "--max-write-queue", "1048576" } })
    local c = U.client(d)
    U.open(c)
    for _ = 1, 2 do -- the next message on the same connection is served too
      local r = U.message(c, { headers = { { "X-Body-Size", tostring(3 * 1048576) } } })
      assert.is_nil(r.error)
      assert.are.equal("a", r.eom.cmd)
      local body = {}
      for _, m in ipairs(r.eom.mods) do
        if m.op == "replbody" then body[#body + 1] = m.data end
      end
      assert.are.equal(3 * 1048576, #table.concat(body))
    end
    c:quit()
    c:close()
    assert.is_nil(d:log():find("max-write-queue", 1, true), d:log())
  end)

  it("rejects a bad value", function()
    local r = U.D.run({ "--max-write-queue", "12", "x.lua" }, 5)
    assert.are.equal(2, r.status)
    assert.matches("%-%-max%-write%-queue", r.stderr)
  end)
end)

describe("file descriptors", function()
  local ACCEPT = U.script [[
function H.eom(ctx) return milter.accept{} end
return H
]]
  local d, wrapper
  local held = {}
  local stdlib = require "posix.stdlib"
  local unistd = require "posix.unistd"
  local socket = require "socket"

  -- a wrapper that starts the daemon under `ulimit LIMIT` (e.g. "-n 64")
  local function under_ulimit(limit)
    local dir = assert(stdlib.mkdtemp("/tmp/luamilter-ulimit-XXXXXX"))
    wrapper = { dir = dir, path = dir .. "/run.sh" }
    L.write(wrapper.path, "#!/bin/sh\nulimit " .. limit .. " || exit 125\nexec " ..
      L.binary() .. ' "$@"\n')
    assert(os.execute("chmod +x " .. wrapper.path))
    return wrapper.path
  end

  after_each(function()
    for i, s in ipairs(held) do s:close(); held[i] = nil end
    if d then d:stop(); d = nil end
    if wrapper then
      os.remove(wrapper.path)
      unistd.rmdir(wrapper.dir)
      wrapper = nil
    end
  end)

  local function nofile_soft(pid)
    local lim = assert(L.read("/proc/" .. pid .. "/limits"))
    return tonumber(lim:match("Max open files%s+(%d+)"))
  end

  it("warns at start when --max-connections does not fit in ulimit -n", function()
    d = U.start(ACCEPT, { bin = under_ulimit("-n 64") })
    local log = U.wait_log(d, "RLIMIT_NOFILE", 5)
    local lines = U.lines_with(log, "RLIMIT_NOFILE")
    assert.are.equal(1, #lines, log)
    assert.matches("WARN .*%-%-max%-connections 10000 needs about 10032 file descriptors", lines[1])
    assert.matches("allows 64", lines[1])
    normal(d)
  end)

  it("raises the soft limit to what --max-connections needs, without a warning", function()
    d = U.start(ACCEPT, { bin = under_ulimit("-Sn 64"),
                                       args = { "--max-connections", "1000" } })
    local worker = worker_of(d)
    assert.is_true(nofile_soft(worker) >= 1032, "soft limit " .. nofile_soft(worker))
    assert.is_nil(d:log():find("RLIMIT_NOFILE", 1, true), d:log())
    normal(d)
  end)

  it("backs off when accept runs out of descriptors, then serves again", function()
    d = U.start(ACCEPT, { bin = under_ulimit("-n 64") })
    -- more connections than the worker has descriptors for: the last ones
    -- wait in the listen backlog while accept fails with EMFILE
    for i = 1, 90 do
      held[i] = assert(U.mc.connect(d.listen)).sock
    end
    local log = U.wait_log(d, "Too many open files", 5)
    assert.is_truthy(log:find("Too many open files", 1, true), log)
    socket.sleep(2) -- held: a spinning accept loop would log thousands of lines
    local n = #U.lines_with(d:log(), "accept")
    assert(n >= 1 and n <= 3, n .. " accept lines:\n" .. d:log():sub(1, 3000))
    for i, s in ipairs(held) do s:close(); held[i] = nil end
    -- served again once descriptors are free (resumes within a second)
    local c = assert(d:client())
    local res = c:session {}
    c:close()
    assert.is_nil(res.error)
    assert.are.equal("a", res.eom and res.eom.cmd)
  end)
end)
