-- luacheck: std +busted
-- The README's milter.store recipes (spec/cookbook/rate_limit.lua and
-- greylist.lua, shown verbatim in the README), each run on both backends:
-- LMDB in a temp directory and a real redis-server on loopback, with
-- several workers so that counting across workers is what is tested.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local S = require "spec.support.servers"
local socket = require "socket"
local stdlib = require "posix.stdlib"
local now = require "spec.support.clock" -- monotonic, for waits

local D = U.D

local read = U.read

local function show(r)
  if type(r) ~= "table" then return tostring(r) end
  return r.cmd .. (r.text and (" " .. r.text) or "")
end

for _, SRC in ipairs { "spec/cookbook/rate_limit.lua", "spec/cookbook/greylist.lua" } do
  it(SRC .. " is the README's text", function()
    assert.is_truthy(read("README.md"):find("```lua\n" .. read(SRC) .. "```", 1, true),
      SRC .. " differs from the README's recipe")
  end)
end

for _, backend in ipairs { "lmdb", "redis" } do
describe("store recipes (" .. backend .. ")", function()
  local d, dir, redis
  setup(function()
    if backend == "redis" then redis = S.redis() end
  end)
  teardown(function()
    if redis then redis:stop() end
  end)
  before_each(function()
    dir = assert(stdlib.mkdtemp("/tmp/luamilter-recipe-XXXXXX"))
    if redis then assert.are.equal("OK", redis:cmd("FLUSHALL")) end
  end)
  after_each(function()
    if d then d:stop(); d = nil end
    D.rmtree(dir)
  end)

  local function start(src, env, store, more)
    for k, v in pairs(env) do stdlib.setenv(k, v) end
    local args = { "--store", store or (redis and redis.url or "lmdb:" .. dir .. "/s.mdb"), "--workers", "4" }
    for _, a in ipairs(more or {}) do args[#args + 1] = a end
    d = U.start(read(src), { args = args })
  end

  -- one session on a connection of its own; its replies
  local function session(addr, mail, rcpt)
    local c = U.client(d)
    local res = c:session { connect = { addr = addr }, mail = mail, rcpts = { rcpt or "<rcpt@example.org>" } }
    c:close()
    return res
  end

  describe("rate limiting", function()
    it("5 a minute per client, counted over 4 workers: of 16 messages exactly 5 pass", function()
      start("spec/cookbook/rate_limit.lua", { RATE_LIMIT = "5", RATE_WINDOW = "60" })
      local passed, refused = 0, {}
      for _ = 1, 16 do
        local r = session("192.0.2.9").mail
        if r.cmd == "c" then passed = passed + 1 else refused[#refused + 1] = show(r) end
      end
      assert.are.equal(5, passed)
      assert.are.equal(11, #refused)
      for _, r in ipairs(refused) do
        assert.are.equal("y 451 4.7.1 too many messages from 192.0.2.9, try again later", r)
      end
      -- another client has its own count
      assert.are.equal("c", session("192.0.2.10").mail.cmd)
      assert.are.equal(0, U.count(d:log(), "ERROR"), d:log())
    end)

    it("the window ends with its ttl: the client may send again", function()
      start("spec/cookbook/rate_limit.lua", { RATE_LIMIT = "1", RATE_WINDOW = "1" })
      assert.are.equal("c", session("192.0.2.9").mail.cmd)
      assert.are.equal("y", session("192.0.2.9").mail.cmd)
      local r
      local deadline = now() + 10
      repeat
        socket.sleep(0.25)
        r = session("192.0.2.9").mail
      until r.cmd == "c" or now() > deadline
      assert.are.equal("c", r.cmd, show(r))
    end)

    if backend == "redis" then
      it("fails open while the store's Redis is away", function()
        local silent = assert(socket.bind("127.0.0.1", 0)) -- never accepts
        finally(function() silent:close() end)
        local _, port = silent:getsockname()
        start("spec/cookbook/rate_limit.lua", { RATE_LIMIT = "0" }, "redis://127.0.0.1:" .. port,
          { "--script-timeout", "1" })
        assert.are.equal("c", session("192.0.2.9").mail.cmd)
        assert.is_truthy(U.wait_log(d, "rate counter unavailable: timeout - accepting", 5)
          :find("rate counter unavailable: timeout - accepting", 1, true), d:log())
      end)
    end
  end)

  describe("greylisting", function()
    it("first try 451, early retry 451, retry after the delay passes, then the network is whitelisted", function()
      -- the script counts whole seconds (os.time): a retry less than a
      -- second after the first try is 0 or 1 second later by it, so a
      -- delay of 2 keeps it greylisted wherever in a second the test runs
      -- (with 1, a first try at x.998 and a retry at x+1.001 passed)
      start("spec/cookbook/greylist.lua", { GREY_DELAY = "2", GREY_RETRY = "3600", GREY_PASS = "3600" })
      local function rcpt(addr, mail, to) return session(addr, mail, to).rcpts[1] end
      local t0 = socket.gettime()
      local r = rcpt("198.51.100.7", "<a@example.org>", "<b@example.net>")
      assert.are.equal("y 451 4.7.1 greylisted, try again later", show(r))
      -- another triplet of the same client is greylisted on its own
      r = rcpt("198.51.100.7", "<other@example.org>", "<b@example.net>")
      assert.are.equal("y 451 4.7.1 greylisted, try again later", show(r))
      -- an early retry (within a second of the first try): still greylisted
      r = rcpt("198.51.100.7", "<a@example.org>", "<b@example.net>")
      if socket.gettime() - t0 < 0.9 then
        assert.is_truthy(show(r):find("^y 451 4%.7%.1 greylisted, try again in [12] seconds$"), show(r))
      end
      -- after the delay (seconds are whole: wait past three boundaries)
      socket.sleep(3.1)
      r = rcpt("198.51.100.99", "<A@example.org>", "<B@example.net>") -- a sibling address, other case
      assert.are.equal("c", r.cmd, show(r))
      -- the network is whitelisted: a new triplet passes at once
      r = rcpt("198.51.100.8", "<new@example.org>", "<c@example.net>")
      assert.are.equal("c", r.cmd, show(r))
      -- another network is not
      r = rcpt("203.0.113.5", "<a@example.org>", "<b@example.net>")
      assert.are.equal("y 451 4.7.1 greylisted, try again later", show(r))
      assert.are.equal(0, U.count(d:log(), "ERROR"), d:log())
    end)
  end)
end)
end
