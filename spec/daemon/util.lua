-- Shared helpers of the daemon specs (not a spec itself: no _spec suffix).
--
-- Scripts are inline Lua sources.  U.script(body) prepends a prelude that
-- defines `milter`, `H` and `seen(ctx, tag, value)`: seen() writes one log
-- line "SEEN <tag> <value serialised as a Lua literal>", which the specs read
-- back with U.seen(d, tag) / U.wait_seen(d, tag, n).  Every wait is bounded.
package.path = "./?.lua;" .. package.path

local D = require "spec.support.daemon"
local mc = require "spec.support.milter_client"
local socket = require "socket"
local now = require "spec.support.clock" -- monotonic, for waits
local luassert = require "luassert" -- busted's assert, for the helpers that check

local U = { D = D, mc = mc }

U.PRELUDE = [=[
local milter = require "milter"
local H = {}
local function ser(v)
  local t = type(v)
  if t == "string" then
    return '"' .. (v:gsub('[%c"\\\128-\255]', function(c)
      return string.format("\\%03d", c:byte())
    end)) .. '"'
  elseif t == "number" or t == "boolean" or t == "nil" then
    return tostring(v)
  elseif t == "table" then
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b)
      if type(a) ~= type(b) then return type(a) < type(b) end
      return a < b
    end)
    local parts = {}
    for _, k in ipairs(keys) do
      parts[#parts + 1] = "[" .. ser(k) .. "]=" .. ser(v[k])
    end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return '"<' .. t .. '>"'
end
local function seen(ctx, tag, value)
  ctx:log("info", "SEEN", tag, ser(value))
end
]=]

-- prelude + body; the body should end with "return H" (or its own return)
function U.script(body)
  return U.PRELUDE .. body
end

