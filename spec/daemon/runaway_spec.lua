-- Runaway handlers: too slow (interruptible or not) and too hungry. The
-- message gets the --on-error verdict and the server keeps serving.
local U = require "spec.daemon.util"
local mc = U.mc

local SCRIPT = [[
local milter = require "milter"
local function slow()                   -- stays interpreted: the JIT cannot
  local x = 0                           -- compile a closure's creation (it
                                        -- stitches around a debug.* call);
  -- one line: the hook stops the loop at any of its instructions, and
  -- the loop's own (FORL) has the line of its `for`
  for i = 1, 1e12 do x = x + #tostring(i) + (function() return 1 end)() end -- the slow line
end
return {
  envfrom = function(_, sender)
    if sender:find("spin") then while true do end end             -- compiled by the JIT
    if sender:find("slow") then slow() end
    if sender:find("stubborn") then              -- catches it again and again
      while true do
        pcall(pcall, function() while true do pcall(slow) end end)
      end
    end
    if sender:find("resumer") then               -- coroutine.resume catches too
      while true do coroutine.resume(coroutine.create(slow)) end
    end
    if sender:find("swallow") then
      pcall(slow)                                  -- catches the timeout error
      local big = ("x"):rep(100 * 2^20)            -- one C call, past the cap
      if #big > 0 then return milter.accept() end
    end
    if sender:find("hog") then
      local t = {}
      for i = 1, 1e9 do t[i] = ("x"):rep(200) .. i end
    end
  end,
  eom = function() return milter.accept{ add_header = { { "X-Served", "yes" } } } end,
}
]]

local function session(d, sender)
  local c = assert(d:client({ timeout = 15 }))
  local r = c:session{ mail = sender, rcpts = { "<a@example.org>" },
                       headers = { { "Subject", "s" } }, body = "b\r\n" }
  c:close()
  return r
end

local function served(d)
  local r = session(d, "<ok@example.org>")
  assert.are.equal("a", r.eom and r.eom.cmd, r.error)
  assert.are.equal("X-Served", r.eom.mods[1].name)
end

