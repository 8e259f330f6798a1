-- luacheck: std +busted
-- Script errors, bad verdicts and malformed frames: the MTA gets the
-- --on-error verdict or a closed connection, the log says why, and the
-- daemon keeps serving.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local mc = U.mc

local function is_tempfail(r)
  return type(r) == "table" and (r.cmd == "t" or (r.cmd == "y" and r.text:match("^4%d%d[ -]") ~= nil))
end
local function is_reject(r)
  return type(r) == "table" and (r.cmd == "r" or (r.cmd == "y" and r.text:match("^5%d%d[ -]") ~= nil))
end
local function show(r)
  if type(r) ~= "table" then return tostring(r) end
  return r.cmd .. (r.text and (" " .. r.text) or "")
end

-- the session result field holding the reply of a handler's event
local FIELD = { connect = "connect", helo = "helo", envfrom = "mail", eom = "eom" }
local function stage_reply(res, handler)
  local r
  if handler == "envrcpt" then r = res.rcpts[1]
  elseif handler == "body" then r = res.body[1]
  elseif handler == "header" then r = res.headers[1]
  else r = res[FIELD[handler] or handler] end
  -- header, eoh and body run reply-free behind Postfix: their verdict is
  -- held for eom (spec/daemon/held_spec.lua)
  if r == "noreply" and (handler == "header" or handler == "eoh" or handler == "body") then
    return res.eom
  end
  return r
end

-- a normal session on a new connection must work: every reply 'c', eom 'c'
local function assert_serves(d)
  local res = U.normal_session(d)
  assert.is_nil(res.error, "normal session error: " .. tostring(res.error))
  assert.is_true(type(res.eom) == "table" and (res.eom.cmd == "c" or res.eom.cmd == "a"),
    "normal session eom: " .. show(res.eom))
  assert.is_true(d:alive(), "daemon died")
  return res
end

