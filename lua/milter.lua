--- The Lua half of the luamilter API: verdict constructors, and every other
-- name of `milter` with an offline meaning.
--
-- A verdict is a plain table; each constructor only fills in `action`, so
-- handlers can be unit-tested without the daemon. The server validates every
-- verdict after the handler returns (see README, "Verdicts").
--
--   return milter.reject{ code = 550, xcode = "5.7.1", reason = "no" }
--
-- The daemon loads this file, then replaces log, sleep, dns, tcp, redis,
-- http and store with its own and sets script_dir and settings. Under plain
-- Lua (busted) the names stay as below, so that a handler runs with a fake
-- ctx: the lookups fail as a lookup fails (nil, "not available offline")
-- until a test replaces them, milter.store keeps its keys in memory,
-- milter.log writes to stderr and milter.sleep returns at once.
local M = {}

M._VERSION = "luamilter 0.1.0"

-- A bad argument, located at the caller's line. A constructor called as
-- `return milter.reject(...)` is a tail call, which leaves no line of the
-- caller behind; the daemon then names the handler's tail calls.
local function misuse(msg)
  local caller = debug.getinfo(3, "S")
  error(msg, caller and caller.what ~= "C" and 3 or 0)
end

local INDEX_KEYS = { "add_header", "insert_header", "change_header", "delete_header" }

-- headers = { {name, value}, ... }: the whole header list (README, "Header
-- lists"); checked here too, so that the error names the script's line.
local function check_headers(action, h)
  if type(h) ~= "table" then
    misuse(("milter.%s: headers must be a list of {name, value}, got %s"):format(action, type(h)))
  end
  for i = 1, #h do
    local e = h[i]
    if type(e) ~= "table" or type(e[1]) ~= "string" or type(e[2]) ~= "string" then
      misuse(("milter.%s: headers[%d] must be {name, value} (two strings), got %s")
        :format(action, i, type(e) == "table" and "{" .. type(e[1]) .. ", " .. type(e[2]) .. "}" or type(e)))
    end
  end
end

local function constructor(action)
  return function(t)
    if t == nil then
      t = {}
    elseif type(t) ~= "table" then
      misuse(("milter.%s expects a table or nothing, got %s"):format(action, type(t)))
    end
    if t.headers ~= nil then
      check_headers(action, t.headers)
      for _, k in ipairs(INDEX_KEYS) do
        if t[k] ~= nil then
          misuse(("milter.%s: headers (the whole list) cannot be combined with %s"):format(action, k))
        end
      end
    end
    t.action = action
    return t
  end
end

M.continue = constructor("continue")
M.accept = constructor("accept")
M.reject = constructor("reject")
M.tempfail = constructor("tempfail")
M.discard = constructor("discard")
M.skip = constructor("skip")

-- What a nil reply from Redis becomes (a list keeps no holes): one value,
-- compared with ==, which C pushes too.
M.null = setmetatable({}, {
  __tostring = function() return "milter.null" end,
  __newindex = function() error("milter.null is read-only", 2) end,
  __metatable = "milter.null",
})

--- Settings (`--set NAME=VALUE` in the daemon): a test fills them in.
M.settings = {}

--- The script's directory (the daemon's is absolute); offline, the current
-- directory, which a test may change before it loads the policy.
M.script_dir = os.getenv("PWD") or "."

local OFFLINE = "not available offline"

local function check_arg(cond, n, name, msg)
  if not cond then
    error(("bad argument #%d to '%s' (%s)"):format(n, name, msg), 3)
  end
end

local function check_string(v, n, name)
  check_arg(type(v) == "string" or type(v) == "number", n, name,
    "string expected, got " .. (v == nil and "no value" or type(v)))
end

-- ---- milter.log --------------------------------------------------------

local LEVELS = { error = "ERROR", warn = "WARN", info = "INFO", debug = "DEBUG" }

