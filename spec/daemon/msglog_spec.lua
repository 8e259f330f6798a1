-- luacheck: std +busted
-- The one info line per message ("message ..."), in text and in JSON, for
-- every way a message ends; and ctx:log with a table.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local cjson = require "cjson"
local socket = require "socket"
local now = require "spec.support.clock" -- monotonic, for waits

-- the handlers decide by the recipient's local part (or the subject)
local SRC = U.script([[
function H.envrcpt(ctx, rcpt)
  if rcpt:find("refuse", 1, true) then
    return milter.reject{ code = 550, xcode = "5.1.1", reason = "no such user" }
  end
  if rcpt:find("early", 1, true) then return milter.discard() end
end
function H.eom(ctx)
  local r = ctx.rcpts[1] or ""
  if r:find("reject", 1, true) then
    return milter.reject{ code = 554, xcode = "5.7.1", reason = "spam" }
  elseif r:find("tempfail", 1, true) then
    return milter.tempfail{ reason = "try later" }
  elseif r:find("discard", 1, true) then
    return milter.discard()
  elseif r:find("fail", 1, true) then
    error("boom")
  elseif r:find("sleep", 1, true) then
    milter.sleep(0.05)
  end
  return milter.accept{ add_header = { { "X-A", "1" }, { "X-B", "2" } },
    change_header = { { "Subject", 1, "new" } } }
end
function H.abort(ctx) end
return H
]])
local EOM_LINE = U.line_of(SRC, "function H.eom")
local RCPT_LINE = U.line_of(SRC, "function H.envrcpt")

