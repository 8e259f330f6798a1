-- luacheck: std +busted
-- milter.redis against Debian's real redis-server on loopback (TCP and a
-- unix socket): every reply type, pipelines, AUTH and SELECT from the URL,
-- one connection per worker and URL, reconnecting after a restart, a
-- server that never answers, misuse, abandoning a waiting handler, and the
-- README's "Redis counter" recipe.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local S = require "spec.support.servers"
local socket = require "socket"
local stdlib = require "posix.stdlib"
local now = require "spec.support.clock" -- monotonic, for waits

local function show(r)
  if type(r) ~= "table" then return tostring(r) end
  return r.cmd .. (r.text and (" " .. r.text) or "")
end

local read = U.read

describe("milter.redis", function()
  local d, srv
  setup(function() srv = S.redis() end)
  teardown(function() if srv then srv:stop() end end)
  after_each(function()
    if d then d:stop(); d = nil end
  end)

  -- a daemon whose script sees URL, PORT and SOCK (the unix socket) of
  -- server (default srv)
  local function start(body, args, server)
    server = server or srv
    d = U.start(U.script("local URL = " .. ("%q"):format(server.url) .. "\n" ..
      "local PORT = " .. server.port .. "\n" ..
      "local SOCK = " .. ("%q"):format(server.sock) .. "\n" .. body), { args = args })
    return d
  end

  it("call: integer, status, bulk, nil (milter.null), array, error reply; exact numbers", function()
    assert(srv:cmd("DEL", "n", "s", "l", "b"))
    start [[
local r = milter.redis.new(URL)
function H.envfrom(ctx)
  seen(ctx, "incr", { r:call("INCR", "n") })
  seen(ctx, "incrby", { r:call("INCRBY", "n", 41) })
  seen(ctx, "set", { r:call("SET", "s", "v") })
  seen(ctx, "get", { r:call("GET", "s") })
  local v = r:call("GET", "missing")
  seen(ctx, "null", { v == milter.null, tostring(v) })
  r:call("RPUSH", "l", "a", "b", 3)
  seen(ctx, "array", { r:call("LRANGE", "l", 0, -1) })
  local m = r:call("MGET", "s", "missing")
  seen(ctx, "mget", { m[1], m[2] == milter.null, #m })
  seen(ctx, "empty", { r:call("LRANGE", "nolist", 0, -1) })
  seen(ctx, "err", { r:call("INCR", "s") })
  seen(ctx, "arity", { r:call("GET") })
  r:call("SET", "b", "a\0b\r\nc")
  seen(ctx, "binary", { r:call("GET", "b") })
  r:call("SET", "f", 0.1)
  seen(ctx, "float", { r:call("GET", "f") })
  r:call("SET", "f", 10.0)
  seen(ctx, "int", { r:call("GET", "f") })
  r:call("SET", "f", -2^53)
  seen(ctx, "big", { r:call("GET", "f") })
  seen(ctx, "opts", { r:call("PING", { timeout = 2 }) })
end
return H
]]
    local c = U.client(d)
    local res = c:session {}
    c:close()
    assert.are.equal("c", res.mail.cmd, show(res.mail))
    assert.are.same({ { 1 } }, U.seen(d, "incr"))
    assert.are.same({ { 42 } }, U.seen(d, "incrby"))
    assert.are.same({ { "OK" } }, U.seen(d, "set"))
    assert.are.same({ { "v" } }, U.seen(d, "get"))
    assert.are.same({ { true, "milter.null" } }, U.seen(d, "null"))
    assert.are.same({ { { "a", "b", "3" } } }, U.seen(d, "array"))
    assert.are.same({ { "v", true, 2 } }, U.seen(d, "mget"))
    assert.are.same({ { {} } }, U.seen(d, "empty"))
    assert.are.same({ { nil, "ERR value is not an integer or out of range" } }, U.seen(d, "err"))
    assert.are.same({ { nil, "ERR wrong number of arguments for 'get' command" } }, U.seen(d, "arity"))
    assert.are.same({ { "a\0b\r\nc" } }, U.seen(d, "binary"))
    assert.are.same({ { "0.1" } }, U.seen(d, "float"))
    assert.are.same({ { "10" } }, U.seen(d, "int"))
    assert.are.same({ { "-9007199254740992" } }, U.seen(d, "big"))
    assert.are.same({ { "PONG" } }, U.seen(d, "opts"))
  end)

  it("pipeline: one list of replies; an error reply is {err=} in it and its text second", function()
    assert(srv:cmd("DEL", "p", "q"))
    start [[
local r = milter.redis.new(URL)
function H.envfrom(ctx)
  seen(ctx, "ok", { r:pipeline{ { "INCR", "p" }, { "EXPIRE", "p", 60 }, { "TTL", "p" } } })
  seen(ctx, "mixed", { r:pipeline({ { "SET", "q", "x" }, { "INCR", "q" }, { "GET", "q" },
                                     { "GET", "nothing" } }, { timeout = 2 }) })
  local many = {}
  for i = 1, 500 do many[i] = { "INCR", "p" } end
  local res = r:pipeline(many, 3)
  seen(ctx, "many", { #res, res[1], res[500] })
end
return H
]]
    local before = srv:cmd("INFO", "stats"):match("total_commands_processed:(%d+)")
    local c = U.client(d)
    local res = c:session {}
    c:close()
    assert.are.equal("c", res.mail.cmd, show(res.mail))
    assert.are.same({ { { 1, 1, 60 } } }, U.seen(d, "ok"))
    -- (milter.null, a table of no keys, is recorded as {})
    assert.are.same({ { { "OK", { err = "ERR value is not an integer or out of range" }, "x", {} },
      "ERR value is not an integer or out of range" } }, U.seen(d, "mixed"))
    assert.are.same({ { 500, 2, 501 } }, U.seen(d, "many"))
    -- every command reached the server (3 + 4 + 500, plus INFO itself)
    local after = srv:cmd("INFO", "stats"):match("total_commands_processed:(%d+)")
    assert.is_true(tonumber(after) - tonumber(before) >= 507)
  end)

  it("a password URL sends AUTH first; a wrong or missing password is the server's error", function()
    local pw = S.redis { password = "s3cr t" }
    finally(function() pw:stop() end)
    start([[
local good = milter.redis.new("redis://:s3cr%20t@127.0.0.1:" .. PORT .. "/0")
local bad = milter.redis.new("redis://:nope@127.0.0.1:" .. PORT)
local none = milter.redis.new("redis://127.0.0.1:" .. PORT)
function H.envfrom(ctx)
  seen(ctx, "good", { good:call("SET", "auth", "yes") })
  seen(ctx, "bad", { bad:call("GET", "auth") })
  seen(ctx, "none", { none:call("GET", "auth") })
  seen(ctx, "badpipe", { bad:pipeline{ { "GET", "auth" } } })
end
return H
]], nil, pw)
    local c = U.client(d)
    c:session {}
    c:close()
    assert.are.same({ { "OK" } }, U.seen(d, "good"))
    local bad = U.seen(d, "bad")[1]
    assert.is_nil(bad[1])
    assert.is_truthy(bad[2]:find("^WRONGPASS") or bad[2]:find("invalid password"), bad[2])
    assert.is_nil(U.seen(d, "badpipe")[1][1])
    local none = U.seen(d, "none")[1]
    assert.is_nil(none[1])
    assert.is_truthy(none[2]:find("^NOAUTH"), none[2])
    assert.are.equal("yes", pw:cmd("GET", "auth"))
  end)

  it("the URL's db is SELECTed first: a key set in db 1 is not in db 0; a bad db fails, writing nothing", function()
    assert(srv:cmd("DEL", "dbk", "baddb"))
    start [[
local r0 = milter.redis.new(URL .. "/0")
local r1 = milter.redis.new(URL .. "/1")
local r9 = milter.redis.new(URL .. "/9")
function H.envfrom(ctx)
  seen(ctx, "set1", { r1:call("SET", "dbk", "one") })
  seen(ctx, "get1", { r1:call("GET", "dbk") })
  seen(ctx, "get0", { r0:call("GET", "dbk") == milter.null })
  seen(ctx, "bad", { r9:call("SET", "baddb", "x") })
  seen(ctx, "badpipe", { r9:pipeline{ { "SET", "baddb", "x" } } })
end
return H
]]
    local c = U.client(d)
    c:session {}
    c:close()
    assert.are.same({ { "OK" } }, U.seen(d, "set1"))
    assert.are.same({ { "one" } }, U.seen(d, "get1"))
    assert.are.same({ { true } }, U.seen(d, "get0"))
    assert.are.same({ { nil, "ERR DB index is out of range" } }, U.seen(d, "bad"))
    assert.are.same({ { nil, "ERR DB index is out of range" } }, U.seen(d, "badpipe"))
    assert.are.equal(false, srv:cmd("GET", "dbk"))
    assert.are.equal(false, srv:cmd("GET", "baddb"))
  end)

  it("a unix socket URL, with ?db=N", function()
    assert(srv:cmd("DEL", "u"))
    start [[
local r = milter.redis.new("unix:" .. SOCK)
local r2 = milter.redis.new("unix:" .. SOCK .. "?db=2")
function H.envfrom(ctx)
  seen(ctx, "set", { r:call("SET", "u", "sock") })
  seen(ctx, "get", { r:call("GET", "u") })
  seen(ctx, "db2", { r2:call("GET", "u") == milter.null })
  seen(ctx, "nosock", { milter.redis.new("unix:" .. SOCK .. ".nope"):call("PING") })
end
return H
]]
    local c = U.client(d)
    c:session {}
    c:close()
    assert.are.same({ { "OK" } }, U.seen(d, "set"))
    assert.are.same({ { "sock" } }, U.seen(d, "get"))
    assert.are.same({ { true } }, U.seen(d, "db2"))
    assert.are.same({ { nil, "no such file or directory" } }, U.seen(d, "nosock"))
    assert.are.equal("sock", srv:cmd("GET", "u"))
  end)

  it("one connection per worker and URL over many calls and sessions", function()
    local own = S.redis()
    finally(function() own:stop() end)
    start([[
local r = milter.redis.new(URL)
function H.envfrom(ctx)
  local again = milter.redis.new(URL) -- the same URL: the same connection
  local ids = {}
  for i = 1, 5 do ids[i] = (i % 2 == 0 and again or r):call("CLIENT", "ID") end
  local list = r:call("CLIENT", "LIST")
  local n = 0
  for _ in list:gmatch("[^\n]+") do n = n + 1 end
  seen(ctx, "ids", ids)
  seen(ctx, "clients", n)
end
return H
]], nil, own)
    for _ = 1, 4 do
      local c = U.client(d)
      c:session {}
      c:close()
    end
    local ids = U.seen(d, "ids")
    assert.are.equal(4, #ids)
    for _, l in ipairs(ids) do
      for _, id in ipairs(l) do assert.are.equal(ids[1][1], id) end
    end
    assert.are.same({ 1, 1, 1, 1 }, U.seen(d, "clients"))
  end)

  it("reconnects after the server restarts; meanwhile calls are nil, err and the worker serves", function()
    local own = S.redis()
    local port = own.port
    finally(function() own:stop() end)
    start([[
local r = milter.redis.new(URL)
function H.envfrom(ctx, sender)
  local v, err = r:call("INCR", "restarts")
  seen(ctx, sender, { v, err })
  if not v then return nil end -- fail open
  return milter.reject{ reason = "counted " .. v }
end
return H
]], nil, own)
    local function mail(sender)
      local c = U.client(d)
      local res = c:session { mail = sender }
      c:close()
      return res.mail
    end
    assert.are.equal("550 5.7.1 counted 1", mail("<a@x>").text)
    own:stop()
    local r = mail("<b@x>")
    assert.are.equal("c", r.cmd, show(r))
    local b = U.seen(d, "<b@x>")[1]
    assert.is_nil(b[1])
    assert.is_truthy(b[2] == "closed" or b[2] == "connection refused", b[2])
    mail("<c@x>")
    assert.are.same({ { nil, "connection refused" } }, U.seen(d, "<c@x>"))
    own = S.redis { port = port }
    assert.are.equal("550 5.7.1 counted 1", mail("<d@x>").text)
    assert.are.equal("550 5.7.1 counted 2", mail("<e@x>").text)
    assert.is_true(d:alive())
  end)

  it("a server that never answers: nil, 'timeout', the worker stays and serves", function()
    local silent = assert(socket.bind("127.0.0.1", 0)) -- listens, never accepts
    finally(function() silent:close() end)
    local _, sport = silent:getsockname()
    start(([[
local r = milter.redis.new("redis://127.0.0.1:%d")
local URL_DB = "redis://127.0.0.1:%d/1"
function H.envfrom(ctx)
  seen(ctx, "call", { r:call("GET", "k", { timeout = 0.3 }) })
  seen(ctx, "pipe", { r:pipeline({ { "GET", "k" } }, 0.3) })
  -- behind a SELECT that is never answered
  seen(ctx, "select", { milter.redis.new(URL_DB):call("GET", "k", { timeout = 0.3 }) })
end
function H.eom(ctx) return milter.accept{ add_header = { { "X-After", "yes" } } } end
return H
]]):format(sport, sport))
    local t0 = now()
    local c = U.client(d)
    local res = c:session {}
    c:close()
    assert.are.equal("c", res.mail.cmd, show(res.mail))
    assert.are.same({ { nil, "timeout" } }, U.seen(d, "call"))
    assert.are.same({ { nil, "timeout" } }, U.seen(d, "pipe"))
    assert.are.same({ { nil, "timeout" } }, U.seen(d, "select"))
    assert.is_true(now() - t0 < 4)
    assert.is_true(d:alive())
    local r2 = U.normal_session(d)
    assert.are.equal("a", r2.eom and r2.eom.cmd)
  end)

  it("misuse raises; bad URLs raise; calls at the top level raise", function()
    start [[
local r = milter.redis.new(URL)
local function why(ok, err) return { ok, (tostring(err):gsub("^[^:]*:%d+: ", "")) } end
function H.envfrom(ctx)
  seen(ctx, "noname", why(pcall(r.call, r)))
  seen(ctx, "table", why(pcall(r.call, r, "SET", {}, "x")))
  seen(ctx, "bool", why(pcall(r.call, r, "SET", "k", true)))
  seen(ctx, "inf", why(pcall(r.call, r, "SET", "k", math.huge)))
  seen(ctx, "emptypipe", why(pcall(r.pipeline, r, {})))
  seen(ctx, "pipearg", why(pcall(r.pipeline, r, { { "GET", "k" }, { "SET", "k", false } })))
  seen(ctx, "pipenotlist", why(pcall(r.pipeline, r, { "GET" })))
  seen(ctx, "self", why(pcall(r.call, {}, "PING")))
  seen(ctx, "timeout", why(pcall(r.call, r, "PING", { timeout = -1 })))
  for _, u in ipairs { "http://127.0.0.1", "redis://example.org", "redis://127.0.0.1:0",
                       "redis://127.0.0.1/x", "unix:relative", "redis://[::1" } do
    seen(ctx, "url", why(pcall(milter.redis.new, u)))
  end
  seen(ctx, "v6", tostring(milter.redis.new("redis://[::1]:1/3")))
end
return H
]]
    local c = U.client(d)
    local res = c:session {}
    c:close()
    assert.are.equal("c", res.mail.cmd, show(res.mail))
    local function raised(tag, text)
      local v = U.seen(d, tag)[1]
      assert.is_false(v[1], tag)
      assert.is_truthy(v[2]:find(text, 1, true), tag .. ": " .. v[2])
    end
    raised("noname", "expected a command name")
    raised("table", "expected a string or a number, got table")
    raised("bool", "got boolean")
    raised("inf", "got a finite number")
    raised("emptypipe", "expected a list of commands")
    raised("pipearg", "command 2, argument 3: expected a string or a number, got boolean")
    raised("pipenotlist", "command 1 is not a list")
    raised("self", "milter.redis expected")
    raised("timeout", "timeout")
    local urls = U.seen(d, "url")
    assert.are.equal(6, #urls)
    for _, v in ipairs(urls) do
      assert.is_false(v[1])
      assert.is_truthy(v[2]:find("bad Redis URL", 1, true), v[2])
    end
    assert.are.same({ "milter.redis" }, U.seen(d, "v6"))
    d:stop()
    d = nil
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write('local milter = require "milter"\nlocal r = milter.redis.new("' .. srv.url ..
      '")\nr:call("PING")\nreturn {}\n')
    f:close()
    local run = U.D.run({ "check", path })
    os.remove(path)
    assert.are.equal(1, run.status)
    assert.is_truthy(run.stderr:find("only inside a handler", 1, true), run.stderr)
    assert.is_truthy(run.stderr:find(":3:", 1, true), run.stderr)
  end)

  -- the message after an abandoned eom: its eom answers with a PING's reply
  local function served_pong(r)
    assert.are.equal("a", r.eom and r.eom.cmd, tostring(r.error))
    assert.are.equal("PONG", r.eom.mods[1].value)
  end

  it("ABORT or a hang-up while a call waits: the handler is abandoned, abort and close run", function()
    local silent = assert(socket.bind("127.0.0.1", 0))
    finally(function() silent:close() end)
    local _, sport = silent:getsockname()
    start(([[
local never = milter.redis.new("redis://127.0.0.1:%d")
local never_db = milter.redis.new("redis://127.0.0.1:%d/2") -- waits behind SELECT
local r = milter.redis.new(URL)
function H.envrcpt(ctx, rcpt)
  if rcpt ~= "<held@example.org>" then return end
  seen(ctx, "waiting", "rcpt")
  never_db:call("GET", "k", { timeout = 30 })
  seen(ctx, "resumed", "rcpt")
end
function H.eom(ctx)
  if ctx.sender == "<n@example.org>" then
    return milter.accept{ add_header = { { "X-Redis", r:call("PING") } } }
  end
  seen(ctx, "waiting", "eom")
  never:pipeline({ { "GET", "k" }, { "GET", "j" } }, 30)
  seen(ctx, "resumed", "eom")
end
function H.abort(ctx) seen(ctx, "abort", r:call("PING")) end
function H.close(ctx) seen(ctx, "close", r:call("PING")) end
return H
]]):format(sport, sport))
    -- ABORT while eom waits (on a server that never answers: no release)
    U.abandoned(d, "abort", {
      handled = function(abort) assert.are.same({ "PONG" }, abort) end,
      mail = "<n@example.org>",
      served = served_pong,
    })
    -- hang-up while envrcpt waits
    U.abandoned(d, "hang up", {
      nth = 2,
      handled = function(close) assert.are.same({ "PONG", "PONG" }, close) end,
      mail = "<n@example.org>",
      served = function(res) assert.are.equal("a", res.eom.cmd) end,
    })
    assert.is_true(d:alive())
  end)

  it("a reply that comes after its handler was abandoned is dropped; the connection serves on", function()
    assert(srv:cmd("DEL", "blq"))
    start [[
local r = milter.redis.new(URL)
function H.eom(ctx)
  if ctx.sender == "<n@example.org>" then
    return milter.accept{ add_header = { { "X-Redis", r:call("PING") } } }
  end
  seen(ctx, "waiting", true)
  r:call("BLPOP", "blq", 0) -- the server answers once the test pushes
  seen(ctx, "resumed", true)
end
function H.abort(ctx) seen(ctx, "abort", true) end
return H
]]
    U.abandoned(d, "abort", {
      close = false, -- no close handler
      release = function()
        assert.are.equal(1, srv:cmd("RPUSH", "blq", "late")) -- BLPOP answers now
      end,
      mail = "<n@example.org>",
      served = served_pong,
    })
    assert.are.equal(false, srv:cmd("LPOP", "blq")) -- the late reply took it
  end)

  describe("the README's Redis counter", function()
    local SRC = "spec/cookbook/redis_counter.lua"
    it("is the README's text", function()
      assert.is_truthy(read("README.md"):find("```lua\n" .. read(SRC) .. "```", 1, true),
        SRC .. " differs from the README's recipe")
    end)

    it("counts per client address in Redis, tempfails over the limit, fails open when Redis is down", function()
      local own = S.redis()
      finally(function() own:stop() end)
      stdlib.setenv("REDIS_URL", own.url .. "/0")
      stdlib.setenv("RATE_LIMIT", "3")
      d = U.start(read(SRC))
      local function from(addr)
        local c = U.client(d)
        local res = c:session { connect = { addr = addr } }
        c:close()
        return res.mail
      end
      -- the counts below must fall in one minute's window (a key each):
      -- start them with 15 s of it left, once the daemon is up
      while os.time() % 60 >= 45 do socket.sleep(0.2) end
      for i = 1, 3 do assert.are.equal("c", from("192.0.2.1").cmd, "message " .. i) end
      local over = from("192.0.2.1")
      assert.are.equal("y", over.cmd, show(over))
      assert.are.equal("451 4.7.1 too many messages from 192.0.2.1, try again later", over.text)
      assert.are.equal("c", from("192.0.2.2").cmd) -- another client has its own count
      local keys = own:cmd("KEYS", "rate:192.0.2.1:*")
      assert.are.equal(1, #keys)
      assert.are.equal("4", own:cmd("GET", keys[1]))
      local ttl = own:cmd("TTL", keys[1])
      assert.is_true(ttl > 0 and ttl <= 60, tostring(ttl))
      own:stop()
      assert.are.equal("c", from("192.0.2.1").cmd) -- fail open
      assert.is_truthy(U.wait_log(d, "rate counter unavailable"):find("rate counter unavailable:", 1, true))
      assert.is_true(d:alive())
    end)
  end)
end)
