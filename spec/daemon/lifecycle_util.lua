-- Helpers of spec/daemon/lifecycle_spec.lua (not a spec itself: no _spec
-- suffix): processes (/proc), an incremental log reader, the tagged policy
-- scripts, a strict session checker, and a raw launcher for daemons the
-- specs start outside spec/support/daemon.lua (--daemon, --user, cwd).
-- Every wait is bounded.
package.path = "./?.lua;" .. package.path

local socket = require "socket"
local unistd = require "posix.unistd"
local fcntl = require "posix.fcntl"
local psignal = require "posix.signal"
local pwait = require "posix.sys.wait"
local pstat = require "posix.sys.stat"
local stdlib = require "posix.stdlib"
local dirent = require "posix.dirent"
local mc = require "spec.support.milter_client"

local L = { mc = mc }

L.now = require "spec.support.clock"

function L.binary() return os.getenv("LUAMILTER_BIN") or "./build/luamilter" end

---------------------------------------------------------------------------
-- files

function L.read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

function L.write(path, data)
  local f = assert(io.open(path, "wb"))
  assert(f:write(data)); assert(f:close())
end

-- replaces path atomically (the daemon never reads a half-written script)
function L.replace(path, data)
  L.write(path .. ".new", data)
  assert(os.rename(path .. ".new", path))
end

function L.exists(path) return pstat.lstat(path) ~= nil end

function L.tmpdir(prefix)
  return assert(stdlib.mkdtemp("/tmp/" .. (prefix or "luamilter-lc") .. "-XXXXXX"))
end

function L.rmtree(path)
  local st = pstat.lstat(path)
  if not st then return end
  if pstat.S_ISDIR(st.st_mode) ~= 0 then
    for name in dirent.files(path) do
      if name ~= "." and name ~= ".." then L.rmtree(path .. "/" .. name) end
    end
    unistd.rmdir(path)
  else
    os.remove(path)
  end
end

