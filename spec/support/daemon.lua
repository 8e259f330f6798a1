-- Start/stop the real luamilter binary for specs.
local socket = require "socket"
local unistd = require "posix.unistd"
local fcntl = require "posix.fcntl"
local psignal = require "posix.signal"
local pwait = require "posix.sys.wait"
local stdlib = require "posix.stdlib"
local dirent = require "posix.dirent"
local pstat = require "posix.sys.stat"
local mc = require "spec.support.milter_client"
local now = require "spec.support.clock" -- monotonic, for waits

local D = {}

local function binary() return os.getenv("LUAMILTER_BIN") or "./build/luamilter" end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  assert(f:write(data)); assert(f:close())
end

-- removes a file or a directory with everything in it (a daemon's
-- directory can hold a store's directories: left behind, their 64 MB
-- maps filled /tmp run after run); a link is removed, not followed
local function rmtree(path)
  local st = pstat.lstat(path)
  if not st then return end
  if pstat.S_ISDIR(st.st_mode) ~= 0 then
    for name in dirent.files(path) do
      if name ~= "." and name ~= ".." then rmtree(path .. "/" .. name) end
    end
    unistd.rmdir(path)
  else
    os.remove(path)
  end
end

local function free_tcp_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

-- fork + exec argv with stdin from /dev/null and stdout/stderr to files;
-- env: extra environment variables for the child ({NAME = value})
local function spawn(argv, out_path, err_path, env)
  local pid, err = unistd.fork()
  if not pid then return nil, err end
  if pid == 0 then
    for fd = 0, 1023 do unistd.close(fd) end -- drop inherited sockets/files
    local flags = fcntl.O_WRONLY + fcntl.O_CREAT + fcntl.O_APPEND
    local nul = fcntl.open("/dev/null", fcntl.O_RDONLY)  -- becomes fd 0
    local out = fcntl.open(out_path, flags, 420)         -- fd 1
    if nul ~= 0 or out ~= 1 then unistd._exit(126) end
    if err_path == out_path then
      unistd.dup2(1, 2)
    elseif fcntl.open(err_path, flags, 420) ~= 2 then
      unistd._exit(126)
    end
    for k, v in pairs(env or {}) do stdlib.setenv(k, v) end
    local args = {}
    for i = 2, #argv do args[i - 1] = argv[i] end
    unistd.execp(argv[1], args)
    io.stderr:write("exec " .. argv[1] .. " failed\n")
    unistd._exit(127)
  end
  return pid
end

-- non-blocking reap: returns code, how ("exited"/"killed") or nil if running
local function reap(pid)
  local p, how, code = pwait.wait(pid, pwait.WNOHANG)
  if p == pid then return code, how end
  if p == nil then return -1, "lost" end -- ECHILD: not our child any more
  return nil
end

local function wait_pid(pid, timeout)
  local deadline = now() + (timeout or 5)
  repeat
    local code, how = reap(pid)
    if code then return code, how end
    socket.sleep(0.02)
  until now() >= deadline
  return nil
end

local Daemon = {}
Daemon.__index = Daemon
local live = {} -- pid -> daemon, for D.stop_all()

