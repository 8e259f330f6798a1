-- Hostile peers: each gets a warn line and loses only its own connection;
-- a normal session on a new connection succeeds afterwards.
local U = require "spec.daemon.util"
local mc = U.mc
local socket = require "socket"
local now = require "spec.support.clock" -- monotonic, for waits

local SCRIPT = U.script [[
function H.eom(ctx) return milter.accept{ add_header = { { "X-Ok", "1" } } } end
return H
]]

local function normal(d)
  local r = U.normal_session(d, { rcpts = { "<a@example.org>" }, body = "b\r\n" })
  assert.are.equal("a", r.eom and r.eom.cmd, tostring(r.error))
end

local function warns(d)
  return #U.lines_with(d:log(), " WARN ")
end

local function frame(cmd, payload)
  return mc.frame(cmd, payload)
end

local function start(timeout)
  return U.start(SCRIPT, { args = { "--timeout", timeout, "--max-macros", "50",
                                    "--max-headers", "100" } })
end

-- --timeout 10: the bystander says nothing until the hostile peer is done,
-- which on a loaded machine can take longer than a second
describe("hostile peers", function()
  local d
  before_each(function() d = start("10") end)
  after_each(function() d:stop() end)

  local function closes_with_warning(bytes, what, after_optneg)
    local before = warns(d)
    local bystander = U.client(d) -- an open conversation that must not notice
    local c = assert(d:client())
    if after_optneg then assert(c:optneg(mc.OFFER.postfix)) end
    assert(c:send_raw(bytes))
    local e
    for _ = 1, 20 do -- replies to the valid commands before the bad one
      local f, err = c:read_frame(5)
      if not f then e = err; break end
    end
    assert.truthy(e == "closed" or (e and e:find("reset")), what .. ": " .. tostring(e))
    c:close()
    local deadline = now() + 5
    while warns(d) <= before and now() < deadline do socket.sleep(0.02) end
    assert.is_true(warns(d) > before, what .. ": no warn line\n" .. d:log())
    U.open(bystander)
    local r = U.message(bystander, { rcpts = { "<a@example.org>" } })
    assert.are.equal("a", r.eom and r.eom.cmd, what .. ": the bystander was disturbed")
    bystander:close()
    normal(d)
  end

  it("an HTTP request", function()
    closes_with_warning("GET / HTTP/1.1\r\nHost: milter\r\n\r\n", "http")
  end)

  it("a TLS ClientHello", function()
    closes_with_warning("\22\3\1\2\0\1\0\1\252\3\3" .. ("\171"):rep(32) .. "\0\0\2\19\1\1\0", "tls")
  end)

  it("random bytes", function()
    math.randomseed(42)
    local t = {}
    for i = 1, 4096 do t[i] = string.char(math.random(0, 255)) end
    closes_with_warning(table.concat(t), "random")
  end)

  it("commands out of order: a header after the body", function()
    closes_with_warning(frame("D", "C") .. frame("C", "h\0U") .. frame("M", "<a@x>\0") ..
      frame("B", "body") .. frame("L", "Late\0value\0"), "order", true)
  end)

  it("a huge macro list", function()
    local pairs_ = {}
    for i = 1, 5000 do pairs_[#pairs_ + 1] = "m" .. i .. "\0v\0" end
    closes_with_warning(frame("D", "C" .. table.concat(pairs_)), "macros", true)
  end)

  it("too many headers in one message", function()
    local t = { frame("C", "h\0U"), frame("M", "<a@x>\0"), frame("R", "<b@x>\0") }
    for i = 1, 150 do t[#t + 1] = frame("L", "X-H" .. i .. "\0v\0") end
    closes_with_warning(table.concat(t), "headers", true)
  end)

end)

describe("hostile peers against --timeout 1", function()
  local d
  before_each(function() d = start("1") end)
  after_each(function() d:stop() end)

  it("a frame trickled byte by byte beyond --timeout", function()
    local before = warns(d)
    local c = U.client(d)
    local f = frame("H", ("x"):rep(100) .. "\0")
    local closed
    for i = 1, #f do
      if not c:send_raw(f:sub(i, i)) then closed = true; break end
      socket.sleep(0.05)
      local _, err = c:read_frame(0.001)
      if err and err ~= "timeout" then closed = true; break end
    end
    assert.is_true(closed, "the trickling peer was not cut off")
    assert.is_true(warns(d) > before)
    assert.matches("took longer than 1s", d:log())
    normal(d)
  end)

  it("a peer that connects and never speaks", function()
    local before = warns(d)
    local c = assert(d:client())
    assert.are.equal("closed", U.read_until_closed(c, 5))
    assert.is_true(warns(d) > before)
    assert.matches("no command for 1s", d:log())
    normal(d)
  end)

  it("a peer that speaks more often than --timeout is kept for as long as it speaks", function()
    local before = warns(d)
    local c = U.client(d)
    U.open(c)
    -- a macro packet (no reply) every 0.25 s for 2.5 s: more than twice
    -- --timeout in all, never 1 s of silence (0.75 s to spare for a
    -- stall of this process on a loaded machine)
    for _ = 1, 10 do
      socket.sleep(0.25)
      assert.is_true(c:send_raw(frame("D", "M{x}\0y\0")) and true)
    end
    local res = U.message(c, { rcpts = { "<a@example.org>" }, body = "b\r\n" })
    assert.are.equal("a", res.eom and res.eom.cmd, tostring(res.error))
    assert.are.equal(before, warns(d))
    c:close()
    -- and then silence: cut at --timeout after the last command
    local t0 = now() -- before the server's last read
    local idle = U.client(d)
    U.open(idle)
    assert.are.equal("closed", U.read_until_closed(idle, 5))
    assert.is_true(now() - t0 >= 0.95, "closed before its second of silence")
  end)

  it("a peer that stops reading its replies", function()
    local c = U.client(d)
    U.open(c)
    -- pipeline thousands of commands and never read: the server stops
    -- reading too (it buffers at most one batch of replies) and drops the
    -- connection at --timeout.
    local batch = {}
    for _ = 1, 2000 do batch[#batch + 1] = frame("U", "NOOP\0") end
    local payload = table.concat(batch)
    local deadline = now() + 4
    while now() < deadline do
      c.sock:settimeout(0.2)
      local ok = c.sock:send(payload)
      if not ok then break end
    end
    assert.matches("no command for 1s", U.wait_log(d, "no command for", 5))
    normal(d)
  end)
end)

describe("--max-connections", function()
  it("closes a connection beyond the limit with a log line; the others are served", function()
    local d = U.start(SCRIPT, { args = { "--max-connections", "2" } })
    finally(function() d:stop() end)
    local a, b = U.client(d), U.client(d)
    local c = assert(d:client())
    local e = U.read_until_closed(c, 5)
    assert.truthy(e == "closed" or e:find("reset"), tostring(e))
    assert.matches("connection limit %(2%) reached", U.wait_log(d, "connection limit", 5))
    for _, x in ipairs({ a, b }) do
      U.open(x)
      local r = U.message(x, { rcpts = { "<a@example.org>" } })
      assert.are.equal("a", r.eom and r.eom.cmd)
      x:quit()
      x:close()
    end
    normal(d)
    d:stop()
  end)
end)

describe("the per-packet deadline (--timeout)", function()
  it("times each packet from its own first byte, not from the first unfinished read", function()
    local d = U.start(U.script [[
function H.unknown(ctx, cmd) end
return H
]], { args = { "--timeout", "2" } })
    finally(function() d:stop() end)
    local c = U.client(d)
    U.open(c)
    -- every write finishes the previous packet and starts the next one, so
    -- the read buffer never runs empty; each packet takes one pause (0.25s,
    -- well within --timeout), the whole run twice --timeout
    local f = frame("U", "NOOP\0")
    local half = 4
    local writes = 16
    assert(c:send_raw(f:sub(1, half)))
    for _ = 1, writes - 1 do
      socket.sleep(0.25)
      assert(c:send_raw(f:sub(half + 1) .. f:sub(1, half)))
    end
    assert(c:send_raw(f:sub(half + 1)))
    for i = 1, writes do
      local r, err = c:read_reply(5)
      assert(r, "reply " .. i .. ": " .. tostring(err) .. "\n" .. d:log())
      assert.are.equal("c", r.cmd)
    end
    assert.is_nil(d:log():find("took longer than", 1, true), d:log())
    local r, err = c:unknown("NOOP") -- still served
    assert.are.equal("c", r and r.cmd, tostring(err))
    c:quit()
    c:close()
  end)
end)