-- names in a directory, sorted (without . and ..)
function L.ls(dir)
  local out = {}
  for name in dirent.files(dir) do
    if name ~= "." and name ~= ".." then out[#out + 1] = name end
  end
  table.sort(out)
  return out
end

---------------------------------------------------------------------------
-- processes

-- fork + exec argv; stdin /dev/null, stdout/stderr appended to files
function L.spawn(argv, out_path, err_path, cwd)
  local pid, err = unistd.fork()
  if not pid then return nil, err end
  if pid == 0 then
    for fd = 0, 1023 do unistd.close(fd) end
    local flags = fcntl.O_WRONLY + fcntl.O_CREAT + fcntl.O_APPEND
    local nul = fcntl.open("/dev/null", fcntl.O_RDONLY)
    local out = fcntl.open(out_path, flags, 420)
    if nul ~= 0 or out ~= 1 then unistd._exit(126) end
    if err_path == out_path then
      unistd.dup2(1, 2)
    elseif fcntl.open(err_path, flags, 420) ~= 2 then
      unistd._exit(126)
    end
    if cwd and unistd.chdir(cwd) ~= 0 then unistd._exit(126) end
    local args = {}
    for i = 2, #argv do args[i - 1] = argv[i] end
    unistd.execp(argv[1], args)
    unistd._exit(127)
  end
  return pid
end

-- waits for a child of ours: code, how ("exited"/"killed"), or nil on timeout
function L.wait_child(pid, timeout)
  local deadline = L.now() + (timeout or 5)
  repeat
    local p, how, code = pwait.wait(pid, pwait.WNOHANG)
    if p == pid then return code, how end
    if p == nil then return -1, "lost" end
    socket.sleep(0.01)
  until L.now() >= deadline
  return nil
end

-- /proc/PID/stat fields: state, ppid, pgrp, session (nil when gone)
function L.stat(pid)
  local s = L.read("/proc/" .. pid .. "/stat")
  if not s then return nil end
  local comm, rest = s:match("^%d+ (%b()) (.*)$")
  if not rest then return nil end
  local state, ppid, pgrp, sid = rest:match("^(%S) (%d+) (%d+) (%d+)")
  return { comm = comm:sub(2, -2), state = state, ppid = tonumber(ppid), pgrp = tonumber(pgrp),
    sid = tonumber(sid) }
end

-- a process that exists and is not a zombie
function L.alive(pid)
  local st = L.stat(pid)
  return st ~= nil and st.state ~= "Z" and st.state ~= "X"
end

function L.wait_dead(pid, timeout)
  return L.wait_until(function() return not L.alive(pid) end, timeout or 5)
end

-- live child processes of pid, sorted; the short-lived process that checks
-- a script (named luamilter-check) is not a worker and not listed
function L.children(pid)
  local out = {}
  for name in dirent.files("/proc") do
    local n = tonumber(name)
    if n then
      local st = L.stat(n)
      if st and st.ppid == pid and st.state ~= "Z" and st.state ~= "X" and st.comm ~= "luamilter-check" then
        out[#out + 1] = n
      end
    end
  end
  table.sort(out)
  return out
end

-- waits until pid has exactly n live children; returns them (or nil)
function L.wait_children(pid, n, timeout)
  return L.wait_until(function()
    local ch = L.children(pid)
    if #ch == n then return ch end
  end, timeout or 5)
end

-- the n workers of a supervisor that logs to log_path (or nil).  Its
-- start-up check of the script runs in a child too, one that has a
-- worker's name until it renames itself; it is over once the supervisor
-- logged that it serves, and the workers come only after that line.
function L.wait_workers(pid, n, log_path, timeout)
  local serving = L.wait_until(function()
    return (L.read(log_path) or ""):find("luamilter serving ", 1, true)
  end, timeout or 5)
  return serving and L.wait_children(pid, n, timeout)
end

-- /proc/PID/status as a table: name -> value string
function L.status(pid)
  local s = L.read("/proc/" .. pid .. "/status")
  if not s then return nil end
  local t = {}
  for k, v in s:gmatch("([%w_]+):%s*([^\n]*)") do t[k] = v end
  return t
end

-- target of a symbolic link (luaposix's readlink trips over /proc links)
function L.readlink(path)
  local ffi = require "ffi"
  pcall(ffi.cdef, "long readlink(const char *path, char *buf, size_t size);")
  local buf = ffi.new("char[4096]")
  local n = tonumber(ffi.C.readlink(path, buf, 4096))
  if n < 0 then return nil end
  return ffi.string(buf, n)
end

function L.rss_kb(pid)
  local st = L.status(pid)
  return st and tonumber((st.VmRSS or ""):match("^(%d+)"))
end

function L.kill(pid, name)
  return psignal.kill(pid, psignal["SIG" .. name])
end

-- polls fn until it returns a true value (returned) or timeout (nil)
function L.wait_until(fn, timeout, step)
  local deadline = L.now() + (timeout or 5)
  while true do
    local v = fn()
    if v then return v end
    if L.now() >= deadline then return nil end
    socket.sleep(step or 0.01)
  end
end

---------------------------------------------------------------------------
-- a daemon started outside spec/support/daemon.lua

local Proc = {}
Proc.__index = Proc

-- opts: cwd, log (stderr, and stdout unless opts.out), out, listen (wait
-- until it accepts), timeout.  Returns the process object, or nil, why
function L.launch(argv, opts)
  opts = opts or {}
  local log = assert(opts.log, "launch needs a log path")
  local pid, err = L.spawn(argv, opts.out or log, log, opts.cwd)
  if not pid then return nil, "fork failed: " .. tostring(err) end
  local p = setmetatable({ pid = pid, log_path = log }, Proc)
  if opts.listen then
    local deadline = L.now() + (opts.timeout or 5)
    while true do
      if not p:alive() then
        return nil, ("exited (%s %s) before listening:\n%s"):format(p.how, p.status, p:log())
      end
      if mc.wait_socket(opts.listen, 0.05) then break end
      if L.now() >= deadline then
        p:stop()
        return nil, "not listening on " .. opts.listen .. ":\n" .. p:log()
      end
    end
  end
  return p
end

function Proc:log() return L.read(self.log_path) or "" end

function Proc:alive()
  if self.status then return false end
  local p, how, code = pwait.wait(self.pid, pwait.WNOHANG)
  if p == self.pid or p == nil then
    self.status, self.how = code or -1, how or "lost"
    return false
  end
  return true
end

function Proc:signal(name) return L.kill(self.pid, name) end

function Proc:wait(timeout)
  if not self.status then
    local code, how = L.wait_child(self.pid, timeout)
    if not code then return nil end
    self.status, self.how = code, how
  end
  return self.status, self.how
end

function Proc:stop()
  if self:alive() then
    self:signal("TERM")
    if not self:wait(5) then
      L.kill(self.pid, "KILL")
      self:wait(5)
    end
  end
  return self.status, self.how
end

---------------------------------------------------------------------------
-- incremental log reader: t.lines grows as the file does

local Tail = {}
Tail.__index = Tail

function L.tail(path) return setmetatable({ path = path, pos = 0, partial = "", lines = {} }, Tail) end

function Tail:poll()
  local f = io.open(self.path, "rb")
  if not f then return self end
  f:seek("set", self.pos)
  local s = f:read("*a")
  f:close()
  if s and #s > 0 then
    self.pos = self.pos + #s
    s = self.partial .. s
    local last = 1
    for line, e in s:gmatch("([^\n]*)\n()") do
      self.lines[#self.lines + 1] = line
      last = e
    end
    self.partial = s:sub(last)
  end
  return self
end

-- first line index >= from whose text matches the Lua pattern, and the
-- captures; waits (bounded) for it to appear
function Tail:wait(pattern, from, timeout, step)
  local i = from or 1
  local deadline = L.now() + (timeout or 5)
  while true do
    self:poll()
    while i <= #self.lines do
      local caps = { self.lines[i]:match(pattern) }
      if caps[1] then return i, unpack(caps) end
      i = i + 1
    end
    if L.now() >= deadline then return nil end
    socket.sleep(step or 0.005)
  end
end

-- every line matching the Lua pattern
function Tail:grep(pattern)
  self:poll()
  local out = {}
  for _, line in ipairs(self.lines) do
    if line:match(pattern) then out[#out + 1] = line end
  end
  return out
end

-- waits until every pid in pids logged "worker PID now serves generation G"
-- (the debug line of a worker's reload); true, or false after the timeout
function Tail:wait_workers(pids, gen, timeout)
  local want = {}
  for _, p in ipairs(pids) do want["worker " .. p .. " now serves generation " .. gen] = true end
  return L.wait_until(function()
    self:poll()
    local n = 0
    for _, line in ipairs(self.lines) do
      for w in pairs(want) do
        if line:sub(-#w) == w then n = n + 1 end
      end
    end
    return n >= #pids
  end, timeout or 2) ~= nil
end

---------------------------------------------------------------------------
-- the policy scripts: one behaviour per tag
--
--   RCPT <x@a>          reject 550 5.7.1 "gen-TAG"
--   RCPT <pid@a>        reject 550 5.7.1 "gen-TAG pid=WORKERPID"
--   RCPT <hold:FLAG>    logs "HOLD TAG pid=WORKERPID", blocks the worker
--                       until the file FLAG exists (at most 5 s), then
--                       answers as <pid@a>
--   other RCPT          continue
--   EOM                 logs "TAG TAG", accept adding "X-Gen: TAG"
--
-- opts.extra: Lua code run at load (after TAG is defined)

local POLICY = [=[
local milter = require "milter"
local ffi = require "ffi"
pcall(ffi.cdef, "int poll(void *fds, unsigned long nfds, int timeout);")
local TAG = %q
%s
local function pid()
  local f = io.open("/proc/self/stat")
  local p = f:read("*a"):match("^(%%d+)")
  f:close()
  return p
end
local function reply(extra)
  return milter.reject{ code = 550, xcode = "5.7.1", reason = "gen-" .. TAG .. (extra or "") }
end
local H = {}
function H.envrcpt(ctx, rcpt)
  if rcpt == "<x@a>" then return reply() end
  if rcpt == "<pid@a>" then return reply(" pid=" .. pid()) end
  local flag = rcpt:match("^<hold:(.*)>$")
  if flag then
    ctx:log("info", "HOLD " .. TAG .. " pid=" .. pid())
    for _ = 1, 500 do
      local f = io.open(flag)
      if f then f:close(); break end
      ffi.C.poll(nil, 0, 10)
    end
    return reply(" pid=" .. pid())
  end
end
function H.eom(ctx)
  ctx:log("info", "TAG " .. TAG)
  return milter.accept{ add_header = { { "X-Gen", TAG } } }
end
return H
]=]

function L.policy(tag, opts)
  opts = opts or {}
  return POLICY:format(tag, opts.extra or "")
end

-- scripts that must not load; [3] is what the error names after the path:
-- ":LINE:" for file:line.  Each would answer "gen-BAD" if it ever served.
L.BROKEN = {
  { "a syntax error", "local milter = require 'milter'\nlocal x = = 1\n" .. "return {}\n", ":2:" },
  { "a top-level error", "local milter = require 'milter'\nlocal H = {}\n"
    .. "function H.envrcpt() return milter.reject{ reason = 'gen-BAD' } end\n"
    .. "error('broken-at-load')\nreturn H\n", ":4:" },
  { "an unknown handler key", "local milter = require 'milter'\nreturn {\n"
    .. "  envrcpt = function() return milter.reject{ reason = 'gen-BAD' } end,\n"
    .. "  envelope_from = function() end,\n}\n", ":4:" },
}

---------------------------------------------------------------------------
-- strict sessions against the policy above

local QID = { { "i", "4F2A1B3C5D" } }

local function desc(r)
  if type(r) ~= "table" then return tostring(r) end
  return "'" .. r.cmd .. "'" .. (r.text and (" " .. r.text) or "")
end

-- a reply for an event the policy does not handle: the server either asked
-- the MTA not to send it, not to wait, or answers continue
local function neutral(r) return r == "skipped" or r == "noreply" or (type(r) == "table" and r.cmd == "c") end

function L.open(c)
  local neg, err = c:optneg(mc.OFFER.postfix)
  if not neg then return nil, "optneg: " .. tostring(err) end
  local r
  r, err = c:connect_ev("client.example.org", "4", 40000, "192.0.2.1",
    { { "j", "mta.example.org" }, { "v", "Postfix 3.7.11" } })
  if not neutral(r) then return nil, "connect: " .. desc(r or err) end
  r, err = c:helo("client.example.org", {})
  if not neutral(r) then return nil, "helo: " .. desc(r or err) end
  return true
end

-- MAIL and the RCPT <x@a> that names the generation; returns its tag
function L.begin_message(c)
  local r, err = c:mail("<s@example.org>", {}, { { "{mail_addr}", "s@example.org" } })
  if not neutral(r) then return nil, "mail: " .. desc(r or err) end
  r, err = c:rcpt("<x@a>", {}, { { "{rcpt_addr}", "x@a" } })
  if type(r) ~= "table" or r.cmd ~= "y" then return nil, "rcpt <x@a>: " .. desc(r or err) end
  local tag = r.text:match("^550 5%.7%.1 gen%-(%S+)$")
  if not tag then return nil, "rcpt <x@a>: unexpected text " .. desc(r) end
  return tag
end

-- a recipient that is accepted, then DATA .. EOM; returns the X-Gen tag
function L.end_message(c)
  local r, err = c:rcpt("<ok@a>", {}, { { "{rcpt_addr}", "ok@a" } })
  if not neutral(r) then return nil, "rcpt <ok@a>: " .. desc(r or err) end
  r, err = c:data(QID)
  if not neutral(r) then return nil, "data: " .. desc(r or err) end
  for _, h in ipairs({ { "From", "<s@example.org>" }, { "Subject", "hi" } }) do
    r, err = c:header(h[1], h[2], QID)
    if not neutral(r) then return nil, "header: " .. desc(r or err) end
  end
  r, err = c:eoh(QID)
  if not neutral(r) then return nil, "eoh: " .. desc(r or err) end
  r, err = c:body("Hello.\r\n", QID)
  if not neutral(r) then return nil, "body: " .. desc(r or err) end
  r, err = c:eom(QID)
  if type(r) ~= "table" or r.cmd ~= "a" then return nil, "eom: " .. desc(r or err) end
  local m = r.mods
  if #m ~= 1 or m[1].op ~= "addheader" or m[1].name ~= "X-Gen" then
    return nil, "eom: unexpected modifications (" .. #m .. ")"
  end
  c:abort()
  return m[1].value
end

-- one whole message; its tag when RCPT and EOM agree
function L.message(c)
  local t1, err = L.begin_message(c)
  if not t1 then return nil, err end
  local t2
  t2, err = L.end_message(c)
  if not t2 then return nil, err end
  if t1 ~= t2 then return nil, "message switched script: rcpt " .. t1 .. ", eom " .. t2 end
  return t1
end

-- a connection with opts.messages (default 1) messages, opts.pause seconds
-- between them.  Returns {tag=, error=, t0= (before connect), t1= (OPTNEG
-- answered: the generation is fixed by then), t2= (end)}
function L.session(spec, opts)
  opts = opts or {}
  local res = { t0 = L.now() }
  local c, err = mc.connect(spec, { timeout = opts.timeout or 5 })
  if not c then res.error = "connect: " .. tostring(err); return res end
  local ok
  ok, err = L.open(c)
  res.t1 = L.now()
  if not ok then c:close(); res.error = err; res.t2 = L.now(); return res end
  for i = 1, opts.messages or 1 do
    if i > 1 and opts.pause and opts.pause > 0 then socket.sleep(opts.pause) end
    local tag
    tag, err = L.message(c)
    if not tag then res.error = "message " .. i .. ": " .. err; break end
    if res.tag and res.tag ~= tag then
      res.error = ("connection switched script: %s then %s"):format(res.tag, tag)
      break
    end
    res.tag = tag
  end
  c:quit()
  c:close()
  res.t2 = L.now()
  return res
end

---------------------------------------------------------------------------
-- forked clients

-- runs fn() in a child process; returns its pid.  The child never returns
-- into busted: it exits 0, or 1 after writing the error to errpath
function L.fork(fn, errpath)
  local pid = assert(unistd.fork())
  if pid == 0 then
    local ok, err = pcall(fn)
    if not ok and errpath then pcall(L.write, errpath, "CRASH " .. tostring(err) .. "\n") end
    unistd._exit(ok and 0 or 1)
  end
  return pid
end

-- a client that loops sessions until stopflag exists (or max_time), then
-- writes one line per session: "t0 t1 t2 TAG|- ok|error..."
function L.stream_client(spec, outpath, stopflag, max_time, seed)
  local out, n = {}, seed or 0
  local deadline = L.now() + max_time
  while L.now() < deadline and not L.exists(stopflag) do
    n = n + 1
    local res = L.session(spec, { messages = 2, pause = (n % 3) * 0.01, timeout = 10 })
    out[#out + 1] = ("%.6f %.6f %.6f %s %s"):format(res.t0, res.t1 or 0, res.t2 or L.now(),
      res.tag or "-", res.error or "ok")
  end
  L.write(outpath, table.concat(out, "\n") .. "\n")
end

function L.parse_stream(text)
  local out = {}
  for line in (text or ""):gmatch("[^\n]+") do
    local t0, t1, t2, tag, rest = line:match("^(%S+) (%S+) (%S+) (%S+) (.*)$")
    if t0 then
      out[#out + 1] = { t0 = tonumber(t0), t1 = tonumber(t1), t2 = tonumber(t2),
        tag = tag ~= "-" and tag or nil, result = rest }
    else
      out[#out + 1] = { result = line }
    end
  end
  return out
end

---------------------------------------------------------------------------
-- identities

-- in a child process as uid/gid (no supplementary groups): can it connect
-- to the unix socket?  true, or false and the error
function L.connect_as(path, uid, gid)
  local ffi = require "ffi"
  pcall(ffi.cdef, "int setgroups(size_t size, const unsigned int *list);")
  local dir = L.tmpdir("luamilter-as")
  assert(pstat.chmod(dir, 511)) -- 0777: the child writes its result there
  local out = dir .. "/result"
  local pid = L.fork(function()
    if ffi.C.setgroups(0, nil) ~= 0 then error("setgroups failed") end
    assert(unistd.setpid("g", gid))
    assert(unistd.setpid("u", uid))
    local c, err = mc.connect("unix:" .. path, { timeout = 2 })
    if c then c:close() end
    L.write(out, c and "ok" or ("refused: " .. tostring(err)))
  end, out)
  local code = L.wait_child(pid, 5)
  local res = L.read(out) or ("no result (child status " .. tostring(code) .. ")")
  L.rmtree(dir)
  if res == "ok" then return true end
  return false, res
end

return L