function D.start(script_source, opts)
  opts = opts or {}
  local dir = assert(stdlib.mkdtemp("/tmp/luamilter-spec-XXXXXX"))
  local d = setmetatable({ dir = dir, script_path = dir .. "/script.lua",
    log_path = dir .. "/daemon.log" }, Daemon)
  write_file(d.script_path, script_source)
  if opts.listen then
    d.listen = opts.listen
  elseif opts.tcp then
    d.listen = "inet:" .. free_tcp_port() .. "@127.0.0.1"
  else
    d.listen = "unix:" .. dir .. "/m.sock"
  end
  local argv = { opts.bin or binary(), "-l", d.listen }
  -- One worker unless a spec asks for more: state kept in Lua globals
  -- (a per-worker thing) then behaves the same from run to run.
  local workers, store = false, false
  for _, a in ipairs(opts.args or {}) do
    argv[#argv + 1] = a
    if a == "--workers" or a == "-w" or tostring(a):find("^%-%-workers=") then workers = true end
    if a == "--store" or tostring(a):find("^%-%-store=") then store = true end
  end
  -- The store in the daemon's temp dir unless a spec chooses one: the
  -- default path (/var/lib/luamilter as root) is the machine's, not a test's.
  if not store then
    argv[#argv + 1] = "--store"
    argv[#argv + 1] = "lmdb:" .. dir .. "/store.mdb"
  end
  if not workers then
    argv[#argv + 1] = "--workers"
    argv[#argv + 1] = "1"
  end
  argv[#argv + 1] = d.script_path
  local pid, err = spawn(argv, d.log_path, d.log_path, opts.env)
  if not pid then rmtree(dir); return nil, "fork failed: " .. tostring(err) end
  d.pid = pid
  live[pid] = d
  local deadline = now() + (opts.timeout or 5)
  while true do
    local why
    if not d:alive() then
      why = string.format("daemon exited (%s %s) before listening", d.how, d.status)
    elseif mc.wait_socket(d.listen, 0.05) then
      return d
    elseif now() >= deadline then
      why = "daemon not listening on " .. d.listen .. " after timeout"
    end
    if why then
      d:stop()
      return nil, why .. ":\n" .. d:log()
    end
  end
end

function Daemon:client(opts) return mc.connect(self.listen, opts) end

function Daemon:log()
  if self.final_log then return self.final_log end
  return read_file(self.log_path)
end

function Daemon:alive()
  if self.status then return false end
  local code, how = reap(self.pid)
  if code then
    self.status, self.how = code, how
    live[self.pid] = nil
    return false
  end
  return true
end

function Daemon:signal(name)
  if not self:alive() then return nil, "not running" end
  local signo = psignal["SIG" .. name]
  if not signo then return nil, "unknown signal " .. tostring(name) end
  local ok, err = psignal.kill(self.pid, signo)
  if ok ~= 0 then return nil, err end
  return true
end

-- returns exit code (or signal number), how ("exited"/"killed"); nil on timeout
function Daemon:wait(timeout)
  if not self.status then
    local code, how = wait_pid(self.pid, timeout)
    if not code then return nil end
    self.status, self.how = code, how
    live[self.pid] = nil
  end
  return self.status, self.how
end

function Daemon:stop()
  if self:alive() then
    self:signal("TERM")
    if not self:wait(5) then
      psignal.kill(self.pid, psignal.SIGKILL)
      self:wait(5)
    end
  end
  if not self.final_log then
    self.final_log = read_file(self.log_path)
    rmtree(self.dir)
  end
  return self.status, self.how
end

function Daemon:rewrite_script(src)
  local tmp = self.script_path .. ".new"
  write_file(tmp, src)
  assert(os.rename(tmp, self.script_path))
end

-- process helpers for the other servers the specs start (servers.lua)
D.spawn, D.wait_pid, D.rmtree, D.read_file, D.write_file =
  spawn, wait_pid, rmtree, read_file, write_file

function D.stop_all()
  for _, d in pairs(live) do d:stop() end
end

-- run the binary in the foreground: {status=, how=, stdout=, stderr=, timed_out=}
function D.run(args, timeout)
  local dir = assert(stdlib.mkdtemp("/tmp/luamilter-run-XXXXXX"))
  local argv = { binary() }
  local store = false
  for _, a in ipairs(args or {}) do
    if a == "--store" or tostring(a):find("^%-%-store=") then store = true end
  end
  if not store then -- as in D.start: never the machine's default store
    argv[2], argv[3] = "--store", "lmdb:" .. dir .. "/store.mdb"
  end
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local pid, err = spawn(argv, dir .. "/stdout", dir .. "/stderr")
  if not pid then rmtree(dir); error("fork failed: " .. tostring(err)) end
  local res = {}
  res.status, res.how = wait_pid(pid, timeout or 10)
  if not res.status then
    res.timed_out = true
    psignal.kill(pid, psignal.SIGKILL)
    res.status, res.how = wait_pid(pid, 5)
  end
  res.stdout, res.stderr = read_file(dir .. "/stdout"), read_file(dir .. "/stderr")
  rmtree(dir)
  return res
end

return D