describe("runaway handlers", function()
  local d
  before_each(function()
    d = assert(U.D.start(SCRIPT, { args = { "--workers", "1", "--script-timeout", "0.5",
                                            "--script-memory", "40000000" } }))
  end)
  after_each(function() d:stop() end)

  local function tempfailed(r)
    assert.is_table(r.mail, r.error)
    assert.are.equal("y", r.mail.cmd)
    assert.are.equal("451 4.3.0 Temporary mail filter failure, try again later", r.mail.text)
  end

  it("an interpreted loop is stopped by the hook; the worker lives on", function()
    local open = assert(d:client({ timeout = 15 }))   -- another conversation on the same worker
    assert.is_table(open:optneg(mc.OFFER.postfix))
    tempfailed(session(d, "<slow@example.org>"))
    -- at the loop's line, where the handler was when its time ran out
    -- (one position: [^\n:]* is the script's path, no second file:line)
    assert.matches("handler envfrom failed: [^\n:]*script%.lua:" .. U.line_of(SCRIPT, "the slow line") ..
      ": handler ran longer than %-%-script%-timeout %(0%.5s%)\n", d:log())
    assert.is_nil(d:log():find("worker %d+ exited"))
    local r = open:session{ mail = "<ok@example.org>", rcpts = { "<a@example.org>" }, body = "b\r\n" }
    assert.are.equal("a", r.eom and r.eom.cmd, r.error)
    served(d)
  end)

  it("a JIT-compiled loop: the watchdog answers on-error, the worker is replaced", function()
    tempfailed(session(d, "<spin@example.org>"))
    assert.matches("handler envfrom on connection c=%d+ ran past %-%-script%-timeout and cannot be interrupted",
      U.wait_log(d, "exited with status 70", 10))
    assert.matches("worker %d+ exited with status 70", d:log())
    served(d)
  end)

  it("a handler that keeps catching the timeout error still ends with on-error", function()
    tempfailed(session(d, "<stubborn@example.org>"))
    -- the error that got out was raised in the handler's own loop: its
    -- line, not a note of a tail call the handler never made
    local at = d:log():match("handler envfrom failed: [^\n:]*script%.lua:(%d+): handler ran longer than")
    assert.is_truthy(at, d:log())
    assert.is_true(tonumber(at) >= U.line_of(SCRIPT, "again and again") and
                   tonumber(at) <= U.line_of(SCRIPT, "again and again") + 2, d:log())
    assert.is_nil(d:log():find("tail call", 1, true), d:log())
    tempfailed(session(d, "<resumer@example.org>"))
    local _, n = d:log():gsub("handler envfrom failed: [^\n]-handler ran longer", "")
    assert.are.equal(2, n, d:log())
    assert.is_nil(d:log():find("cannot be interrupted"))
    assert.is_nil(d:log():find("worker %d+ exited"))
    served(d)
  end)

  it("the memory cap still holds after a handler swallowed the timeout error", function()
    tempfailed(session(d, "<swallow@example.org>"))
    assert.matches("handler envfrom failed: ", d:log())
    assert.is_nil(d:log():find("worker %d+ exited"))
    served(d)
  end)

  it("a memory hog hits --script-memory: on-error, memory given back", function()
    tempfailed(session(d, "<hog@example.org>"))
    assert.matches("reached %-%-script%-memory", d:log())
    assert.is_nil(d:log():find("panic"))
    served(d)
    tempfailed(session(d, "<hog@example.org>")) -- the limit holds again
    served(d)
  end)
end)

-- A fault while a handler runs (here a script's own bad pointer; also
-- LuaJIT's, see below): the message gets the on-error reply rather than a
-- dropped connection, and the log names the handler.
local FAULT = [[
local milter = require "milter"
return {
  envfrom = function(_, sender)
    if sender:find("hungry") then pcall(string.rep, "x", 64 * 2^20) end -- refused
    if sender:find("fault") then require("ffi").cast("volatile int *", 0)[0] = 1 end
  end,
  eom = function() return milter.accept{ add_header = { { "X-Served", "yes" } } } end,
}
]]

describe("a fault in a handler", function()
  it("on-error for its message, the log names the handler, a new worker serves", function()
    -- under the sanitizers: no report for a fault made on purpose
    local asan = os.getenv("ASAN_OPTIONS")
    local d = assert(U.D.start(FAULT, { args = { "--workers", "1", "--script-memory", tostring(32 * 2^20) },
                                        env = asan and { ASAN_OPTIONS = asan .. ":handle_segv=0" } }))
    finally(function() d:stop() end)
    local r = session(d, "<fault@example.org>")
    assert.is_table(r.mail, tostring(r.error) .. "\n" .. d:log())
    assert.are.equal("451 4.3.0 Temporary mail filter failure, try again later", r.mail.text)
    assert.matches("worker %d+ was killed by signal 11 %([^)]*%) in handler envfrom on connection c=%d+\n",
      U.wait_log(d, "starting a new worker", 10))
    served(d)
    -- refused memory, then the fault (as Debian 12's LuaJIT can fault after
    -- an allocation refused inside compiled code): the log says so
    r = session(d, "<hungry-fault@example.org>")
    assert.are.equal("451 4.3.0 Temporary mail filter failure, try again later", r.mail and r.mail.text)
    assert.matches("in handler envfrom on connection c=%d+, after the Lua state was refused memory at "
      .. "%-%-script%-memory", U.wait_log(d, "refused memory", 10))
    served(d)
  end)
end)

-- The cap counts garbage not yet collected: a handler that keeps 40% of the
-- cap live and churns 1 MiB temporaries must not run out of memory, whether
-- its loop is compiled or interpreted.  More live data than the cap fails.
local CHURN = [[
local milter = require "milter"
local CAP = %d
local function churn(n)                            -- compiled by the JIT
  local len = 0
  for i = 1, n do len = len + #(("t"):rep(2^20 + i)) end
  return len
end
local function churn_interpreted(n)
  local len = 0
  for i = 1, n do len = len + #(("t"):rep(2^20 + i)) end
  return len
end
jit.off(churn_interpreted)
local function hold(ctx, share)                    -- live data: 64 KiB strings
  local live = {}
  for i = 1, math.floor(CAP * share / 65536) do live[i] = ("L"):rep(65500) .. i end
  ctx.conn.live = live
end
return {
  envfrom = function(ctx, sender)
    if sender:find("jit") then hold(ctx, 0.4); churn(300) end
    if sender:find("interp") then hold(ctx, 0.4); churn_interpreted(300) end
    if sender:find("both") then churn(200); churn_interpreted(200); churn(200) end
    if sender:find("toomuch") then hold(ctx, 1.2) end
  end,
  eom = function() return milter.accept{ add_header = { { "X-Served", "yes" } } } end,
}
]]

for _, mib in ipairs({ 32, 64 }) do
  describe("garbage under --script-memory " .. mib .. " MiB", function()
    local d
    before_each(function()
      d = assert(U.D.start(CHURN:format(mib * 2^20),
        { args = { "--workers", "1", "--script-timeout", "30",
                   "--script-memory", tostring(mib * 2^20) } }))
    end)
    after_each(function() d:stop() end)

    local function accepted(sender)
      local c = assert(d:client({ timeout = 60 }))
      local r = c:session{ mail = sender, rcpts = { "<a@example.org>" },
                           headers = { { "Subject", "s" } }, body = "b\r\n" }
      c:close()
      assert.are.equal("a", r.eom and r.eom.cmd, tostring(r.error) .. "\n" .. d:log())
      assert.are.equal("X-Served", r.eom.mods[1].name)
    end

    it("40% live, 1 MiB temporaries in a compiled loop: served", function()
      accepted("<jit@example.org>")
      assert.is_nil(d:log():find("ERROR"))
    end)

    it("40% live, 1 MiB temporaries in an interpreted loop: served", function()
      accepted("<interp@example.org>")
      assert.is_nil(d:log():find("ERROR"))
    end)

    it("the collector keeps up across calls and connections", function()
      for _ = 1, 3 do accepted("<jit-interp@example.org>") end
      accepted("<both@example.org>")
      assert.is_nil(d:log():find("ERROR"))
    end)

    it("more live data than the cap still fails, and the worker serves on", function()
      local c = assert(d:client({ timeout = 60 }))
      local r = c:session{ mail = "<toomuch@example.org>", rcpts = { "<a@example.org>" },
                           body = "b\r\n" }
      c:close()
      assert.are.equal("y", r.mail and r.mail.cmd, r.error)
      assert.matches("not enough memory", d:log())
      assert.matches("reached %-%-script%-memory", d:log())
      accepted("<ok@example.org>")
    end)
  end)
end