-- 1-based line number of the first line of src containing marker (plain)
function U.line_of(src, marker)
  local n = 0
  for line in (src .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    if line:find(marker, 1, true) then return n end
  end
  error("marker not found: " .. marker)
end

function U.start(src, opts)
  local d, err = D.start(src, opts)
  assert(d, "daemon did not start: " .. tostring(err))
  return d
end

local function decode(s)
  local f = assert(loadstring("return " .. s))
  setfenv(f, {})
  return f()
end

-- a file's whole contents; raises when it cannot be read
function U.read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

-- every value recorded by seen(ctx, tag, ...) so far, in log order; only
-- whole lines: a reader can see a line the daemon is still writing cut short
function U.seen(d, tag)
  local out = {}
  for line in (d:log():match("^.*\n") or ""):gmatch("[^\n]+") do
    local t, v = line:match(" SEEN (%S+) (.*)$")
    if t == tag then out[#out + 1] = decode(v) end
  end
  return out
end

-- waits until at least n values were recorded for tag (bounded)
function U.wait_seen(d, tag, n, timeout)
  local deadline = now() + (timeout or 5)
  repeat
    local got = U.seen(d, tag)
    if #got >= (n or 1) then return got end
    socket.sleep(0.02)
  until now() >= deadline
  return U.seen(d, tag)
end

-- waits until the log contains a plain string (bounded); returns the log
function U.wait_log(d, plain, timeout)
  local deadline = now() + (timeout or 5)
  repeat
    local log = d:log()
    if log:find(plain, 1, true) then return log end
    socket.sleep(0.02)
  until now() >= deadline
  return d:log()
end

-- number of non-overlapping occurrences of a plain string
function U.count(s, plain)
  local n, pos = 0, 1
  while true do
    local a, b = s:find(plain, pos, true)
    if not a then return n end
    n, pos = n + 1, b + 1
  end
end

-- log lines containing a plain string
function U.lines_with(s, plain)
  local out = {}
  for line in s:gmatch("[^\n]+") do
    if line:find(plain, 1, true) then out[#out + 1] = line end
  end
  return out
end

function U.free_port(host)
  local s
  if host and host:find(":") then
    s = assert(socket.tcp6())
    assert(s:bind(host, 0))
  else
    s = assert(socket.bind(host or "127.0.0.1", 0))
  end
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

-- Postfix's offer without NR_HDR/NR_EOH/NR_BODY: every event is answered,
-- so header, eoh and body verdicts come back at their own event (with the
-- full offer they are held for eom: spec/daemon/held_spec.lua)
U.REPLIES = { 6, 0x1ff, 0x1fffff - mc.SMFIP.NR_HDR - mc.SMFIP.NR_EOH - mc.SMFIP.NR_BODY }

-- connects and negotiates; returns client and negotiated fields
function U.client(d, offer)
  local c = assert(d:client())
  local neg, err = c:optneg(offer or mc.OFFER.postfix)
  assert(neg, "optneg failed: " .. tostring(err))
  return c, neg
end

-- reads until the server closes the connection; returns the error string
-- ("closed", ...) or "timeout" / "got frame X" when it did not close
function U.read_until_closed(c, timeout)
  local f, err = c:read_frame(timeout or 5)
  if f then return "got frame " .. f.cmd end
  return err
end

-- a full default Postfix-like session on a fresh connection, then QUIT;
-- returns the session result and the client (already closed)
function U.normal_session(d, opts)
  local c = assert(d:client())
  local res = c:session(opts or {})
  c:quit()
  c:close()
  return res, c
end

U.POSTFIX_C_MACROS = { { "j", "mta.example.org" }, { "{daemon_name}", "mta.example.org" },
  { "v", "Postfix 3.7.11" }, { "_", "client.example.org [192.0.2.1]" } }

-- CONNECT (+ HELO unless opts.helo == false) like Postfix; asserts replies
function U.open(c, opts)
  opts = opts or {}
  local r, err = c:connect_ev(opts.host or "client.example.org", opts.family or "4",
    opts.port or 40000, opts.addr or "192.0.2.1", opts.cmacros or U.POSTFIX_C_MACROS)
  assert(r, "connect: " .. tostring(err))
  if opts.helo ~= false then
    r, err = c:helo(opts.helo or "client.example.org", {})
    assert(r, "helo: " .. tostring(err))
  end
end

local STOP = { a = true, r = true, t = true, d = true, y = true, ["4"] = true, f = true }
local RCPT_REJ = { r = true, t = true, y = true }

-- one message (MAIL .. BODYEOB) on an open connection, then ABORT as Postfix
-- does (unless opts.no_abort).  opts: mail, mail_args, rcpts, rcpt_args,
-- headers, body, qid, mmacros, dmacros (DATA).  Returns {mail=, rcpts={}, data=, headers={},
-- eoh=, body={}, eom=, stopped=, error=} (entries are replies, "noreply",
-- "skipped" or an error string)
function U.message(c, opts)
  opts = opts or {}
  local res = { rcpts = {}, headers = {}, body = {} }
  local qid = { { "i", opts.qid or "4F2A1B3C5D" } }
  local function done(stage, err)
    res.stopped, res.error = stage, err
    if not err and not opts.no_abort then c:abort() end
    return res
  end
  local function stops(r) return type(r) == "table" and STOP[r.cmd] end
  local r, err = c:mail(opts.mail or "<sender@example.org>", opts.mail_args, opts.mmacros or {})
  res.mail = r or err
  if not r then return done("mail", err) end
  if stops(r) then return done("mail") end
  local accepted = 0
  for _, rc in ipairs(opts.rcpts or { "<rcpt@example.org>" }) do
    r, err = c:rcpt(rc, opts.rcpt_args, { { "{rcpt_addr}", rc } })
    res.rcpts[#res.rcpts + 1] = r or err
    if not r then return done("rcpt", err) end
    if stops(r) and not RCPT_REJ[r.cmd] then return done("rcpt") end
    if not (type(r) == "table" and RCPT_REJ[r.cmd]) then accepted = accepted + 1 end
  end
  if accepted == 0 then return done("rcpt") end
  r, err = c:data(opts.dmacros or qid)
  res.data = r or err
  if not r then return done("data", err) end
  if stops(r) then return done("data") end
  for _, h in ipairs(opts.headers or { { "From", "<sender@example.org>" },
      { "To", "<rcpt@example.org>" }, { "Subject", "test" } }) do
    r, err = c:header(h[1], h[2], qid)
    res.headers[#res.headers + 1] = r or err
    if not r then return done("headers", err) end
    if stops(r) then return done("headers") end
  end
  r, err = c:eoh(qid)
  res.eoh = r or err
  if not r then return done("eoh", err) end
  if stops(r) then return done("eoh") end
  local body, pos = opts.body or "Hello.\r\n", 1
  while pos <= #body do
    r, err = c:body(body:sub(pos, pos + 65534), qid)
    res.body[#res.body + 1] = r or err
    if not r then return done("body", err) end
    if stops(r) then return done("body") end
    if type(r) == "table" and r.cmd == "s" then break end
    pos = pos + 65535
  end
  r, err = c:eom(qid)
  res.eom = r or err
  if not r then return done("eom", err) end
  return done(nil)
end

-- A handler abandoned while it waits on a lookup the test holds, from the
-- MTA's side.  The script records seen(ctx, "waiting", ...) just before the
-- wait, seen(ctx, "resumed", ...) just after it, and "abort" / "close" in
-- those handlers.  how:
--   "abort"    MAIL <a@example.org>, RCPT <b@example.org>, EOM, and the
--              MTA's ABORT while eom waits; the same connection then serves
--              a second message (U.message), QUITs and closes
--   "hang up"  MAIL <a@example.org>, RCPT <held@example.org>, and the MTA
--              hangs up while envrcpt waits; a second message is served on a
--              new connection (U.normal_session)
-- Last it checks that no handler was resumed.  opts:
--   release()      lets the held lookup answer, once abort (or close) ran;
--                  without it the lookup is never answered
--   mail           the second message's sender (default theirs)
--   handled(got)   checks what abort (or close) recorded, before the release
--   served(res)    checks the second message's result
--   nth            this is the daemon's nth abandoned handler: the number of
--                  records to wait for (default 1)
--   close          false when the script has no close handler: nothing to
--                  wait for after the QUIT ("abort" only)
-- Returns the second message's result.
function U.abandoned(d, how, opts)
  opts = opts or {}
  assert(how == "abort" or how == "hang up", "how: abort or hang up")
  local hang_up, n = how == "hang up", opts.nth or 1
  local c = U.client(d)
  U.open(c)
  assert(c:mail("<a@example.org>", {}))
  if hang_up then
    assert(c:send("R", "<held@example.org>\0"))
  else
    assert(c:rcpt("<b@example.org>", {}))
    assert(c:send("E", ""))
  end
  U.wait_seen(d, "waiting", n)
  if hang_up then c:close() else assert(c:abort()) end
  local got = U.wait_seen(d, hang_up and "close" or "abort", n)
  if opts.handled then opts.handled(got) end
  if opts.release then opts.release() end
  local res
  if hang_up then
    res = U.normal_session(d, { mail = opts.mail })
    if opts.served then opts.served(res) end
  else
    res = U.message(c, { mail = opts.mail })
    if opts.served then opts.served(res) end
    c:quit()
    c:close()
    if opts.close ~= false then U.wait_seen(d, "close", n) end
  end
  luassert.are.same({}, U.seen(d, "resumed"))
  return res
end

-- bytes of a REPLYCODE as libmilter builds it
function U.mlreply(code, xcode, lines)
  local out = {}
  for i, l in ipairs(lines) do
    local sep = i < #lines and "-" or " "
    out[i] = code .. sep .. (xcode and (xcode .. " ") or "") .. l
  end
  return table.concat(out, "\r\n")
end

function U.ops(mods)
  local out = {}
  for i, m in ipairs(mods) do out[i] = m.op end
  return out
end

U.band, U.bor, U.bnot = require("bit").band, require("bit").bor, require("bit").bnot

return U