--- milter.log(level, ...): one line on stderr, "LEVEL [lua] file:line: ..."
-- (debug lines are dropped, as under the daemon's default --log-level).
function M.log(level, ...)
  check_arg(LEVELS[level], 1, "log", "level must be error, warn, info or debug")
  if level == "debug" then return end
  local info = debug.getinfo(2, "Sl")
  local where = info and info.currentline > 0 and (info.short_src .. ":" .. info.currentline .. ": ") or ""
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
  -- one write(2) per line, as the daemon's log does
  io.stderr:write(LEVELS[level] .. " [lua] " .. where .. table.concat(parts, " ") .. "\n")
end

-- ---- milter.sleep ------------------------------------------------------

--- milter.sleep(seconds): true, at once (a unit test does not wait).
function M.sleep(seconds)
  check_arg(type(seconds) == "number", 1, "sleep", "number expected, got " .. type(seconds))
  check_arg(seconds >= 0 and seconds <= 1e9, 1, "sleep", "seconds must be >= 0")
  return true
end

-- ---- the lookups: nil, "not available offline" until a test fakes them --

local RRTYPES = { A = true, AAAA = true, MX = true, TXT = true, PTR = true, CNAME = true, NS = true }

M.dns = {}

--- milter.dns.query(name, type [, timeout])
function M.dns.query(name, rrtype)
  check_string(name, 1, "query")
  check_string(rrtype, 2, "query")
  check_arg(RRTYPES[tostring(rrtype):upper()], 2, "query", "record type must be A, AAAA, MX, TXT, PTR, CNAME or NS")
  return nil, OFFLINE
end

--- milter.dns.rbl(address, zone [, timeout])
function M.dns.rbl(address, zone)
  check_string(address, 1, "rbl")
  check_string(zone, 2, "rbl")
  return nil, OFFLINE
end

M.tcp = {}

--- milter.tcp.connect(host, port [, opts]) or ("unix:/path" [, opts])
function M.tcp.connect(host, port)
  check_string(host, 1, "connect")
  if not tostring(host):find("^unix:") then
    check_arg(type(port) == "number" and port >= 1 and port <= 65535 and port % 1 == 0, 2, "connect",
      "port must be 1 to 65535")
  end
  return nil, OFFLINE
end

local redis_mt = { __tostring = function() return "milter.redis" end }
redis_mt.__index = {
  call = function(self, cmd)
    check_arg(getmetatable(self) == redis_mt, 1, "call", "milter.redis expected")
    check_arg(type(cmd) == "string", 2, "call", "expected a command name")
    return nil, OFFLINE
  end,
  pipeline = function(self, cmds)
    check_arg(getmetatable(self) == redis_mt, 1, "pipeline", "milter.redis expected")
    check_arg(type(cmds) == "table", 2, "pipeline", "table expected, got " .. type(cmds))
    return nil, OFFLINE
  end,
}

M.redis = {}

--- milter.redis.new(url [, timeout]): a connection whose calls fail.
function M.redis.new(url)
  check_string(url, 1, "new")
  return setmetatable({ url = url }, redis_mt)
end

M.http = {}

--- milter.http.request{url = ..., ...}
function M.http.request(t)
  check_arg(type(t) == "table", 1, "request", "table expected, got " .. type(t))
  check_arg(type(t.url) == "string", 1, "request", "url must be a string")
  return nil, OFFLINE
end

-- ---- milter.store: in memory, with the daemon's checks and ttl rules ----

-- a userdata, as the daemon's (newproxy: LuaJIT's and Lua 5.1's)
local store = newproxy(true)
local store_mt = getmetatable(store)
local data, expires = {}, {}

local function check_key(self, key, what)
  check_arg(getmetatable(self) == "milter.store", 1, what, "milter.store expected (use store:" .. what .. ")")
  check_arg(type(key) == "string", 2, what, "key must be a string")
  check_arg(#key >= 1 and #key <= 511, 2, what, "key must be 1 to 511 bytes")
  local at = expires[key]
  if at and at <= os.time() then
    data[key], expires[key] = nil, nil
  end
end

local function check_ttl(ttl, n, what)
  if ttl == nil then return nil end
  check_arg(type(ttl) == "number", n, what, "ttl must be a number of seconds")
  check_arg(ttl > 0 and ttl <= 1e9, n, what, "ttl must be a number of seconds > 0")
  return math.ceil(ttl)
end

local function finite(v) return v == v and v ~= math.huge and v ~= -math.huge end

store_mt.__index = {
  --- store:get(key) -> value or nil
  get = function(self, key)
    check_key(self, key, "get")
    return data[key]
  end,
  --- store:set(key, value [, ttl]) -> true
  set = function(self, key, value, ttl)
    check_key(self, key, "set")
    check_arg(type(value) == "string" or (type(value) == "number" and finite(value)), 3, "set",
      "value must be a string or a number (store:del removes a key)")
    ttl = check_ttl(ttl, 4, "set")
    data[key], expires[key] = value, ttl and os.time() + ttl
    return true
  end,
  --- store:del(key) -> true
  del = function(self, key)
    check_key(self, key, "del")
    data[key], expires[key] = nil, nil
    return true
  end,
  --- store:incr(key [, by [, ttl]]) -> the new value (ttl set on creation)
  incr = function(self, key, by, ttl)
    check_key(self, key, "incr")
    check_arg(by == nil or (type(by) == "number" and finite(by)), 3, "incr", "increment must be a finite number")
    ttl = check_ttl(ttl, 4, "incr")
    local old = data[key]
    if old == nil then
      expires[key] = ttl and os.time() + ttl
      old = 0
    elseif type(old) ~= "number" then
      old = tonumber(old)
      if not old then return nil, "not a number" end
    end
    data[key] = old + (by or 1)
    return data[key]
  end,
}

store_mt.__tostring = function() return "milter.store" end
store_mt.__metatable = "milter.store"
M.store = store

return M