-- the "message" lines of the log (text), as {key = value} tables
local function text_lines(log)
  local out = {}
  for line in log:gmatch("[^\n]+") do
    local rest = line:match(" INFO %[[^%]]*%] message (.*)$")
    if rest then
      local t = { _line = line, qid = line:match(" q=([^%]]+)%]") }
      local pos = 1
      while pos <= #rest do
        local k, e = rest:match("^([%w_.-]+)=()", pos)
        assert(k, "bad field at " .. rest:sub(pos))
        local v
        if rest:sub(e, e) == '"' then
          local q = e + 1
          local buf = {}
          while rest:sub(q, q) ~= '"' do
            local ch = rest:sub(q, q)
            if ch == "\\" then
              local nx = rest:sub(q + 1, q + 1)
              buf[#buf + 1] = nx == "n" and "\n" or nx
              q = q + 2
            else
              buf[#buf + 1] = ch
              q = q + 1
            end
          end
          v, pos = table.concat(buf), q + 2
        else
          local s, p = rest:match("^([^ ]*) ?()", e)
          v, pos = s, p
        end
        t[k] = v
      end
      out[#out + 1] = t
    end
  end
  return out
end

local function json_lines(log)
  local out = {}
  for line in log:gmatch("[^\n]+") do
    local ok, t = pcall(cjson.decode, line)
    if ok and type(t) == "table" and t.msg == "message" then out[#out + 1] = t end
  end
  return out
end

-- waits (bounded) for n message lines
local function wait_lines(d, n, parse)
  local deadline = now() + 5
  repeat
    local got = parse(d:log())
    if #got >= n then return got end
    socket.sleep(0.02)
  until now() >= deadline
  return parse(d:log())
end

-- one message per case on one connection; returns the daemon
local function play(d)
  local c = assert(d:client())
  assert(c:optneg(U.mc.OFFER.postfix))
  U.open(c)
  local function msg(qid, rcpts)
    U.message(c, { qid = qid, rcpts = rcpts, mmacros = { { "i", qid } } })
  end
  msg("Q1ACCEPT", { "<ok@example.org>", "<refuse@example.org>" })
  msg("Q2REJECT", { "<reject@example.org>" })
  msg("Q3TEMP", { "<tempfail@example.org>" })
  msg("Q4DISC", { "<discard@example.org>" })
  msg("Q5EARLY", { "<early@example.org>" })
  msg("Q6ALL", { "<refuse1@example.org>", "<refuse2@example.org>" })
  msg("Q7FAIL", { "<fail@example.org>" })
  msg("Q8SLEEP", { "<sleep@example.org>" })
  -- abort mid-message: MAIL, RCPT, DATA, a header, then ABORT
  assert(c:mail("<s@example.org>", {}))
  assert(c:rcpt("<mid@example.org>"))
  assert(c:data({ { "i", "Q9ABORT" } }))
  assert(c:header("Subject", "secret subject", { { "i", "Q9ABORT" } }))
  c:abort()
  -- and the connection ends in the middle of one
  assert(c:mail("<s@example.org>", {}))
  assert(c:rcpt("<gone@example.org>"))
  assert(c:data({ { "i", "Q10GONE" } }))
  c:close()
end

local function by_qid(lines)
  local t = {}
  for _, l in ipairs(lines) do
    assert.is_nil(t[l.qid], "two lines for " .. tostring(l.qid))
    if l.qid then t[l.qid] = l end
  end
  return t
end

local function check(m, list, text)
  local function rcpts(v)
    if text then return v end
    return table.concat(v, ",")
  end
  local function num(v) return tonumber(v) end
  local function bool(v) if text then return v == "true" end return v end
  local a = m.Q1ACCEPT
  assert.are.equal("accept", a.verdict)
  assert.are.equal("eom", a.stage)
  assert.are.equal("eom", a.handler)
  assert.truthy(a.at:find("/script.lua:" .. EOM_LINE .. "$"), a.at)
  assert.are.equal("<ok@example.org>", rcpts(a.rcpts))
  assert.are.equal("<refuse@example.org>", rcpts(a.refused))
  assert.are.equal("<sender@example.org>", a.from)
  assert.are.equal("client.example.org[192.0.2.1]", a.client)
  assert.are.equal("add_header:2,change_header:1", a.mods)
  assert.is_nil(a.code)
  assert.is_true(num(a.handler_seconds) >= 0)
  assert.are.equal(0, num(a.lookup_seconds))
  if text then -- durations to the microsecond, never in exponent form (5.8e-05)
    local secs = "^%d+%.%d%d%d%d%d%d$"
    assert.truthy(a.handler_seconds:find(secs), a.handler_seconds)
    assert.truthy(a.lookup_seconds:find(secs), a.lookup_seconds)
  end

  local r = m.Q2REJECT
  assert.are.equal("reject", r.verdict)
  assert.are.equal(554, num(r.code))
  assert.are.equal("5.7.1 spam", r.reply)
  assert.are.equal(a.at, r.at)
  assert.is_nil(r.mods)

  local t = m.Q3TEMP
  assert.are.equal("tempfail", t.verdict)
  assert.are.equal(451, num(t.code))
  assert.are.equal("4.7.1 try later", t.reply)

  assert.are.equal("discard", m.Q4DISC.verdict)
  assert.are.equal("eom", m.Q4DISC.stage)
  assert.are.equal("discard", m.Q5EARLY.verdict)
  assert.are.equal("envrcpt", m.Q5EARLY.stage)
  assert.are.equal("envrcpt", m.Q5EARLY.handler)
  assert.truthy(m.Q5EARLY.at:find("/script.lua:" .. RCPT_LINE .. "$"), m.Q5EARLY.at)

  local all = m.Q6ALL
  assert.are.equal("reject", all.verdict)
  assert.are.equal("envrcpt", all.stage)
  assert.are.equal("<refuse1@example.org>,<refuse2@example.org>", rcpts(all.refused))
  assert.are.equal("", rcpts(all.rcpts))

  local f = m.Q7FAIL
  assert.are.equal("tempfail", f.verdict)
  assert.are.equal("eom", f.handler)
  assert.is_true(bool(f.on_error))
  assert.are.equal("4.3.0 Temporary mail filter failure, try again later", f.reply)

  local s = m.Q8SLEEP
  assert.are.equal("accept", s.verdict)
  assert.is_true(num(s.lookup_seconds) >= 0.04, "lookup_seconds " .. tostring(s.lookup_seconds))

  local ab = m.Q9ABORT
  assert.are.equal("abort", ab.verdict)
  assert.is_nil(ab.stage)
  assert.is_nil(ab.handler)
  assert.are.equal("<mid@example.org>", rcpts(ab.rcpts))
  assert.are.equal("abort", m.Q10GONE.verdict)
  assert.are.equal(10, #list)
end

describe("the message log line", function()
  it("has one line per message, for every way it ends (text)", function()
    local d = U.start(SRC)
    finally(function() d:stop() end)
    play(d)
    local lines = wait_lines(d, 10, text_lines)
    d:stop()
    check(by_qid(lines), lines, true)
    local log = d:log()
    assert.is_nil(log:find("secret subject", 1, true), "a header above debug")
    assert.is_nil(log:find("table: 0x", 1, true))
  end)

  it("has the same as fields in --log-format json", function()
    local d = U.start(SRC, { args = { "--log-format", "json" } })
    finally(function() d:stop() end)
    play(d)
    local lines = wait_lines(d, 10, json_lines)
    d:stop()
    check(by_qid(lines), lines, false)
    local m = by_qid(lines)
    assert.are.same({ "<ok@example.org>" }, m.Q1ACCEPT.rcpts)
    assert.are.equal("number", type(m.Q1ACCEPT.conn))
    assert.are.equal("number", type(m.Q2REJECT.code))
    assert.are.same({}, m.Q6ALL.rcpts)
  end)
end)

describe("ctx:log with a table", function()
  local LOG_SRC = U.script([[
function H.helo(ctx)
  ctx:log("info", "note", { b = "x y", a = 1, c = true, [1] = "first", msg = "mine" }, { z = 2.5 })
  ctx:log("info", { only = "fields" })
end
return H
]])

  it("logs its fields in text", function()
    local d = U.start(LOG_SRC)
    finally(function() d:stop() end)
    local c = assert(d:client())
    assert(c:optneg(U.mc.OFFER.postfix))
    U.open(c)
    c:close()
    local log = U.wait_log(d, "only=fields")
    d:stop()
    local line = U.lines_with(log, ": note ")[1]
    assert.truthy(line, log)
    assert.truthy(line:find('/script.lua:' .. U.line_of(LOG_SRC, '"note"') ..
      ': note 1=first a=1 b="x y" c=true _msg=mine z=2.5', 1, true), line)
    assert.is_nil(log:find("table: 0x", 1, true))
    assert.truthy(log:find("/script.lua:" .. U.line_of(LOG_SRC, "only =") .. ": only=fields", 1, true), log)
  end)

  it("logs its fields as members in JSON", function()
    local d = U.start(LOG_SRC, { args = { "--log-format", "json" } })
    finally(function() d:stop() end)
    local c = assert(d:client())
    assert(c:optneg(U.mc.OFFER.postfix))
    U.open(c)
    c:close()
    local log = U.wait_log(d, '"only":"fields"')
    d:stop()
    local got
    for line in log:gmatch("[^\n]+") do
      local t = cjson.decode(line)
      if t.b then got = t end
    end
    assert.truthy(got, log)
    assert.truthy(got.msg:find("^%[lua%] /.*/script.lua:" .. U.line_of(LOG_SRC, '"note"') .. ": note$"), got.msg)
    assert.are.equal(1, got.a)
    assert.are.equal("x y", got.b)
    assert.are.equal(true, got.c)
    assert.are.equal("first", got["1"])
    assert.are.equal("mine", got._msg)
    assert.are.equal(2.5, got.z)
  end)
end)
