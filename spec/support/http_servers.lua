-- The HTTP(S) server the milter.http specs talk to (spec/support/
-- http_server.py), started on a free loopback port and stopped by pid, and
-- a throwaway CA with a server certificate for 127.0.0.1 and localhost,
-- made by the openssl CLI in a temp dir.
local socket = require "socket"
local stdlib = require "posix.stdlib"
local D = require "spec.support.daemon"
local S = require "spec.support.servers"
local now = require "spec.support.clock" -- monotonic, for waits

local H = {}

local Server = setmetatable({}, { __index = S.Server }) -- stop() by pid
Server.__index = Server

-- GET path on the server from the test itself; returns status, body
function Server:get(path)
  assert(not self.tls, "get() speaks plain HTTP")
  local c = assert(socket.connect("127.0.0.1", self.port))
  c:settimeout(5)
  assert(c:send("GET " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"))
  local all = c:receive("*a")
  c:close()
  local status = tonumber(all:match("^HTTP/1%.%d (%d+)"))
  return status, all:match("\r\n\r\n(.*)$")
end

local function sh(cmd)
  local ok = os.execute(cmd .. " >/dev/null 2>&1")
  assert(ok == true or ok == 0, "failed: " .. cmd)
end

-- a CA (ca.pem) and a server certificate it signed (srv.pem, srv.key)
function H.make_ca(dir)
  local ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
  sh(("cd %s && openssl req -x509 %s -keyout ca.key -out ca.pem -days 2 " ..
    "-subj '/CN=luamilter test CA' -addext basicConstraints=critical,CA:TRUE " ..
    "-addext keyUsage=critical,keyCertSign,cRLSign"):format(dir, ec))
  sh(("cd %s && openssl req %s -keyout srv.key -out srv.csr -subj /CN=localhost"):format(dir, ec))
  D.write_file(dir .. "/ext", "subjectAltName=IP:127.0.0.1,DNS:localhost\n" ..
    "extendedKeyUsage=serverAuth\n")
  sh(("cd %s && openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key " ..
    "-CAcreateserial -out srv.pem -days 2 -extfile ext"):format(dir))
  return dir .. "/ca.pem"
end

-- H.start() plain HTTP; H.start(true) HTTPS (srv.cafile: its CA)
function H.start(tls)
  local dir = assert(stdlib.mkdtemp("/tmp/luamilter-http-XXXXXX"))
  local srv = setmetatable({ dir = dir, tls = tls }, Server)
  local argv = { "python3", "spec/support/http_server.py", dir .. "/port" }
  if tls then
    srv.cafile = H.make_ca(dir)
    argv[#argv + 1] = dir .. "/srv.pem"
    argv[#argv + 1] = dir .. "/srv.key"
  end
  srv.pid = assert(D.spawn(argv, dir .. "/log", dir .. "/log"))
  local deadline = now() + 5
  repeat
    local p = D.read_file(dir .. "/port")
    if p ~= "" then srv.port = tonumber(p); break end
    socket.sleep(0.02)
  until now() > deadline
  if not srv.port then
    local log = D.read_file(dir .. "/log")
    srv:stop()
    error("http server did not start: " .. log)
  end
  srv.base = (tls and "https" or "http") .. "://127.0.0.1:" .. srv.port
  return srv
end

return H