describe("a handler that raises", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  local SRC = U.script [[
function H.envfrom(ctx, sender)
  if sender == "<boom@example.org>" then
    error("kaboom-marker") -- @raise
  end
end
function H.eom(ctx)
  if ctx.sender == "<eomboom@example.org>" then
    local t = nil
    return t.field -- @eomraise
  end
  return milter.accept{ add_header = { { "X-Ok", "1" } } }
end
return H
]]
  local RAISE_LINE = U.line_of(SRC, "-- @raise")

  it("gets a tempfail with a generic text; the log has file:line and one traceback", function()
    d = U.start(SRC)
    c = U.client(d)
    local res = c:session { mail = "<boom@example.org>" }
    assert.is_true(is_tempfail(res.mail), "expected tempfail, got " .. show(res.mail))
    if res.mail.text then
      assert.is_nil(res.mail.text:find("kaboom", 1, true), "reply leaks the error: " .. res.mail.text)
      assert.is_nil(res.mail.text:find("script.lua", 1, true), "reply leaks the path")
      assert.is_nil(res.mail.text:find("/tmp", 1, true), "reply leaks the path")
      assert.is_nil(res.mail.text:find("stack", 1, true), "reply leaks the traceback")
    end
    local log = U.wait_log(d, "kaboom-marker")
    assert.is_truthy(log:find("script.lua:" .. RAISE_LINE .. ": kaboom-marker", 1, true), log)
    assert.are.equal(1, U.count(log, "kaboom-marker"), log)
    assert.are.equal(1, U.count(log, "stack traceback"), log)
    local errs = U.lines_with(log, "ERROR")
    assert.are.equal(1, #errs, log)
    assert.is_truthy(errs[1]:find("envfrom", 1, true), "names the handler: " .. errs[1])
  end)

  it("does not disturb the next message on the same connection nor a new connection", function()
    d = U.start(SRC)
    c = U.client(d)
    U.open(c)
    local r1 = U.message(c, { mail = "<boom@example.org>" })
    assert.is_true(is_tempfail(r1.mail))
    local r2 = U.message(c, { mail = "<fine@example.org>" })
    assert.are.equal("a", r2.eom.cmd)
    assert.are.same({ { op = "addheader", name = "X-Ok", value = "1" } }, r2.eom.mods)
    local r3 = assert_serves(d)
    assert.are.equal("a", r3.eom.cmd)
  end)

  it("in eom: tempfail and no modifications", function()
    d = U.start(SRC)
    c = U.client(d)
    local res = c:session { mail = "<eomboom@example.org>" }
    assert.is_true(is_tempfail(res.eom), show(res.eom))
    assert.are.same({}, res.eom.mods)
    local log = U.wait_log(d, "stack traceback")
    assert.is_truthy(log:find("script.lua:" .. U.line_of(SRC, "-- @eomraise") .. ":", 1, true), log)
    assert_serves(d)
  end)

  local ON_ERROR = {
    { "accept", function(r) return type(r) == "table" and r.cmd == "a" end },
    { "reject", is_reject },
    { "continue", function(r) return type(r) == "table" and r.cmd == "c" end },
    { "tempfail", is_tempfail },
  }
  for _, oe in ipairs(ON_ERROR) do
    it("--on-error " .. oe[1] .. " decides the reply", function()
      d = U.start(SRC, { args = { "--on-error", oe[1] } })
      c = U.client(d)
      U.open(c)
      local r = U.message(c, { mail = "<boom@example.org>" })
      assert.is_true(oe[2](r.mail), "got " .. show(r.mail))
      if r.mail.text then
        assert.is_nil(r.mail.text:find("kaboom", 1, true))
      end
      local r2 = U.message(c, { mail = "<eomboom@example.org>" })
      if oe[1] ~= "accept" then
        assert.is_true(oe[2](r2.eom), "eom got " .. show(r2.eom))
        assert.are.same({}, r2.eom.mods)
      end
      assert_serves(d)
    end)
  end

  it("in envrcpt: that recipient gets the tempfail and leaves ctx.rcpts", function()
    d = U.start(U.script [[
function H.envrcpt(ctx, rcpt) if rcpt == "<boom@example.org>" then error("rcpt-boom") end end
function H.eom(ctx) seen(ctx, "rcpts", ctx.rcpts) end
return H
]])
    c = U.client(d)
    local res = c:session { rcpts = { "<a@example.org>", "<boom@example.org>", "<b@example.org>" } }
    assert.are.equal("c", res.rcpts[1].cmd)
    assert.is_true(is_tempfail(res.rcpts[2]), show(res.rcpts[2]))
    assert.are.equal("c", res.rcpts[3].cmd)
    assert.are.equal("c", res.eom.cmd)
    assert.are.same({ { "<a@example.org>", "<b@example.org>" } }, U.seen(d, "rcpts"))
  end)

  it("in envrcpt with --on-error accept: that recipient passes, the message is still filtered", function()
    d = U.start(U.script [[
function H.envrcpt(ctx, rcpt)
  if rcpt == "<boom@example.org>" then error("rcpt-boom") end
  if rcpt == "<no@example.org>" then return milter.reject{ reason = "no" } end
end
function H.eom(ctx)
  seen(ctx, "rcpts", ctx.rcpts)
  return milter.accept{ add_header = { { "X-Filtered", "yes" } } }
end
return H
]], { args = { "--on-error", "accept" } })
    c = U.client(d)
    local res = c:session { rcpts = { "<boom@example.org>", "<no@example.org>", "<b@example.org>" } }
    assert.are.equal("c", res.rcpts[1].cmd, show(res.rcpts[1]))
    assert.is_true(is_reject(res.rcpts[2]), show(res.rcpts[2]))
    assert.are.equal("a", res.eom.cmd, show(res.eom))
    assert.are.equal("X-Filtered", res.eom.mods[1].name)
    assert.are.same({ { "<boom@example.org>", "<b@example.org>" } }, U.seen(d, "rcpts"))
  end)

  it("with a non-string error object is still a logged tempfail", function()
    d = U.start(U.script [[
function H.envfrom(ctx) error({ code = 1 }) end
return H
]])
    c = U.client(d)
    local res = c:session {}
    assert.is_true(is_tempfail(res.mail), show(res.mail))
    local log = U.wait_log(d, "ERROR")
    assert.are.equal(1, #U.lines_with(log, "ERROR"), log)
    assert.is_true(d:alive())
  end)

  it("in abort and close is logged and harmless", function()
    d = U.start(U.script [[
function H.envfrom(ctx) end
function H.abort(ctx) error("abort-marker") end
function H.close(ctx) error("close-marker") end
return H
]])
    c = U.client(d)
    U.open(c)
    assert(c:mail("<a@example.org>"))
    c:abort()
    c:quit()
    local log = U.wait_log(d, "close-marker")
    assert.are.equal(1, U.count(log, "abort-marker"), log)
    assert.are.equal(1, U.count(log, "close-marker"), log)
    assert.is_true(d:alive())
    c:close(); c = nil
    local res = U.normal_session(d)
    assert.are.equal("c", res.mail.cmd)
  end)
end)

describe("a bad verdict", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  local LINES33 = "(function() local t = {} for i = 1, 33 do t[i] = 'l' .. i end return t end)()"
  local BAD = {
    { "unknown key add_headers", "eom", 'milter.accept{ add_headers = { { "X-A", "b" } } }', "add_headers" },
    { "unknown key with reject", "envfrom", 'milter.reject{ reasons = "typo" }', "reasons" },
    { "skip outside body (envfrom)", "envfrom", "milter.skip()" },
    { "skip outside body (eom)", "eom", "milter.skip()" },
    { "skip outside body (header)", "header", "milter.skip()" },
    { "discard at connect", "connect", "milter.discard()" },
    { "discard at helo", "helo", "milter.discard()" },
    { "modification outside eom (envfrom)", "envfrom", 'milter.accept{ add_header = { { "X-A", "b" } } }' },
    { "modification outside eom (body)", "body", 'milter.continue{ quarantine = "q" }' },
    { "modification with reject at eom", "eom", 'milter.reject{ add_header = { { "X-A", "b" } } }' },
    { "modification with discard at eom", "eom", 'milter.discard{ change_from = "<x@example.org>" }' },
    { "reject with a 4xx code", "envfrom", "milter.reject{ code = 451, reason = 'x' }" },
    { "tempfail with a 5xx code", "envfrom", "milter.tempfail{ code = 550, reason = 'x' }" },
    { "reject with code 600", "envfrom", "milter.reject{ code = 600 }" },
    { "xcode class mismatch (reject)", "envfrom", 'milter.reject{ code = 550, xcode = "4.7.1" }' },
    { "xcode class mismatch (tempfail)", "eom", 'milter.tempfail{ code = 451, xcode = "5.7.1" }' },
    { "malformed xcode", "envfrom", 'milter.reject{ code = 550, xcode = "five" }' },
    { "wrong type: string verdict", "envfrom", '"accept"' },
    { "wrong type: number verdict", "eom", "42" },
    { "wrong type: code as a string", "envfrom", 'milter.reject{ code = "550" }' },
    { "wrong type: reason as a number", "envfrom", "milter.reject{ reason = 42 }" },
    { "wrong type: add_header not a list of pairs", "eom", 'milter.accept{ add_header = { "X-A: b" } }' },
    { "wrong type: change_from as a number", "eom", "milter.accept{ change_from = 42 }" },
    { "unknown action", "envfrom", '{ action = "bounce" }' },
    { "table without action", "envfrom", "{ code = 550 }" },
    { "33 reason lines", "envfrom", "milter.reject{ code = 550, reason = " .. LINES33 .. " }" },
    { "negative insert index", "eom", 'milter.accept{ insert_header = { { -1, "X-A", "b" } } }' },
    { "header name with a colon", "eom", 'milter.accept{ add_header = { { "X-A:", "b" } } }' },
    { "code 1e300", "envfrom", "milter.reject{ code = 1e300 }" },
    { "code NaN", "envfrom", "milter.reject{ code = 0/0 }" },
    { "code infinity", "envrcpt", "milter.tempfail{ code = math.huge }" },
    { "code -infinity", "envfrom", "milter.reject{ code = -math.huge }" },
    { "insert index 1e300", "eom", 'milter.accept{ insert_header = { { 1e300, "X-A", "b" } } }' },
    { "insert index NaN", "eom", 'milter.accept{ insert_header = { { 0/0, "X-A", "b" } } }' },
    { "change nth infinity", "eom", 'milter.accept{ change_header = { { "X-A", math.huge, "b" } } }' },
    { "xcode with a leading space", "envfrom", 'milter.reject{ code = 550, xcode = " 5.7.1" }' },
    { "xcode with spaces", "envfrom", 'milter.reject{ code = 550, xcode = "5. 7. 1" }' },
    { "xcode with signs", "envfrom", 'milter.reject{ code = 550, xcode = "5.-7.+1" }' },
    { "xcode with 4 digits", "envrcpt", 'milter.tempfail{ xcode = "4.7.1000" }' },
    { "header above 65535 bytes", "eom",
      'milter.accept{ add_header = { { "X-Big", ("v"):rep(65535) } } }', "65535" },
    { "change_header above 65535 bytes", "eom",
      'milter.accept{ change_header = { { "X-Big", 1, ("v"):rep(65530) } } }', "65535" },
    { "add_rcpt above 65535 bytes", "eom",
      'milter.accept{ add_rcpt = { "<" .. ("a"):rep(65535) .. ">" } }', "65535" },
    { "change_from above 65535 bytes", "eom",
      'milter.accept{ change_from = "<" .. ("a"):rep(65535) .. ">" }', "65535" },
    { "quarantine above 65535 bytes", "eom", 'milter.accept{ quarantine = ("q"):rep(65535) }', "65535" },
  }

  local function bad_script(handler, expr)
    return U.script(([[
local function bad(ctx) return ctx.client.host == "bad.example.org" end
function H.%s(ctx) -- @def
  if bad(ctx) then return %s end
end
%s
return H
]]):format(handler, expr, handler == "eom" and "" or "function H.eom(ctx) end"))
  end

  for _, b in ipairs(BAD) do
    local name, handler, expr, mention = b[1], b[2], b[3], b[4]
    it(name .. ": on-error tempfail, log names " .. handler .. " and file:line, daemon serves on", function()
      local src = bad_script(handler, expr)
      local def = U.line_of(src, "-- @def")
      d = U.start(src)
      c = U.client(d)
      local res = c:session { connect = { host = "bad.example.org" } }
      local r = stage_reply(res, handler)
      assert.is_true(is_tempfail(r), "expected tempfail, got " .. show(r))
      assert.are.same({}, r.mods)
      local log = U.wait_log(d, "ERROR")
      local errs = U.lines_with(log, "ERROR")
      assert.are.equal(1, #errs, log)
      assert.is_truthy(errs[1]:find(handler, 1, true), "handler not named: " .. errs[1])
      assert.is_truthy(errs[1]:find("script.lua:" .. def, 1, true), "file:line not named: " .. errs[1])
      if mention then
        assert.is_truthy(errs[1]:find(mention, 1, true), mention .. " not named: " .. errs[1])
      end
      c:close(); c = nil
      assert_serves(d)
    end)
  end

  for _, oe in ipairs({ { "accept", "a" }, { "continue", "c" } }) do
    it("gets the --on-error " .. oe[1] .. " verdict", function()
      d = U.start(bad_script("envfrom", "milter.reject{ code = 451 }"), { args = { "--on-error", oe[1] } })
      c = U.client(d)
      local res = c:session { connect = { host = "bad.example.org" } }
      assert.are.equal(oe[2], res.mail.cmd)
      assert.is_truthy(U.wait_log(d, "ERROR"):find("ERROR", 1, true))
    end)
  end

  it("gets the --on-error reject verdict (a 5xx)", function()
    d = U.start(bad_script("eom", '{ action = "bounce" }'), { args = { "--on-error", "reject" } })
    c = U.client(d)
    local res = c:session { connect = { host = "bad.example.org" } }
    assert.is_true(is_reject(res.eom), show(res.eom))
  end)
end)

describe("a malformed frame", function()
  local d, c, other

  before_each(function()
    d = U.start(U.script [[
function H.helo(ctx) end
function H.eom(ctx) return milter.accept{ add_header = { { "X-Ok", "1" } } } end
return H
]])
    -- a bystander conversation, open while the bad frame arrives
    other = U.client(d)
    U.open(other)
  end)

  after_each(function()
    if c then c:close(); c = nil end
    if other then other:close(); other = nil end
    if d then d:stop(); d = nil end
  end)

  local function closed(err)
    return err == "closed" or tostring(err):find("reset", 1, true) ~= nil
  end

  local function check_closed_and_serving()
    local err = U.read_until_closed(c, 3)
    assert.is_true(closed(err), "connection not closed: " .. tostring(err))
    local log = U.wait_log(d, " WARN ")
    assert.is_true(#U.lines_with(log, " WARN ") >= 1, "no warn line:\n" .. log)
    c:close(); c = nil
    -- the bystander goes on undisturbed
    local m = U.message(other, {})
    assert.is_table(m.eom, "bystander: " .. tostring(m.eom))
    assert.are.equal("a", m.eom.cmd)
    assert.are.same({ { op = "addheader", name = "X-Ok", value = "1" } }, m.eom.mods)
    local res = assert_serves(d)
    assert.are.equal("a", res.eom.cmd)
    assert.are.same({ { op = "addheader", name = "X-Ok", value = "1" } }, res.eom.mods)
  end

  local CASES = {
    { "zero length", function() return "\0\0\0\0" end },
    { "length 2^32-1", function() return "\255\255\255\255C" end },
    { "unknown command byte", function() return mc.frame("Z", "xyz\0") end },
    { "a string without NUL", function() return mc.frame("H", "no-terminator") end },
    { "a CONNECT with an unknown family", function() return mc.frame("C", "host\0X\0\0addr\0") end },
    { "a macro name without a value", function() return mc.frame("D", "Cj\0") end },
  }
  for _, case in ipairs(CASES) do
    it(case[1] .. " closes only that connection", function()
      c = U.client(d)
      assert(c:connect_ev("h", "4", 1, "192.0.2.1"))
      assert(c:send_raw(case[2]()))
      check_closed_and_serving()
    end)
  end

  it("garbage (an HTTP request) instead of OPTNEG closes the connection", function()
    c = assert(d:client())
    assert(c:send_raw("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    check_closed_and_serving()
  end)

  it("a command before OPTNEG closes the connection", function()
    c = assert(d:client())
    assert(c:send("C", "h\0" .. "4\0\1" .. "192.0.2.1\0"))
    check_closed_and_serving()
  end)

  it("a truncated frame then EOF closes the connection", function()
    c = U.client(d)
    assert(c:connect_ev("h", "4", 1, "192.0.2.1"))
    assert(c:send_raw(mc.u32(100) .. "M<a@exa"))
    assert(c.sock:shutdown("send"))
    check_closed_and_serving()
  end)
end)

describe("packets of 1 MiB", function()
  local d, c
  -- payload = 1 MiB - 1 (the command byte makes the length field 1 MiB)
  local N = 1024 * 1024 - 1

  before_each(function()
    d = U.start(U.script [[
function H.helo(ctx, name) seen(ctx, "len", #name) end
function H.header(ctx, name, value) seen(ctx, "len", #value) end
function H.body(ctx, chunk) seen(ctx, "len", #chunk) end
function H.unknown(ctx, cmd) seen(ctx, "len", #cmd) end
return H
]])
    c = U.client(d)
    assert(c:connect_ev("h", "4", 1, "192.0.2.1"))
  end)

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  it("HELO is accepted", function()
    local r, err = c:helo(string.rep("h", N - 1))
    assert.is_table(r, "HELO of 1 MiB: " .. tostring(err) .. "\n" .. d:log())
    assert.are.equal("c", r.cmd)
    assert.are.same({ N - 1 }, U.seen(d, "len"))
  end)

  it("UNKNOWN is accepted", function()
    local r, err = c:unknown(string.rep("u", N - 1))
    assert.is_table(r, "UNKNOWN of 1 MiB: " .. tostring(err))
    assert.are.equal("c", r.cmd)
    assert.are.same({ N - 1 }, U.seen(d, "len"))
  end)

  it("HEADER and BODY are accepted", function()
    assert(c:helo("x"))
    assert(c:mail("<a@example.org>"))
    assert(c:rcpt("<b@example.org>"))
    local r, err = c:header("X-Big", string.rep("v", N - 7))
    assert.are.equal("noreply", r, "HEADER of 1 MiB: " .. tostring(err))
    r, err = c:body(string.rep("b", N))
    assert.are.equal("noreply", r, "BODY of 1 MiB: " .. tostring(err))
    r, err = c:eom()
    assert.is_table(r, "EOM after them: " .. tostring(err))
    assert.are.same({ 1, N - 7, N }, U.seen(d, "len"))
  end)
end)
