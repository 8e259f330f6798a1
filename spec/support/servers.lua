-- The servers lookup specs talk to, started on loopback and stopped by pid:
-- a real DNS server (dnsmasq, Debian's dnsmasq-base) serving a test zone,
-- and the tests' own responders (spec/support/lookup_servers.py) for what
-- no packaged server plays: TCP answers held back on demand, DNS failures;
-- Debian's redis-server on a free loopback port and a unix socket; and
-- Debian's rspamd with a private offline config.
local socket = require "socket"
local psignal = require "posix.signal"
local stdlib = require "posix.stdlib"
local unistd = require "posix.unistd"
local dirent = require "posix.dirent"
local pwd = require "posix.pwd"
local D = require "spec.support.daemon"
local now = require "spec.support.clock" -- monotonic, for waits

local S = {}

local Server = {}
Server.__index = Server
S.Server = Server -- a started process, stopped by pid (http_servers.lua extends it)

function Server:stop()
  if self.pid and not self.done then
    psignal.kill(self.pid, psignal.SIGTERM)
    if not D.wait_pid(self.pid, 5) then
      psignal.kill(self.pid, psignal.SIGKILL)
      D.wait_pid(self.pid, 5)
    end
    self.done = true
  end
  if self.dir then D.rmtree(self.dir); self.dir = nil end
end

-- waits (bounded) for a file the server writes once it listens
local function wait_file(path, timeout)
  local deadline = now() + (timeout or 5)
  repeat
    local s = D.read_file(path)
    if s ~= "" then return s end
    socket.sleep(0.02)
  until now() > deadline
  return nil
end

local function own(mode)
  local dir = assert(stdlib.mkdtemp("/tmp/luamilter-srv-XXXXXX"))
  local pf = dir .. "/port"
  local pid = assert(D.spawn({ "python3", "spec/support/lookup_servers.py", mode, pf },
    dir .. "/log", dir .. "/log"))
  local srv = setmetatable({ pid = pid, dir = dir }, Server)
  local port = wait_file(pf)
  if not port then
    local log = D.read_file(dir .. "/log")
    srv:stop()
    error(mode .. " responder did not start: " .. log)
  end
  srv.port = tonumber(port)
  return srv
end

-- the TCP line server; srv:ask(line) sends one line on a connection of
-- the test's own and returns the answer
function S.tcp()
  local srv = own("tcp")
  function srv.ask(_, line)
    local c = assert(socket.connect("127.0.0.1", srv.port))
    c:settimeout(5)
    assert(c:send(line .. "\r\n"))
    local r, err = c:receive("*l")
    c:close()
    return r, err
  end
  return srv
end

function S.dns_failures() return own("dns") end
function S.clamd() return own("clamd") end

S.ZONE = {
  -- answered here, never forwarded: unknown names are NXDOMAIN
  "local=/example.test/", "local=/2.0.192.in-addr.arpa/", "local=/8.b.d.0.1.0.0.2.ip6.arpa/",
  "host-record=mail.example.test,192.0.2.7,2001:db8::7",
  "host-record=mx1.example.test,192.0.2.10",
  "mx-host=example.test,mx1.example.test,10",
  "mx-host=example.test,mx2.example.test,20",
  'txt-record=example.test,"v=spf1 -all"',
  'txt-record=multi.example.test,"part one ","part two"',
  "ptr-record=7.2.0.192.in-addr.arpa,mail.example.test",
  "ptr-record=7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa,mail6.example.test",
  "cname=alias.example.test,mail.example.test",
  -- a DNSBL: 192.0.2.66 and 127.0.0.1 are listed, nothing else
  "host-record=66.2.0.192.zen.example.test,127.0.0.2",
  "host-record=1.0.0.127.zen.example.test,127.0.0.2",
  "txt-record=66.2.0.192.zen.example.test,\"listed\"",
}

-- dnsmasq on a free UDP port of 127.0.0.1 serving S.ZONE (and no upstream)
function S.dnsmasq(extra)
  local dir = assert(stdlib.mkdtemp("/tmp/luamilter-dns-XXXXXX"))
  for _ = 1, 5 do -- another process may take the port we found free
    local u = assert(socket.udp())
    assert(u:setsockname("127.0.0.1", 0))
    local _, port = u:getsockname()
    u:close()
    local conf = { "port=" .. port, "listen-address=127.0.0.1", "bind-interfaces",
      "no-resolv", "no-hosts", "no-poll", "no-negcache", "log-facility=" .. dir .. "/log" }
    for _, l in ipairs(S.ZONE) do conf[#conf + 1] = l end
    for _, l in ipairs(extra or {}) do conf[#conf + 1] = l end
    D.write_file(dir .. "/conf", table.concat(conf, "\n") .. "\n")
    local pid = assert(D.spawn({ "dnsmasq", "-C", dir .. "/conf", "--keep-in-foreground",
      "--pid-file=" .. dir .. "/pid" }, dir .. "/out", dir .. "/out"))
    -- ready once it answers a query (bounded)
    local q = "\18\52\1\0\0\1\0\0\0\0\0\0\4mail\7example\4test\0\0\1\0\1"
    local c = assert(socket.udp())
    c:settimeout(0.1)
    c:setpeername("127.0.0.1", port)
    local deadline = now() + 5
    local up = false
    while now() < deadline and D.wait_pid(pid, 0) == nil do
      c:send(q)
      if c:receive() then up = true; break end
    end
    c:close()
    if up then
      return setmetatable({ pid = pid, dir = dir, port = tonumber(port),
        server = "127.0.0.1:" .. port }, Server)
    end
    psignal.kill(pid, psignal.SIGKILL)
    D.wait_pid(pid, 5)
  end
  local out = D.read_file(dir .. "/out")
  D.rmtree(dir)
  error("dnsmasq did not start: " .. out)
end

-- A tiny RESP client of the tests' own (one connection per command):
-- returns the reply (a string, a number, a list, false for nil) or nil, err.
local function resp_read(c)
  local line, err = c:receive("*l")
  if not line then return nil, err end
  local t, rest = line:sub(1, 1), line:sub(2)
  if t == "+" then return rest end
  if t == "-" then return nil, rest end
  if t == ":" then return tonumber(rest) end
  if t == "$" then
    local n = tonumber(rest)
    if n < 0 then return false end
    local data = c:receive(n + 2)
    return data and data:sub(1, n)
  end
  if t == "*" then
    local n = tonumber(rest)
    if n < 0 then return false end
    local out = {}
    for i = 1, n do out[i] = resp_read(c) end
    return out
  end
  return nil, "bad reply: " .. line
end

local function resp(port, password, args)
  local c = socket.tcp()
  c:settimeout(5)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then c:close(); return nil, err end
  local function send(a)
    local parts = { "*" .. #a .. "\r\n" }
    for _, x in ipairs(a) do
      x = tostring(x)
      parts[#parts + 1] = "$" .. #x .. "\r\n" .. x .. "\r\n"
    end
    return c:send(table.concat(parts))
  end
  if password then
    send({ "AUTH", password })
    resp_read(c)
  end
  send(args)
  local r, e = resp_read(c)
  c:close()
  return r, e
end

-- redis-server (Debian's) on a free port of 127.0.0.1 (or opts.port) and
-- on the unix socket srv.sock, with no persistence; opts.password sets
-- --requirepass. srv:cmd(...) runs one command; srv.url is its redis://.
function S.redis(opts)
  opts = opts or {}
  local dir = assert(stdlib.mkdtemp("/tmp/luamilter-redis-XXXXXX"))
  for _ = 1, 5 do
    local port = opts.port
    if not port then
      local s = assert(socket.bind("127.0.0.1", 0))
      local _, p = s:getsockname()
      s:close()
      port = tonumber(p)
    end
    local argv = { "redis-server", "--port", tostring(port), "--bind", "127.0.0.1",
      "--save", "", "--appendonly", "no", "--dir", dir, "--daemonize", "no",
      "--unixsocket", dir .. "/redis.sock", "--unixsocketperm", "700",
      "--logfile", dir .. "/log", "--databases", "4" }
    if opts.password then
      argv[#argv + 1] = "--requirepass"
      argv[#argv + 1] = opts.password
    end
    local pid = assert(D.spawn(argv, dir .. "/out", dir .. "/out"))
    local deadline = now() + 5
    local up = false
    while now() < deadline and D.wait_pid(pid, 0) == nil do
      local r, err = resp(port, nil, { "PING" })
      if r == "PONG" or (err and err:find("^NOAUTH")) then up = true; break end
      socket.sleep(0.02)
    end
    if up then
      local srv = setmetatable({ pid = pid, dir = dir, port = port, sock = dir .. "/redis.sock",
        password = opts.password, url = "redis://127.0.0.1:" .. port }, Server)
      function srv.cmd(self, ...) return resp(self.port, self.password, { ... }) end
      return srv
    end
    psignal.kill(pid, psignal.SIGKILL)
    D.wait_pid(pid, 5)
    if opts.port then break end -- the port asked for is taken: no retry
  end
  local out = D.read_file(dir .. "/out") .. D.read_file(dir .. "/log")
  D.rmtree(dir)
  error("redis-server did not start: " .. out)
end

-- rspamd: what every task is logged as (see S.rspamd), "|key=value" pairs
-- after this tag; $lua gives what the other variables cannot (the HELO)
local TASK_LOG = "luamilter-task|qid=$qid|ip=$ip|from=$smtp_from|rcpts=$smtp_rcpts|user=$user" ..
  "|helo=$lua{return function(task) return tostring(task:get_helo()) end}" ..
  "|action=$action|scores=$scores|symbols=$symbols_scores|dns=$dns_req|"

-- Debian's rspamd (3.4) in the foreground with a private config in a temp
-- dir: Debian's own rules, scores and actions (the metrics, actions, groups
-- and composites files of /etc/rspamd, the Lua rules of /usr/share/rspamd)
-- and its chartable and regexp modules, with one normal worker on a free
-- port of 127.0.0.1. Left out, so that it answers offline and fast: the
-- controller, proxy and fuzzy workers; every Lua plugin (no modules {}
-- section: RBLs, SPF, DMARC, ASN, Redis-backed modules... want network, DNS
-- or Redis); the dkim and fuzzy_check modules. DNS goes to a closed
-- loopback port (srv:task(qid).dns counts the queries: 0). Two changes for
-- start-up time: a short TLD list (Debian's public suffix list takes ~20 s
-- to compile into a hyperscan matcher at every start), and PCRE for the
-- rules (the hs_helper process rspamd always starts compiles in the
-- background, into the temp dir). rspamd's own log of each task:
-- srv:task(qid). srv.url is its /checkv2.
local Rspamd = setmetatable({}, { __index = Server })
Rspamd.__index = Rspamd

local function http_get(port, path)
  local c = socket.tcp()
  c:settimeout(1)
  local ok = c:connect("127.0.0.1", port)
  if not ok then c:close(); return nil end
  c:send("GET " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
  local all = c:receive("*a")
  c:close()
  return all and all:match("\r\n\r\n(.*)$")
end

-- the pids whose parent is pid (rspamd's workers), from /proc
local function children(pid)
  local out = {}
  for name in dirent.files("/proc") do
    if name:find("^%d+$") then
      local stat = D.read_file("/proc/" .. name .. "/stat")
      if tonumber(stat:match("%) %S+ (%d+)")) == pid then out[#out + 1] = tonumber(name) end
    end
  end
  return out
end

function S.rspamd()
  local dir = assert(stdlib.mkdtemp("/tmp/luamilter-rspamd-XXXXXX"))
  D.write_file(dir .. "/tld.dat", "org\ncom\nnet\ntest\n")
  local argv = { "rspamd", "-f", "-c", dir .. "/rspamd.conf" }
  for _, v in ipairs { "DBDIR", "RUNDIR", "LOGDIR", "LOCAL_CONFDIR" } do -- nothing of /etc, /var
    argv[#argv + 1] = "--var"
    argv[#argv + 1] = v .. "=" .. dir
  end
  if unistd.geteuid() == 0 then -- rspamd refuses to run its workers as root
    local u = assert(pwd.getpwnam("_rspamd"), "no _rspamd user (scripts/deps.sh test)")
    assert(unistd.chown(dir, u.pw_uid, u.pw_gid))
    for _, a in ipairs { "-u", "_rspamd", "-g", "_rspamd" } do argv[#argv + 1] = a end
  end
  local t0 = now()
  for _ = 1, 5 do -- another process may take the port we found free
    local s = assert(socket.bind("127.0.0.1", 0))
    local _, port = s:getsockname()
    s:close()
    D.write_file(dir .. "/rspamd.conf", table.concat({
      'lua = "$RULESDIR/rspamd.lua";',
      '.include "$CONFDIR/metrics.conf"',
      '.include "$CONFDIR/actions.conf"',
      '.include "$CONFDIR/groups.conf"',
      '.include "$CONFDIR/composites.conf"',
      "options {",
      '  filters = "chartable,regexp";',
      "  disable_hyperscan = true;",
      ('  hs_cache_dir = "%s"; tempdir = "%s"; url_tld = "%s/tld.dat";'):format(dir, dir, dir),
      '  dns { nameserver = ["127.0.0.1:1"]; timeout = 0.1s; retransmits = 1; }',
      "}",
      "logging {",
      ('  type = "file"; filename = "%s/rspamd.log"; level = "info";'):format(dir),
      "  log_format = " .. ("%q"):format(TASK_LOG) .. ";",
      "}",
      ('worker "normal" { bind_socket = "127.0.0.1:%d"; count = 1; }'):format(port),
    }, "\n") .. "\n")
    local pid = assert(D.spawn(argv, dir .. "/out", dir .. "/out"))
    local srv = setmetatable({ pid = pid, dir = dir, port = tonumber(port),
      url = ("http://127.0.0.1:%d/checkv2"):format(port) }, Rspamd)
    -- ready once the worker answers (bounded: ~1 s here, more on a busy host)
    local deadline = now() + 30
    while now() < deadline and D.wait_pid(pid, 0) == nil do
      if http_get(srv.port, "/ping") == "pong\r\n" then
        srv.startup = now() - t0
        return srv
      end
      socket.sleep(0.05)
    end
    srv.dir = nil -- keep the log for the error
    srv:stop()
  end
  local out = D.read_file(dir .. "/out") .. D.read_file(dir .. "/rspamd.log")
  D.rmtree(dir)
  error("rspamd did not start: " .. out:sub(-2000))
end

-- SIGTERM to the main process, which stops its workers; a worker it left
-- behind is killed by pid
function Rspamd:stop()
  if self.pid and not self.done then
    local kids = children(self.pid)
    psignal.kill(self.pid, psignal.SIGTERM)
    if not D.wait_pid(self.pid, 10) then
      psignal.kill(self.pid, psignal.SIGKILL)
      D.wait_pid(self.pid, 5)
    end
    self.done = true
    for _, k in ipairs(kids) do
      if D.read_file("/proc/" .. k .. "/cmdline"):find("^rspamd") then psignal.kill(k, psignal.SIGKILL) end
    end
  end
  if self.dir then D.rmtree(self.dir); self.dir = nil end
end

-- rspamd's log line for the task with this Queue-Id, as a table of the
-- TASK_LOG fields; waits (bounded) for it
function Rspamd:task(qid, timeout)
  local deadline = now() + (timeout or 5)
  repeat
    for line in D.read_file(self.dir .. "/rspamd.log"):gmatch("[^\n]+") do
      local rec = line:match("luamilter%-task(|.*)$")
      if rec and rec:find("|qid=" .. qid .. "|", 1, true) then
        local t = {}
        for k, v in rec:gmatch("|(%w+)=([^|]*)") do t[k] = v end
        return t
      end
    end
    socket.sleep(0.05)
  until now() > deadline
  return nil
end

return S
