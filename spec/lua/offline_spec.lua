-- `luamilter test` and the milter.test module over the messages in spec/eml.
local mt = require "milter.test"

local DATE = "%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d %+0000 %(UTC%)"

local tmpfiles = {}
local function script(src)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(src)
  f:close()
  tmpfiles[#tmpfiles + 1] = path
  return path
end

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function run(src, t)
  t = t or {}
  t.script = script(src)
  if not t.message then t.file = t.file or "spec/eml/plain-lf.eml" end
  return mt.run(t)
end

-- the message without the trace header's date, which changes every second
local function msg(r)
  assert.is_string(r.message, r.stderr)
  return (r.message:gsub(DATE, "DATE"))
end

local TRACE1 = "Received: from localhost (unknown [127.0.0.1])\r\n" ..
  "\tby localhost (Postfix) with ESMTP id 4TEST000001\r\n\tfor <bob@example.org>; DATE\r\n"

local PLAIN_HEADERS = "From: Alice <alice@example.net>\r\nTo: bob@example.org\r\nSubject: plain text\r\n" ..
  "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <plain@example.net>\r\nX-Dup: one\r\nX-Dup: two\r\n"
local PLAIN_BODY = "\r\nHello Bob,\r\n\r\nthis is a plain message.\r\n"

teardown(function()
  for _, p in ipairs(tmpfiles) do os.remove(p) end
end)

describe("luamilter test", function()
  it("delivers an untouched message with the MTA's trace header on top", function()
    local r = run("return {}")
    assert.are.equal(0, r.status, r.stderr)
    assert.are.equal(TRACE1 .. PLAIN_HEADERS .. PLAIN_BODY, msg(r))
    assert.are.same({ sender = "<alice@example.net>", rcpts = { "<bob@example.org>" } }, r.envelope)
    assert.is_true(r.final.delivered)
  end)

  it("applies every modification with Postfix's semantics", function()
    local r = run([[
      local milter = require "milter"
      return { eom = function(ctx)
        return milter.accept{
          add_header = { { "X-Added", "one" }, { "X-Folded", "a\n\tb" } },
          insert_header = { { 0, "X-Top", "top" }, { 2, "X-After-To", "here" } },
          change_header = { { "Subject", 1, "[EXT] " .. ctx:header("Subject") }, { "x-dup", 2, "TWO" } },
          delete_header = { { "X-Dup", 1 }, { "Message-ID" } },
          add_rcpt = { "<audit@example.org>", { "<b2@example.org>", "NOTIFY=NEVER" } },
          del_rcpt = { "<bob@example.org>" },
          change_from = { "<bounce@example.org>", "RET=HDRS" },
          replace_body = "new body\nsecond line",
          quarantine = "looks odd",
        }
      end }
    ]])
    assert.are.equal(0, r.status, r.stderr)
    assert.are.equal("X-Top: top\r\n" .. TRACE1 ..
      "From: Alice <alice@example.net>\r\nTo: bob@example.org\r\nX-After-To: here\r\n" ..
      "Subject: [EXT] plain text\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n" ..
      "x-dup: TWO\r\nX-Added: one\r\nX-Folded: a\r\n\tb\r\n" ..
      "\r\nnew body\r\nsecond line\r\n", msg(r))
    assert.are.same({ sender = "<bounce@example.org>", rcpts = { "<audit@example.org>", "<b2@example.org>" } },
      r.envelope)
    assert.are.equal("looks odd", r.quarantine)
    local ops = {}
    for _, m in ipairs(r.modifications) do ops[#ops + 1] = m.op end
    assert.are.same({ "add_header", "add_header", "insert_header", "insert_header", "change_header",
      "change_header", "delete_header", "delete_header", "add_rcpt", "add_rcpt", "del_rcpt",
      "change_from", "replace_body", "quarantine" }, ops)
  end)

  it("reads CRLF messages and takes the envelope from From:, To: and Cc:", function()
    local r = run([[
      local milter = require "milter"
      return { eom = function(ctx) return milter.accept{ add_header = { { "X-N", tostring(#ctx.rcpts) } } } end }
    ]], { file = "spec/eml/crlf.eml" })
    assert.are.equal(0, r.status, r.stderr)
    assert.are.same({ sender = "<jane@example.net>",
      rcpts = { "<bob@example.org>", "<carol@example.org>", "<dave@example.org>" } }, r.envelope)
    assert.matches("\r\nX%-N: 3\r\n\r\nLine one\r\nLine two\r\n$", r.message)
  end)

  it("passes folded header values as the MTA does and replaces them whole", function()
    local r = run([[
      local milter = require "milter"
      return {
        header = function(ctx, name, value) if name == "Subject" then ctx.msg.s = value end end,
        eom = function(ctx)
          return milter.accept{ add_header = { { "X-Seen", (ctx.msg.s:gsub("\n", "|"):gsub("\t", "TAB")) } },
            change_header = { { "X-Long", 1, "short" } } }
        end }
    ]], { file = "spec/eml/folded.eml" })
    assert.are.equal(0, r.status, r.stderr)
    local m = msg(r)
    assert.truthy(m:find("Subject: a folded\r\n subject line\r\n\tcontinued with a tab\r\nX-Long: short\r\n", 1, true))
    assert.truthy(m:find("X-Seen: a folded| subject line|TABcontinued with a tab\r\n", 1, true))
  end)

  it("keeps 8-bit header values and bodies byte for byte", function()
    local r = run([[
      local milter = require "milter"
      return { eom = function(ctx)
        return milter.accept{ add_header = { { "X-Copy", ctx:header("X-Raw-8bit") } } }
      end }
    ]], { file = "spec/eml/8bit.eml" })
    assert.are.equal(0, r.status, r.stderr)
    assert.truthy(r.message:find("X-Raw-8bit: caf\195\169 \233t\233\r\n", 1, true))
    assert.truthy(r.message:find("X-Copy: caf\195\169 \233t\233\r\n", 1, true))
    assert.truthy(r.message:find("\r\n\r\nd\195\169j\195\160 vu \226\130\172\r\n$"))
  end)

  it("handles a message with headers only: no body call, no separator line", function()
    local r = run([[
      local milter = require "milter"
      return {
        body = function(ctx) ctx.msg.body_called = true end,
        eom = function(ctx)
          return milter.accept{ add_header = { { "X-Body", ctx.msg.body_called and "yes" or "no" } } }
        end }
    ]], { file = "spec/eml/headers-only.eml" })
    assert.are.equal(0, r.status, r.stderr)
    assert.matches("X%-Note: no body at all\r\nX%-Body: no\r\n$", r.message)
  end)

  it("hands a MIME body to body() with CRLF line ends, in order", function()
    local r = run([[
      local milter = require "milter"
      return {
        body = function(ctx, chunk) ctx.msg.b = (ctx.msg.b or "") .. chunk end,
        eom = function(ctx)
          return milter.accept{ replace_body = ctx.msg.b:upper() }
        end }
    ]], { file = "spec/eml/multipart.eml" })
    assert.are.equal(0, r.status, r.stderr)
    local body = slurp("spec/eml/multipart.eml"):match("\n\n(.*)$"):gsub("\n", "\r\n")
    assert.are.equal(body:upper(), r.message:match("\r\n\r\n(.*)$"))
  end)

  it("accept at envfrom: no later handler, nothing modified", function()
    local r = run([[
      local milter = require "milter"
      return { envfrom = function() return milter.accept() end,
               eom = function() return milter.accept{ add_header = { { "X-No", "1" } } } end }
    ]])
    assert.are.equal(0, r.status, r.stderr)
    assert.are.equal(TRACE1 .. PLAIN_HEADERS .. PLAIN_BODY, msg(r))
    assert.are.equal(1, #r.stages)
    assert.are.equal("accept", r.final.action)
  end)

  it("reject, tempfail and discard exit 1 and deliver nothing", function()
    for _, case in ipairs({ { "reject{code=550, reason='no'}", "reject", "550 5.7.1 no" },
                            { "tempfail{reason='later'}", "tempfail", "451 4.7.1 later" },
                            { "discard()", "discard", nil } }) do
      local r = run("local milter = require 'milter'\nreturn { envfrom = function() return milter." ..
        case[1] .. " end }")
      assert.are.equal(1, r.status, r.stderr)
      assert.are.equal(case[2], r.final.action)
      assert.are.equal(case[3], r.final.reply)
      assert.is_false(r.final.delivered)
    end
  end)

  it("a rejected recipient is dropped; all rejected ends as reject", function()
    local src = [[
      local milter = require "milter"
      return { envrcpt = function(ctx, rcpt)
        if rcpt:find("bad") then return milter.reject{ xcode = "5.1.1", reason = "no such user" } end
      end }
    ]]
    local r = run(src, { rcpt = { "bad@example.org", "<ok@example.org>" } })
    assert.are.equal(0, r.status, r.stderr)
    assert.are.same({ "<ok@example.org>" }, r.envelope.rcpts)
    assert.are.equal("550 5.1.1 no such user", r.stages[1].verdict.reply)
    r = run(src, { rcpt = { "bad1@example.org", "bad2@example.org" } })
    assert.are.equal(1, r.status)
    assert.are.equal("reject", r.final.action)
  end)

  it("skip in body stops the body calls", function()
    local r = run([[
      local milter = require "milter"
      return { body = function(ctx) ctx.conn.n = (ctx.conn.n or 0) + 1; return milter.skip() end,
               eom = function(ctx) return milter.accept{ add_header = { { "X-Calls", tostring(ctx.conn.n) } } } end }
    ]], { message = "From: a@example.net\nTo: b@example.org\n\n" .. ("x"):rep(200000) .. "\n" })
    assert.are.equal(0, r.status, r.stderr)
    assert.truthy(r.message:find("X-Calls: 1\r\n", 1, true))
    assert.are.equal("skip", r.stages[1].verdict.action)
  end)

  it("uses --from, --rcpt, --client, --helo and --macro", function()
    local r = run([[
      local milter = require "milter"
      return { eom = function(ctx)
        return milter.accept{ add_header = { { "X-Info", table.concat({ ctx.sender, ctx.rcpts[1], ctx.client.address,
          ctx.client.host, ctx.helo, ctx:macro("{auth_authen}") }, " ") } } }
      end }
    ]], { from = "x@example.com", rcpt = { "y@example.com" }, client = "mx.example.com[192.0.2.5]",
          helo = "mx.example.com", macros = { auth_authen = "joe" } })
    assert.are.equal(0, r.status, r.stderr)
    assert.truthy(r.message:find("X-Info: <x@example.com> <y@example.com> 192.0.2.5 mx.example.com mx.example.com joe",
      1, true))
    assert.truthy(r.message:find("Received: from mx.example.com (mx.example.com [192.0.2.5])", 1, true))
  end)

  it("prints a readable report without --json", function()
    local path = script([[
      local milter = require "milter"
      return { envrcpt = function() end, eom = function() return milter.accept{ add_header = { { "X-A", "b" } } } end }
    ]])
    local p = io.popen("./build/luamilter test " .. path .. " spec/eml/plain-lf.eml")
    local out = p:read("*a")
    p:close()
    assert.truthy(out:find("envrcpt(<bob@example.org>): continue\n", 1, true))
    assert.truthy(out:find("eom: accept\n  add_header X-A: b\n", 1, true))
    assert.truthy(out:find("final: accept (delivered)\n", 1, true))
    assert.truthy(out:find("--- message ---\nReceived: ", 1, true))
  end)

  it("exits 2 with a clear error for a broken script, a missing message, a bad option, a failing handler", function()
    local r = run("return { eom = function( }")
    assert.are.equal(2, r.status)
    assert.matches(":1:", r.stderr)
    r = mt.run{ script = script("return {}"), file = "/nonexistent.eml" }
    assert.are.equal(2, r.status)
    assert.matches("cannot read /nonexistent.eml", r.stderr)
    r = run("return {}", { macros = { [""] = "x" } })
    assert.are.equal(2, r.status)
    r = run("return { envfrom = function() error('boom') end }")
    assert.are.equal(2, r.status)
    assert.matches("boom", r.stderr)
    assert.are.equal("tempfail", r.final.action)
    r = run("return { eom = function() return { action = 'accept', add_headers = {} } end }")
    assert.are.equal(2, r.status)
    assert.matches("unknown key 'add_headers'", r.stderr)
  end)
end)

describe("luamilter test with a header list", function()
  local POLICY = [[
    local milter = require "milter"
    return { eom = function(ctx)
      local h = {}
      for _, x in ipairs(ctx.headers) do
        if x[1] ~= "X-Dup" or x[2] ~= "one" then h[#h + 1] = { x[1], x[2] } end
      end
      table.insert(h, 1, { "X-Scanned", "yes" })
      h[3][2] = "Robert <bob@example.org>"
      return milter.accept{ headers = h }
    end }
  ]]

  it("reports the header diff (kept, removed, added, changed) in JSON", function()
    local r = run(POLICY)
    assert.are.equal(0, r.status, r.stderr)
    assert.are.same({
      { op = "add", name = "X-Scanned", value = "yes" },
      { op = "keep", name = "From", value = "Alice <alice@example.net>" },
      { op = "change", name = "To", value = "Robert <bob@example.org>",
        old_name = "To", old_value = "bob@example.org" },
      { op = "keep", name = "Subject", value = "plain text" },
      { op = "keep", name = "Date", value = "Thu, 01 Jan 2026 00:00:00 +0000" },
      { op = "keep", name = "Message-ID", value = "<plain@example.net>" },
      { op = "remove", name = "X-Dup", value = "one" },
      { op = "keep", name = "X-Dup", value = "two" } }, r.header_diff)
    assert.are.equal(TRACE1 .. "X-Scanned: yes\r\nFrom: Alice <alice@example.net>\r\n" ..
      "To: Robert <bob@example.org>\r\nSubject: plain text\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n" ..
      "Message-ID: <plain@example.net>\r\nX-Dup: two\r\n" .. PLAIN_BODY, msg(r))
  end)

  it("prints the diff in the text report", function()
    local bin = os.getenv("LUAMILTER_BIN") or "build/luamilter"
    local p = assert(io.popen(bin .. " test " .. script(POLICY) .. " spec/eml/plain-lf.eml"))
    local out = p:read("*a")
    p:close()
    assert.truthy(out:find("header changes (under the MTA's Received:):\n" ..
      "  + X-Scanned: yes\n    From: Alice <alice@example.net>\n" ..
      "  ~ To: bob@example.org  ->  To: Robert <bob@example.org>\n    Subject: plain text\n", 1, true), out)
    assert.truthy(out:find("  - X-Dup: one\n    X-Dup: two\n", 1, true), out)
  end)

  it("has no header_diff without a header list", function()
    local r = run([[return { eom = function() return require("milter").accept{ add_header = { { "X", "y" } } } end }]])
    assert.is_nil(r.header_diff)
  end)
end)
