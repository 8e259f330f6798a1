-- `luamilter test` with several messages: one connection (ctx.conn kept,
-- ctx.msg new for each) or one each (--each-connection), each message's
-- stages and result in text and JSON, the worst status as the exit status.
local mt = require "milter.test"

local tmpfiles = {}
local function script(src)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(src)
  f:close()
  tmpfiles[#tmpfiles + 1] = path
  return path
end

teardown(function()
  for _, p in ipairs(tmpfiles) do os.remove(p) end
end)

local MSG = mt.message { headers = { { "From", "a@example.net" }, { "To", "b@example.org" } }, body = "hi\r\n" }

-- at most two messages per connection, counted in ctx.conn
local PER_CONN = script [[
local milter = require "milter"
return {
  envfrom = function(ctx)
    ctx.conn.n = (ctx.conn.n or 0) + 1
    assert(ctx.msg.seen == nil, "ctx.msg is new for each message")
    ctx.msg.seen = true
    if ctx.conn.n > 2 then return milter.tempfail{ reason = "too many" } end
  end,
  eom = function(ctx) return milter.accept{ add_header = { { "X-N", tostring(ctx.conn.n) } } } end,
}
]]

describe("luamilter test with several messages", function()
  it("plays them on one connection: ctx.conn is kept", function()
    local r = mt.run { script = PER_CONN, messages = { MSG, MSG, MSG } }
    assert.are.equal(1, r.status, r.stderr) -- the worst of 0, 0, 1
    assert.are.equal(3, #r.messages)
    assert.are.same({ "accept", "accept", "tempfail" },
      { r.messages[1].final.action, r.messages[2].final.action, r.messages[3].final.action })
    assert.truthy(r.messages[2].message:find("\r\nX-N: 2\r\n", 1, true))
    assert.are.equal("451 4.7.1 too many", r.messages[3].final.reply)
    -- connect stages belong to the first message only; each has its file
    assert.are.equal("envfrom", r.messages[2].stages[1].event)
    assert.is_string(r.messages[1].file)
    -- a queue id per message
    assert.truthy(r.messages[1].message:find("id 4TEST000001", 1, true))
    assert.truthy(r.messages[2].message:find("id 4TEST000002", 1, true))
  end)

  it("plays each on a connection of its own with --each-connection", function()
    local r = mt.run { script = PER_CONN, messages = { MSG, MSG, MSG }, each_connection = true }
    assert.are.equal(0, r.status, r.stderr)
    for i = 1, 3 do
      assert.are.equal("accept", r.messages[i].final.action)
      assert.truthy(r.messages[i].message:find("\r\nX-N: 1\r\n", 1, true))
    end
  end)

  it("tests a rate limit kept in milter.store across connections", function()
    local key = "spec-rate:" .. os.time() .. ":" .. math.random(1e9)
    local policy = script(([[
local milter = require "milter"
return { envfrom = function(ctx)
  local n = assert(milter.store:incr(%q, 1, 60))
  if n > 2 then return milter.reject{ code = 550, reason = "rate limit" } end
end }
]]):format(key))
    -- a store of the test's own (the default is the one every luamilter
    -- test shares: /var/lib/luamilter as root)
    local dir = assert(require("posix.stdlib").mkdtemp("/tmp/luamilter-offline-XXXXXX"))
    finally(function()
      for _, f in ipairs { "/store.mdb", "/store.mdb-lock" } do os.remove(dir .. f) end
      os.remove(dir)
    end)
    local run = { script = policy, messages = { MSG, MSG, MSG }, each_connection = true,
                  store = "lmdb:" .. dir .. "/store.mdb" }
    local r = mt.run(run)
    assert.are.equal(1, r.status, r.stderr)
    assert.are.same({ true, true, false },
      { r.messages[1].final.delivered, r.messages[2].final.delivered, r.messages[3].final.delivered })
    assert.are.equal("550 5.7.1 rate limit", r.messages[3].final.reply)
    local f = io.open(dir .. "/store.mdb")
    assert.is_truthy(f, "the store is not where run{} said")
    f:close()
    -- a second run sees the counts of the first: the same store
    r = mt.run(run)
    assert.are.equal("550 5.7.1 rate limit", r.messages[1].final.reply)
  end)

  it("reports each message in turn in text, and the worst status", function()
    local p1, p2 = os.tmpname(), os.tmpname()
    tmpfiles[#tmpfiles + 1], tmpfiles[#tmpfiles + 2] = p1, p2
    for _, p in ipairs { p1, p2 } do
      local f = assert(io.open(p, "wb"))
      f:write(MSG)
      f:close()
    end
    local policy = script [[
local milter = require "milter"
return { envfrom = function(ctx)
  ctx.conn.n = (ctx.conn.n or 0) + 1
  if ctx.conn.n == 2 then error("second message") end
end }
]]
    local bin = os.getenv("LUAMILTER_BIN") or "./build/luamilter"
    local h = io.popen(("%q test %q %q %q 2>/dev/null; echo rc=$?"):format(bin, policy, p1, p2))
    local out = h:read("*a")
    h:close()
    assert.truthy(out:find("=== message 1: " .. p1 .. " ===\nenvfrom", 1, true), out)
    assert.truthy(out:find("\n=== message 2: " .. p2 .. " ===\nenvfrom(<a@example.net>): tempfail", 1, true), out)
    assert.truthy(out:find("rc=2\n", 1, true), out) -- a handler error is the worst
  end)

  it("keeps one message's report as it was (no messages list, no file)", function()
    local r = mt.run { script = PER_CONN, message = MSG }
    assert.are.equal(0, r.status, r.stderr)
    assert.is_nil(r.messages)
    assert.is_nil(r.file)
    assert.are.equal("accept", r.final.action)
  end)
end)
