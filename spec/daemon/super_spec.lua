-- luacheck: std +busted
-- The supervisor under hostile scripts and signals: a top level that never
-- returns (at start and on reload), per-worker script loading and random
-- seeds, many reloads while a worker is busy, a worker out of file
-- descriptors during a reload, a quiet Ctrl-C of the whole process group,
-- and the watchdog's line through the logger.  Every wait is bounded; no
-- assertion depends on how long something took.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local L = require "spec.daemon.lifecycle_util"
local D = U.D
local mc = U.mc
local unistd = require "posix.unistd"
local psignal = require "posix.signal"
local cjson = require "cjson.safe"

local A, B = L.policy("A"), L.policy("B")

local function pesc(s) return (s:gsub("%p", "%%%0")) end
local function lines(list) return table.concat(list, "\n") end

local function start(src, n, args)
  local argv = { "--workers", tostring(n), "--log-level", "debug" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local d = U.start(src, { args = argv })
  local workers = L.wait_workers(d.pid, n, d.log_path, 5)
  assert(workers, "the supervisor did not start " .. n .. " worker(s):\n" .. d:log())
  return d, L.tail(d.log_path), workers
end

local function reload(d, tail, src)
  local from = #tail:poll().lines + 1
  if src then d:rewrite_script(src) end
  assert(d:signal("HUP"))
  local i, gen = tail:wait("reloaded " .. pesc(d.script_path) .. ": generation (%d+)$", from, 5, 0.001)
  assert(i, "no 'reloaded ...: generation N' line:\n" .. lines(tail.lines))
  return tonumber(gen), i
end

local function session_tag(listen)
  local s = L.session(listen)
  assert(not s.error, "session failed: " .. tostring(s.error))
  return s.tag
end

-- a top level that spins in a loop the JIT compiles: no hook can stop it
local SPIN = "local milter = require 'milter'\nlocal x = 0\nwhile true do x = x + 1 end\nreturn {}\n"

describe("a top level that never returns", function()
  local d
  after_each(function()
    if d then d:stop(); d = nil end
  end)

  it("on reload: reported as a failed reload, the supervisor keeps serving, replacing and stopping", function()
    local tail, workers
    d, tail, workers = start(A, 1, { "--script-timeout", "0.5" })
    local from = #tail:poll().lines + 1
    d:rewrite_script(SPIN)
    assert(d:signal("HUP"))
    local i, gen, err = tail:wait("reload failed, generation (%d+) keeps serving: (.*)$", from, 10)
    assert(i, "no 'reload failed' line for a spinning top level:\n" .. lines(tail.lines))
    assert.are.equal("1", gen)
    assert(err:find(d.script_path, 1, true), err)
    assert(err:find("--script-timeout", 1, true), err)
    assert.are.equal("A", session_tag(d.listen))

    -- the supervisor still replaces a dead worker, then reloads a good script
    assert.are.equal(0, L.kill(workers[1], "KILL"))
    local now = L.wait_until(function()
      local ch = L.children(d.pid)
      if #ch == 1 and ch[1] ~= workers[1] then return ch end
    end, 5)
    assert(now, "the dead worker was not replaced:\n" .. d:log())
    assert.are.equal(2, (reload(d, tail, B)))
    assert(tail:wait_workers(now, 2, 5), "the new worker did not take generation 2:\n" .. d:log())
    assert.are.equal("B", session_tag(d.listen))

    -- and a spinning reload in progress does not keep SIGTERM from working
    d:rewrite_script(SPIN)
    assert(d:signal("HUP"))
    assert(d:signal("TERM"))
    local code, how = d:wait(5)
    assert.are.equal("exited", how, d:log())
    assert.are.equal(0, code)
  end)

  it("in a worker only (the check passed): the watchdog ends the worker, the supervisor logs why", function()
    -- spins unless it runs in the check process
    local src = "local milter = require 'milter'\n" ..
      "local f = io.open('/proc/self/comm'); local comm = f:read('*l'); f:close()\n" ..
      "if comm ~= 'luamilter-check' then local x = 0; while true do x = x + 1 end end\n" ..
      "return { eom = function() return milter.accept{} end }\n"
    d = U.start(src, { args = { "--workers", "1", "--script-timeout", "0.5", "--log-format", "json" } })
    local tail = L.tail(d.log_path)
    assert(tail:wait("the script's top level ran past %-%-script%-timeout", 1, 10),
      "no watchdog line for the worker's top level:\n" .. d:log())
    for _, line in ipairs(tail:poll().lines) do
      assert(type(cjson.decode(line)) == "table", "not a JSON line: " .. line)
    end
    assert(d:alive(), d:log())
  end)

  it("at start: exit 1 with a clear error", function()
    local dir = L.tmpdir()
    finally(function() L.rmtree(dir) end)
    local script = dir .. "/spin.lua"
    L.write(script, SPIN)
    local r = D.run({ "--workers", "1", "--script-timeout", "0.5", "-l", "unix:" .. dir .. "/s.sock", script }, 10)
    assert.is_falsy(r.timed_out, "still running 10 s after start:\n" .. r.stderr)
    assert.are.equal(1, r.status, r.stderr)
    assert(r.stderr:find(script, 1, true), r.stderr)
    assert(r.stderr:find("--script-timeout", 1, true), r.stderr)
  end)
end)

-- top level: logs "LOAD TAG pid=PID r=<first math.random()>"
local function loader(tag)
  return ([[
local milter = require "milter"
local TAG = %q
local f = io.open("/proc/self/stat")
local pid = f:read("*a"):match("^(%%d+)")
f:close()
milter.log("info", ("LOAD %%s pid=%%s r=%%.17g"):format(TAG, pid, math.random()))
return { envrcpt = function() return milter.reject{ reason = "gen-" .. TAG } end }
]]):format(tag)
end

describe("script loading per worker", function()
  local d
  after_each(function()
    if d then d:stop(); d = nil end
  end)

  -- {pid -> {r, ...}} of the LOAD lines of tag
  local function loads(tail, tag)
    local out = {}
    for _, line in ipairs(tail:poll().lines) do
      local t, pid, r = line:match("LOAD (%S+) pid=(%d+) r=(%S+)$")
      if t == tag then
        pid = tonumber(pid)
        out[pid] = out[pid] or {}
        table.insert(out[pid], r)
      end
    end
    return out
  end

  local function wait_loads(tail, tag, workers)
    return L.wait_until(function()
      local l = loads(tail, tag)
      for _, w in ipairs(workers) do
        if not l[w] then return nil end
      end
      return l
    end, 5)
  end

  it("each worker runs the top level itself, at start as after a reload, with its own random seed", function()
    local tail, workers
    d, tail, workers = start(loader("A"), 2)
    local la = wait_loads(tail, "A", workers)
    assert(la, "the top level did not run in each worker at start:\n" .. lines(tail.lines))
    for _, w in ipairs(workers) do assert.are.equal(1, #la[w], "worker " .. w) end
    assert.are_not.equal(la[workers[1]][1], la[workers[2]][1], "both workers drew the same math.random()")

    assert.are.equal(2, (reload(d, tail, loader("B"))))
    local lb = wait_loads(tail, "B", workers)
    assert(lb, "the top level did not run in each worker after the reload:\n" .. lines(tail.lines))
    for _, w in ipairs(workers) do assert.are.equal(1, #lb[w], "worker " .. w) end
    assert.are_not.equal(lb[workers[1]][1], lb[workers[2]][1], "both workers drew the same math.random()")
    -- the supervisor itself never serves: no load of its own in its process
    assert.is_nil(loads(tail, "A")[d.pid])
    assert.is_nil(loads(tail, "B")[d.pid])
    assert.are.equal(0, #tail:grep(" ERROR "), d:log())
  end)
end)

-- RCPT <hold:FLAG> parks the worker (at most 60 s) until FLAG exists;
-- RCPT <grab@a> lowers the worker's fd limit and opens files until EMFILE;
-- RCPT <release@a> closes them; RCPT <x@a> names the tag
local function busy_script(tag)
  return ([[
local milter = require "milter"
local ffi = require "ffi"
pcall(ffi.cdef, [=[
int poll(void *fds, unsigned long nfds, int timeout);
struct lm_rlimit { unsigned long cur, max; };
int getrlimit(int res, struct lm_rlimit *r);
int setrlimit(int res, const struct lm_rlimit *r);
]=])
local TAG = %q
local files = {}
local H = {}
function H.envrcpt(ctx, rcpt)
  local flag = rcpt:match("^<hold:(.*)>$")
  if flag then
    ctx:log("info", "HOLD " .. TAG)
    for _ = 1, 30000 do -- 300 s: far beyond the 600 reloads (the test's finally releases it)
      local f = io.open(flag)
      if f then f:close(); break end
      ffi.C.poll(nil, 0, 10)
    end
  elseif rcpt == "<grab@a>" then
    local r = ffi.new("struct lm_rlimit")
    assert(ffi.C.getrlimit(7, r) == 0)
    r.cur = 64
    assert(ffi.C.setrlimit(7, r) == 0)
    while true do
      local f = io.open("/dev/null")
      if not f then break end
      files[#files + 1] = f
    end
    return milter.reject{ reason = "grabbed " .. #files }
  elseif rcpt == "<release@a>" then
    for i = #files, 1, -1 do files[i]:close(); files[i] = nil end
    return milter.reject{ reason = "released" }
  end
  return milter.reject{ code = 550, xcode = "5.7.1", reason = "gen-" .. TAG }
end
return H
]]):format(tag)
end

local function open_message(c)
  assert(L.open(c))
  local r = c:mail("<s@example.org>", {}, {})
  assert(r == "skipped" or r == "noreply" or (type(r) == "table" and r.cmd == "c"), "mail")
end

local function rcpt_text(c, rcpt)
  local r, err = c:rcpt(rcpt, {}, {})
  assert(type(r) == "table" and r.cmd == "y", "rcpt " .. rcpt .. ": " .. tostring(err))
  return r.text
end

describe("reloads and a busy or starved worker", function()
  local d
  after_each(function()
    if d then d:stop(); d = nil end
  end)

  it("many SIGHUPs while the only worker is busy: the supervisor never blocks, the worker loads the newest", function()
    local tail, workers
    d, tail, workers = start(busy_script("g1"), 1)
    local w = workers[1]
    local flag = d.dir .. "/release"
    local c = assert(d:client({ timeout = 60 }))
    finally(function() L.write(flag, ""); c:close() end)
    open_message(c)
    assert(c:macro("R", {}))
    assert(c:send("R", "<hold:" .. flag .. ">\0"))
    assert(tail:wait("HOLD g1$", 1, 5), "the handler did not start holding")
    local busy_from = #tail:poll().lines + 1

    local N = 600
    local last
    for k = 2, N do
      if k == N then d:rewrite_script(busy_script("gN")) end
      last = reload(d, tail, nil)
    end
    assert.are.equal(N, last)
    -- the supervisor answers everything while the worker is still parked
    assert(L.alive(w))
    local function loads_since()
      local out = {}
      for k = busy_from, #tail:poll().lines do
        local line = tail.lines[k]
        if line:find("worker " .. w .. " now serves generation", 1, true) then out[#out + 1] = line end
      end
      return out
    end
    assert.are.equal(0, #loads_since(), "the busy worker reloaded while busy?")
    L.write(flag, "")
    assert(c:read_reply(60), "no reply to the held RCPT")
    assert(tail:wait("worker " .. w .. " now serves generation " .. N .. "$", busy_from, 10),
      "the worker never reached generation " .. N .. ":\n" .. lines(tail:grep("generation")))
    local loads = loads_since()
    assert(#loads <= 2, "the worker loaded " .. #loads .. " generations one by one:\n" .. lines(loads))
    c:close()
    local c2 = assert(d:client({ timeout = 10 }))
    open_message(c2)
    assert.are.equal("550 5.7.1 gen-gN", rcpt_text(c2, "<x@a>"))
    c2:close()
    assert.are.equal(0, #tail:grep(" ERROR "), lines(tail:grep(" ERROR ")))
  end)

  it("a worker out of file descriptors at a reload logs it and gets the script once it has fds again", function()
    local tail, workers
    d, tail, workers = start(busy_script("A"), 1)
    local w = workers[1]
    local c = assert(d:client({ timeout = 10 }))
    finally(function() c:close() end)
    open_message(c)
    assert(rcpt_text(c, "<grab@a>"):find("grabbed %d+"))
    local from = #tail:poll().lines + 1
    assert.are.equal(2, (reload(d, tail, busy_script("B"))))
    local i = tail:wait(" ERROR .*worker " .. w .. ".*generation 2", from, 5)
    assert(i, "the lost reload was not logged:\n" .. lines(tail.lines))
    assert.are.equal(0, #tail:grep("worker " .. w .. " now serves generation 2"))
    assert.are.equal("550 5.7.1 gen-A", rcpt_text(c, "<x@a>"), "the worker still serves generation 1")
    assert(rcpt_text(c, "<release@a>"):find("released"))
    assert(tail:wait("worker " .. w .. " now serves generation 2$", from, 5),
      "the reload never applied:\n" .. lines(tail.lines))
    c:quit()
    c:close()
    local c2 = assert(d:client({ timeout = 10 }))
    open_message(c2)
    assert.are.equal("550 5.7.1 gen-B", rcpt_text(c2, "<x@a>"))
    c2:close()
  end)
end)

describe("Ctrl-C", function()
  -- L.spawn, but the daemon leads a process group of its own, like a shell job
  local function spawn_group(argv, log)
    local fcntl = require "posix.fcntl"
    local pid = assert(unistd.fork())
    if pid == 0 then
      unistd.setpid("p", 0, 0)
      for fd = 0, 1023 do unistd.close(fd) end
      local flags = fcntl.O_WRONLY + fcntl.O_CREAT + fcntl.O_APPEND
      if fcntl.open("/dev/null", fcntl.O_RDONLY) ~= 0 or fcntl.open(log, flags, 420) ~= 1 then unistd._exit(126) end
      unistd.dup2(1, 2)
      local args = {}
      for i = 2, #argv do args[i - 1] = argv[i] end
      unistd.execp(argv[1], args)
      unistd._exit(127)
    end
    unistd.setpid("p", pid, pid) -- also from here: no race with the signal below
    return pid
  end

  for _, sig in ipairs({ "INT", "TERM" }) do
    it("SIG" .. sig .. " to the whole process group stops quietly: no error, no new worker, exit 0", function()
      local dir = L.tmpdir()
      local script, sock, log = dir .. "/script.lua", dir .. "/s.sock", dir .. "/log"
      L.write(script, A)
      local pid = spawn_group({ L.binary(), "--workers", "4", "-l", "unix:" .. sock, script }, log)
      finally(function()
        if L.alive(pid) then psignal.kill(-pid, psignal.SIGKILL); L.wait_child(pid, 5) end
        L.rmtree(dir)
      end)
      assert(mc.wait_socket("unix:" .. sock, 5), "not listening:\n" .. tostring(L.read(log)))
      assert(L.wait_workers(pid, 4, log, 5), "no workers:\n" .. tostring(L.read(log)))
      assert.are.equal("A", session_tag("unix:" .. sock))
      assert.are.equal(0, psignal.kill(-pid, psignal["SIG" .. sig]))
      local code, how = L.wait_child(pid, 5)
      local text = L.read(log) or ""
      assert.are.equal("exited", how, text)
      assert.are.equal(0, code, text)
      assert.is_nil(text:find(" ERROR ", 1, true), text)
      assert.is_nil(text:find("starting a new worker", 1, true), text)
    end)
  end

  it("one Ctrl-C lets an open conversation finish", function()
    local dir = L.tmpdir()
    local script, sock, log = dir .. "/script.lua", dir .. "/s.sock", dir .. "/log"
    L.write(script, A)
    local pid = spawn_group({ L.binary(), "--workers", "2", "-l", "unix:" .. sock, script }, log)
    local c
    finally(function() -- busted keeps one finally per test: all in this one
      if c then c:close() end
      if L.alive(pid) then psignal.kill(-pid, psignal.SIGKILL); L.wait_child(pid, 5) end
      L.rmtree(dir)
    end)
    assert(mc.wait_socket("unix:" .. sock, 5), "not listening:\n" .. tostring(L.read(log)))
    assert(L.wait_workers(pid, 2, log, 5), "no workers:\n" .. tostring(L.read(log)))
    c = assert(mc.connect("unix:" .. sock, { timeout = 5 }))
    assert(L.open(c))
    assert.are.equal("A", assert(L.begin_message(c)))
    local tail = L.tail(log)
    assert.are.equal(0, psignal.kill(-pid, psignal.SIGINT))
    assert(tail:wait("finishing 1 connection", 1, 5), "no worker is finishing the conversation:\n" .. L.read(log))
    assert.are.equal("A", assert(L.end_message(c)))
    c:quit()
    c:close()
    local code, how = L.wait_child(pid, 5)
    local text = L.read(log) or ""
    assert.are.equal("exited", how, text)
    assert.are.equal(0, code, text)
    assert.is_nil(text:find(" ERROR ", 1, true), text)
  end)
end)

describe("the watchdog", function()
  local d
  after_each(function()
    if d then d:stop(); d = nil end
  end)

  it("under --log-format json every line is JSON, the watchdog's included", function()
    d = U.start([[
local milter = require "milter"
return {
  envfrom = function(_, sender) if sender:find("spin") then while true do end end end,
  eom = function() return milter.accept{} end,
}
]], { args = { "--workers", "1", "--script-timeout", "0.5", "--log-format", "json" } })
    local c = assert(d:client({ timeout = 15 }))
    local r = c:session{ mail = "<spin@example.org>", rcpts = { "<a@example.org>" }, body = "b\r\n" }
    c:close()
    assert.are.equal("y", r.mail and r.mail.cmd, r.error)
    local tail = L.tail(d.log_path)
    assert(tail:wait("exited with status 70", 1, 10), "the worker did not exit 70:\n" .. d:log())
    local c2 = assert(d:client({ timeout = 15 }))
    r = c2:session{ mail = "<ok@example.org>", rcpts = { "<a@example.org>" }, body = "b\r\n" }
    c2:close()
    assert.are.equal("a", r.eom and r.eom.cmd, r.error)
    local found
    for _, line in ipairs(tail:poll().lines) do
      local obj = cjson.decode(line)
      assert(type(obj) == "table", "not a JSON line: " .. line)
      if tostring(obj.msg):find("handler envfrom on connection c=%d+ ran past %-%-script%-timeout") then
        found = obj
      end
    end
    assert(found, "no watchdog line:\n" .. d:log())
    assert.are.equal("error", found.level)
  end)
end)

