-- For every mod-* capture a script makes the same changes; `luamilter test`
-- on the message the SMTP client sent must print exactly the bytes Postfix
-- delivered (only the date in Postfix's trace header differs).
local mt = require "milter.test"

local FIX = "../shared/fixtures/postfix/"
local DATE = "%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d %+0000 %(UTC%)"
local fx = dofile("../shared/fixtures/tools/fixture.lua")

-- input message, envelope, delivered bytes and queue id of a capture
local function scenario(name)
  local sc = { rcpts = {}, lines = {}, delivered = {} }
  local section, in_data, pending
  for line in io.lines(FIX .. name .. ".milter") do
    if line:find("^# ==") then
      section = line:match("^# == (%a+)")
    elseif section == "SMTP" then
      local sent = line:match("^#|  %-> (.*)$")
      if pending and line:find("^#| <") then
        if line:find("^#| <.. [45]") then table.remove(sc.rcpts) end
        pending = false
      end
      if sent and in_data then
        if sent == "." then in_data = false
        else sc.lines[#sc.lines + 1] = (sent:gsub("^%.", "")) end
      elseif sent then
        if sent:find("^MAIL FROM:") then sc.from = sent:match("^MAIL FROM:(%S+)") end
        if sent:find("^RCPT TO:") then
          sc.rcpts[#sc.rcpts + 1] = sent:match("^RCPT TO:(%S+)")
          pending = true
        end
        if sent == "DATA" then in_data = true end
      end
    elseif section == "delivered" then
      local l = line:match("^#| ?(.*)$")
      if l and not l:find("^envelope: ") then sc.delivered[#sc.delivered + 1] = fx.unescape(l) end
    end
  end
  sc.input = table.concat(sc.lines, "\n") .. "\n"
  sc.expected = table.concat(sc.delivered, "\r\n")
  sc.qid = sc.expected:match("with ESMTP id (%w+)")
  return sc
end

local function replaced_body(name)
  local parts = {}
  for _, p in ipairs(fx.load(FIX .. name .. ".milter")) do
    if p.dir == "<" and p.cmd == "b" then parts[#parts + 1] = p.data end
  end
  return table.concat(parts)
end

local function q(s) return string.format("%q", s) end

local cases = {
  ["mod-addheader"] = [[add_header = { {"X-Milter-Added", "added by filter"},
    {"X-Folded-LF", "first line\n\tsecond line (LF fold)"},
    {"X-Folded-CRLF", "first line\r\n\tsecond line (CRLF fold)"},
    {"X-Leading-Space", " value that starts with a space"} }]],
  ["mod-all"] = [[add_header = { {"X-Milter-Added", "added by filter"} },
    insert_header = { {0, "X-Ins-Top", "inserted at index 0"} },
    change_header = { {"Subject", 1, "changed subject"} },
    delete_header = { {"X-Delete-Me", 1} },
    change_from = "<new-sender@example.test>", add_rcpt = { "<added@example.test>" },
    del_rcpt = { "<rcpt2@example.test>" }, replace_body = "Body replaced by mod-all.\r\n"]],
  ["mod-chgfrom"] = [[change_from = { "<new-sender@example.test>", "RET=HDRS ENVID=abc123" }]],
  ["mod-chgfrom-badarg"] = [[change_from = { "<other-sender@example.test>", "SIZE=1000 BODY=8BITMIME" }]],
  ["mod-chgheader"] = [[change_header = { {"Subject", 1, "changed subject"}, {"X-Dup", 2, "second X-Dup changed"},
    {"X-Dup", 1, "index 0 on X-Dup"}, {"X-Not-There", 1, "created by CHGHEADER"},
    {"x-case", 1, "matched case-insensitively"} }]],
  ["mod-delheader"] = [[delete_header = { {"X-Delete-Me", 1}, {"X-Dup", 2}, {"X-Never-Existed", 1} }]],
  ["mod-progress"] = [[add_header = { {"X-After-Progress", "yes"} }]],
  -- Postfix was told 0, 1, 3, 999; a script's index 0 means the very top and
  -- n "after the n-th header it saw", so 1 becomes a second insert at the
  -- top (above the first) and 3 (right below Postfix's own Received:) has
  -- no script spelling: that line is left out of the expected message.
  ["mod-insheader"] = [[insert_header = { {0, "X-Ins-Idx1", "inserted at index 1"},
    {0, "X-Ins-Idx0", "inserted at index 0"}, {999, "X-Ins-Idx999", "inserted at index 999"} }]],
  ["mod-rcpt"] = [[add_rcpt = { "<added@example.test>",
    { "<added-par@example.test>", "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig@example.test" } },
    del_rcpt = { "<rcpt2@example.test>", "<not-a-recipient@example.test>" }]],
  ["mod-replbody-crlf"] = "replace_body = " .. q(replaced_body("mod-replbody-crlf")),
  ["mod-replbody-lf"] = "replace_body = " .. q(replaced_body("mod-replbody-lf")),
  ["mod-replbody-noeol"] = "replace_body = " .. q(replaced_body("mod-replbody-noeol")),
  ["mod-replbody-big"] = "replace_body = " .. q(replaced_body("mod-replbody-big")),
}

describe("luamilter test renders what Postfix delivered", function()
  local names = {}
  for name in pairs(cases) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    it(name, function()
      local sc = scenario(name)
      assert.is_string(sc.qid, "capture without a delivery")
      local path = os.tmpname()
      local f = assert(io.open(path, "w"))
      f:write("local milter = require 'milter'\nreturn { eom = function() return milter.accept{ " ..
        cases[name] .. " } end }\n")
      f:close()
      local r = mt.run{ script = path, message = sc.input, from = sc.from, rcpt = sc.rcpts,
        client = "localhost[127.0.0.1]", helo = "client.example.test",
        macros = { j = "mta.example.test", i = sc.qid } }
      os.remove(path)
      assert.are.equal(0, r.status, r.stderr)
      local want = sc.expected:gsub(DATE, "DATE")
      if name == "mod-insheader" then
        want = want:gsub("X%-Ins%-Idx3: inserted at index 3\r\n", "")
      end
      if name == "mod-addheader" then
        -- luamilter sends CRLF inside a header value as LF on purpose:
        -- Postfix would store the CR and deliver "\r\r\n".
        want = want:gsub("\r\r\n", "\r\n")
      end
      local got = r.message:gsub(DATE, "DATE")
      local head, omitted, tail = want:match("^(.-\r\n)%.%.%. %((%d+) lines omitted%)\r\n(.*)$")
      if head then -- the capture elided the middle of a long message
        assert.are.equal(head, got:sub(1, #head))
        assert.are.equal(tail, got:sub(-#tail))
        local middle = got:sub(#head + 1, -#tail - 1)
        local _, lines = middle:gsub("\r\n", "")
        assert.are.equal(tonumber(omitted), lines)
      else
        assert.are.equal(want, got)
      end
    end)
  end

  it("quarantine: the message is held with the reason", function()
    local sc = scenario("mod-quarantine")
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write("local milter = require 'milter'\nreturn { eom = function() return milter.accept{ quarantine = " ..
      "'held for inspection by test filter' } end }\n")
    f:close()
    local r = mt.run{ script = path, message = sc.input, from = sc.from, rcpt = sc.rcpts }
    os.remove(path)
    assert.are.equal(0, r.status, r.stderr)
    assert.are.equal("held for inspection by test filter", r.quarantine)
  end)
end)
