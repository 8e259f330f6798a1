-- luacheck: std +busted
-- Modifications returned by eom: packets, their bytes, order and indexes.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local mc = U.mc

local SENDMAIL_C_MACROS = { { "j", "mta.example.org" }, { "v", "8.18.1" },
  { "_", "client.example.org [192.0.2.1]" } }

local HEADERS = { { "From", "<sender@example.org>" }, { "To", "<rcpt@example.org>" },
  { "Subject", "first subject" }, { "X-Foo", "foo 1" }, { "Subject", "second subject" },
  { "X-Foo", "foo 2" } }

describe("eom modifications", function()
  local d, c

  after_each(function()
    if c then c:close(); c = nil end
    if d then d:stop(); d = nil end
  end)

  -- runs one message whose eom returns `expr`; returns the eom reply
  local function eom_reply(expr, opts)
    opts = opts or {}
    d = U.start(U.script(("function H.eom(ctx) return %s end\nreturn H\n"):format(expr)))
    c = U.client(d, opts.offer)
    U.open(c, { cmacros = opts.cmacros })
    local res = U.message(c, { headers = opts.headers or HEADERS, body = opts.body,
      rcpts = opts.rcpts })
    assert(type(res.eom) == "table", "no eom reply: " .. tostring(res.eom) .. " "
      .. tostring(res.error) .. "\n" .. d:log())
    return res.eom
  end

  it("add_header sends ADDHEADER name/value, then the final reply", function()
    local r = eom_reply('milter.accept{ add_header = { { "X-Scanned", "yes" }, { "X-Two", "a b" } } }')
    assert.are.equal("a", r.cmd)
    assert.are.same({ { op = "addheader", name = "X-Scanned", value = "yes" },
      { op = "addheader", name = "X-Two", value = "a b" } }, r.mods)
  end)

  it("modifications go with continue too", function()
    local r = eom_reply('milter.continue{ add_header = { { "X-Scanned", "yes" } } }')
    assert.are.equal("c", r.cmd)
    assert.are.same({ { op = "addheader", name = "X-Scanned", value = "yes" } }, r.mods)
  end)

  it("CRLF inside a header value is sent as LF", function()
    local r = eom_reply('milter.accept{ add_header = { { "X-Folded", "first line\\r\\n\\tsecond line" } } }')
    assert.are.same({ { op = "addheader", name = "X-Folded", value = "first line\n\tsecond line" } },
      r.mods)
  end)

  it("CRLF inside insert_header and change_header values is sent as LF", function()
    local r = eom_reply([[milter.accept{
      insert_header = { { 0, "X-Ins", "a\r\n b" } },
      change_header = { { "Subject", 1, "c\r\n d" } } }]])
    assert.are.equal("a\n b", r.mods[1].value)
    assert.are.equal("c\n d", r.mods[2].value)
  end)

  describe("insert_header", function()
    it("index 0 is INSHEADER 0 behind Postfix (the very top)", function()
      local r = eom_reply('milter.accept{ insert_header = { { 0, "X-First", "top" } } }')
      assert.are.same({ { op = "insheader", index = 0, name = "X-First", value = "top" } }, r.mods)
    end)

    it("index n (middle) is INSHEADER n+1 behind Postfix, which counts its hidden Received:", function()
      local r = eom_reply('milter.accept{ insert_header = { { 2, "X-Mid", "after To" } } }')
      assert.are.same({ { op = "insheader", index = 3, name = "X-Mid", value = "after To" } }, r.mods)
    end)

    it("index 0 is INSHEADER 0 when macro v is not Postfix", function()
      local r = eom_reply('milter.accept{ insert_header = { { 0, "X-First", "top" } } }',
        { cmacros = SENDMAIL_C_MACROS })
      assert.are.same({ { op = "insheader", index = 0, name = "X-First", value = "top" } }, r.mods)
    end)

    it("index n (middle) on Sendmail: the headers after it deleted and appended again", function()
      -- Sendmail's .cf slots above the message make a middle index unknowable (§13b)
      local r = eom_reply('milter.accept{ insert_header = { { 2, "X-Mid", "after To" } } }',
        { cmacros = SENDMAIL_C_MACROS, offer = mc.OFFER.sendmail })
      local A = 0x7fffffff
      assert.are.same({
        { op = "chgheader", index = 1, name = "Subject", value = "" },
        { op = "chgheader", index = 1, name = "X-Foo", value = "" },
        { op = "chgheader", index = 2, name = "Subject", value = "" }, -- the slot stays
        { op = "chgheader", index = 2, name = "X-Foo", value = "" },
        { op = "insheader", index = A, name = "X-Mid", value = "after To" },
        { op = "insheader", index = A, name = "Subject", value = "first subject" },
        { op = "insheader", index = A, name = "X-Foo", value = "foo 1" },
        { op = "insheader", index = A, name = "Subject", value = "second subject" },
        { op = "insheader", index = A, name = "X-Foo", value = "foo 2" } }, r.mods)
    end)

    it("index past the end on Sendmail is INSHEADER past any list (appends)", function()
      local r = eom_reply('milter.accept{ insert_header = { { 99, "X-End", "e" } } }',
        { cmacros = SENDMAIL_C_MACROS, offer = mc.OFFER.sendmail })
      assert.are.same({ { op = "insheader", index = 0x7fffffff, name = "X-End", value = "e" } }, r.mods)
    end)

    it("index of the last header is n+1 behind Postfix", function()
      local r = eom_reply('milter.accept{ insert_header = { { 6, "X-Last", "bottom" } } }')
      assert.are.same({ { op = "insheader", index = 7, name = "X-Last", value = "bottom" } }, r.mods)
    end)

    it("several inserts: each index counts the headers inserted before it (Postfix)", function()
      local r = eom_reply([[milter.accept{ insert_header = {
        { 0, "X-First", "1" }, { 2, "X-Mid", "2" } } }]])
      -- after the first insert: X-First, Received, From, To -> after To is 4
      assert.are.same({ { op = "insheader", index = 0, name = "X-First", value = "1" },
        { op = "insheader", index = 4, name = "X-Mid", value = "2" } }, r.mods)
    end)

    it("several inserts on Sendmail: index 0 at the top, the last at the end", function()
      local r = eom_reply([[milter.accept{ insert_header = {
        { 0, "X-First", "1" }, { 6, "X-Last", "2" } } }]], { cmacros = SENDMAIL_C_MACROS })
      assert.are.same({ { op = "insheader", index = 0, name = "X-First", value = "1" },
        { op = "insheader", index = 0x7fffffff, name = "X-Last", value = "2" } }, r.mods)
    end)
  end)

  describe("on Sendmail (§13b: deleted headers keep their slot, ADDHEADER goes before a same name)", function()
    local DUPS = { { "From", "f" }, { "X-Dup", "1" }, { "X-Dup", "2" }, { "X-Dup", "3" } }
    local SM = { cmacros = SENDMAIL_C_MACROS, offer = mc.OFFER.sendmail, headers = DUPS }

    it("deleting {X-Dup,1} and {X-Dup,2} sends indexes 1 and 2", function()
      local r = eom_reply('milter.accept{ delete_header = { { "X-Dup", 1 }, { "X-Dup", 2 } } }', SM)
      assert.are.same({ { op = "chgheader", index = 1, name = "X-Dup", value = "" },
        { op = "chgheader", index = 2, name = "X-Dup", value = "" } }, r.mods)
    end)

    it("deleting 1 and 3 sends indexes 1 and 3", function()
      local r = eom_reply('milter.accept{ delete_header = { { "X-Dup", 1 }, { "X-Dup", 3 } } }', SM)
      assert.are.same({ { op = "chgheader", index = 1, name = "X-Dup", value = "" },
        { op = "chgheader", index = 3, name = "X-Dup", value = "" } }, r.mods)
    end)

    it("change {X-Dup,2} after an add_header of X-Dup changes the 2nd; the add is appended", function()
      local r = eom_reply([[milter.accept{ add_header = { { "X-Dup", "new" } },
        change_header = { { "X-Dup", 2, "two" } } }]], SM)
      assert.are.same({ { op = "chgheader", index = 2, name = "X-Dup", value = "two" },
        { op = "insheader", index = 0x7fffffff, name = "X-Dup", value = "new" } }, r.mods)
    end)

    it("is recognised without macro v, by its default connect macros", function()
      local r = eom_reply('milter.accept{ add_header = { { "X-Dup", "new" } } }',
        { offer = mc.OFFER.sendmail, headers = DUPS, cmacros = { { "j", "mta.example.org" },
          { "_", "client [192.0.2.1]" }, { "{daemon_name}", "MTA" }, { "{if_name}", "localhost" } } })
      assert.are.same({ { op = "insheader", index = 0x7fffffff, name = "X-Dup", value = "new" } }, r.mods)
    end)
  end)

  describe("change_header / delete_header", function()
    it("change_header targets the nth header of that name", function()
      local r = eom_reply('milter.accept{ change_header = { { "Subject", 2, "[EXT] second" } } }')
      assert.are.same({ { op = "chgheader", index = 2, name = "Subject", value = "[EXT] second" } },
        r.mods)
    end)

    it("change_header of the first one, name matched case-insensitively", function()
      local r = eom_reply('milter.accept{ change_header = { { "subject", 1, "new" } } }')
      assert.are.equal(1, #r.mods)
      assert.are.equal("chgheader", r.mods[1].op)
      assert.are.equal(1, r.mods[1].index)
      assert.are.equal("new", r.mods[1].value)
      assert.are.equal("subject", r.mods[1].name:lower())
    end)

    it("a visible Received: is counted from 1 behind Postfix (its own one is hidden)", function()
      local r = eom_reply('milter.accept{ change_header = { { "Received", 1, "from x" } } }',
        { headers = { { "Received", "from relay" }, { "Subject", "s" } } })
      assert.are.same({ { op = "chgheader", index = 1, name = "Received", value = "from x" } }, r.mods)
    end)

    it("delete_header sends CHGHEADER with an empty value", function()
      local r = eom_reply('milter.accept{ delete_header = { { "X-Foo", 2 } } }')
      assert.are.same({ { op = "chgheader", index = 2, name = "X-Foo", value = "" } }, r.mods)
    end)

    it("delete_header of the 1st then change of the 2nd same-named header", function()
      local r = eom_reply([[milter.accept{
        change_header = { { "X-Foo", 2, "changed" } },
        delete_header = { { "X-Foo", 1 } } }]])
      assert.are.same({ { op = "chgheader", index = 2, name = "X-Foo", value = "changed" },
        { op = "chgheader", index = 1, name = "X-Foo", value = "" } }, r.mods)
    end)

    it("two deletes of the same name: the 2nd index counts after the 1st delete", function()
      local r = eom_reply('milter.accept{ delete_header = { { "X-Foo", 1 }, { "X-Foo", 2 } } }')
      assert.are.same({ { op = "chgheader", index = 1, name = "X-Foo", value = "" },
        { op = "chgheader", index = 1, name = "X-Foo", value = "" } }, r.mods)
    end)
  end)

  describe("recipients and sender", function()
    it("add_rcpt plain is ADDRCPT, with ESMTP args ADDRCPT_PAR", function()
      local r = eom_reply([[milter.accept{ add_rcpt = { "<audit@example.org>",
        { "<b@example.org>", "NOTIFY=NEVER" } } }]])
      assert.are.same({ { op = "addrcpt", addr = "<audit@example.org>" },
        { op = "addrcpt_par", addr = "<b@example.org>", args = "NOTIFY=NEVER" } }, r.mods)
    end)

    it("del_rcpt is DELRCPT", function()
      local r = eom_reply('milter.accept{ del_rcpt = { "<bob@example.org>", "<eve@example.org>" } }',
        { rcpts = { "<bob@example.org>", "<eve@example.org>", "<al@example.org>" } })
      assert.are.same({ { op = "delrcpt", addr = "<bob@example.org>" },
        { op = "delrcpt", addr = "<eve@example.org>" } }, r.mods)
    end)

    it("change_from with an address only", function()
      local r = eom_reply('milter.accept{ change_from = "<bounce@example.org>" }')
      assert.are.same({ { op = "chgfrom", addr = "<bounce@example.org>" } }, r.mods)
      assert.are.equal(1, #r.frames - 1)
      assert.are.equal("<bounce@example.org>\0", r.frames[1].data)
    end)

    it("change_from with ESMTP args", function()
      local r = eom_reply('milter.accept{ change_from = { "<a@example.org>", "SIZE=42" } }')
      assert.are.same({ { op = "chgfrom", addr = "<a@example.org>", args = "SIZE=42" } }, r.mods)
    end)
  end)

  describe("replace_body and quarantine", function()
    it("replace_body > 64 KiB is cut in <= 65535-byte REPLBODY chunks", function()
      local r = eom_reply([[milter.accept{ replace_body = (function()
        local t = {}
        for i = 1, 20000 do t[i] = string.format("%08d\r\n", i) end
        return table.concat(t)
      end)() }]])
      local want = {}
      for i = 1, 20000 do want[i] = string.format("%08d\r\n", i) end
      want = table.concat(want)
      assert.are.equal(200000, #want)
      local parts = {}
      for _, m in ipairs(r.mods) do
        assert.are.equal("replbody", m.op)
        assert.is_true(#m.data <= 65535, "chunk of " .. #m.data .. " bytes")
        assert.is_true(#m.data > 0, "empty chunk")
        parts[#parts + 1] = m.data
      end
      assert.is_true(#parts >= 4)
      assert.is_true(table.concat(parts) == want, "concatenated chunks differ from replace_body")
      assert.are.equal("a", r.cmd)
    end)

    it("replace_body with a small body is one REPLBODY", function()
      local r = eom_reply('milter.accept{ replace_body = "new body\\r\\n" }')
      assert.are.same({ { op = "replbody", data = "new body\r\n" } }, r.mods)
    end)

    it("quarantine is QUARANTINE with the reason", function()
      local r = eom_reply('milter.accept{ quarantine = "suspicious attachment" }')
      assert.are.same({ { op = "quarantine", reason = "suspicious attachment" } }, r.mods)
      assert.are.equal("a", r.cmd)
    end)
  end)

  it("sends all modifications in the order of the API table, then one final reply", function()
    local r = eom_reply([[milter.accept{
      quarantine = "held",
      replace_body = "body\r\n",
      change_from = "<new@example.org>",
      del_rcpt = { "<rcpt@example.org>" },
      add_rcpt = { "<x@example.org>", { "<y@example.org>", "NOTIFY=NEVER" } },
      delete_header = { { "X-Foo", 1 } },
      change_header = { { "Subject", 1, "changed" } },
      insert_header = { { 0, "X-Top", "t" } },
      add_header = { { "X-Add", "a" } },
    }]])
    assert.are.same({ "addheader", "insheader", "chgheader", "chgheader", "addrcpt",
      "addrcpt_par", "delrcpt", "chgfrom", "replbody", "quarantine" }, U.ops(r.mods))
    assert.are.equal("", r.mods[4].value) -- the delete
    assert.are.equal("changed", r.mods[3].value)
    assert.are.equal("a", r.cmd)
    assert.are.equal(#r.mods + 1, #r.frames)
    assert.are.equal("a", r.frames[#r.frames].cmd)
  end)

  it("indexes stay right with thousands of headers", function()
    local many = {}
    for i = 1, 3000 do many[i] = { i % 2 == 0 and "X-Even" or "X-Odd", "v" .. i } end
    local r = eom_reply([[(function()
      assert(#ctx.headers == 3000, "got " .. #ctx.headers .. " headers")
      return milter.accept{
        insert_header = { { 2999, "X-Ins", "i" } },
        change_header = { { "X-Even", 1500, "last even" } },
        delete_header = { { "x-odd", 1 } } }
    end)()]], { headers = many })
    assert.are.same({ { op = "insheader", index = 3000, name = "X-Ins", value = "i" },
      { op = "chgheader", index = 1500, name = "X-Even", value = "last even" },
      { op = "chgheader", index = 1, name = "x-odd", value = "" } }, r.mods)
  end)

  it("never sends a modification the MTA did not offer", function()
    local r = eom_reply([[milter.accept{
      add_header = { { "X-Add", "a" } },
      change_from = "<new@example.org>",
      add_rcpt = { { "<y@example.org>", "NOTIFY=NEVER" } } }]],
      { offer = { 6, mc.SMFIF.ADDHDRS + mc.SMFIF.ADDRCPT, 0x1fffff } })
    for _, m in ipairs(r.mods) do
      assert.are_not.equal("chgfrom", m.op)
      assert.are_not.equal("addrcpt_par", m.op)
    end
  end)
end)
