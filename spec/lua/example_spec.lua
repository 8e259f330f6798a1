-- example.lua's handlers called directly with a stand-in ctx: a policy is
-- plain Lua returning plain tables, so it can be unit-tested like this.
local function fake_ctx(headers)
  local ctx = { conn = {}, msg = {}, client = { address = "203.0.113.9" }, logged = {} }
  function ctx.header(_, name)
    for _, h in ipairs(headers or {}) do
      if h[1]:lower() == name:lower() then return h[2] end
    end
  end
  function ctx:log(...) self.logged[#self.logged + 1] = table.concat({ ... }, " ") end
  return ctx
end

describe("example.lua", function()
  local H
  before_each(function() H = dofile("example.lua") end)

  it("refuses a listed client network with a two-line 554", function()
    local v = H.connect(fake_ctx(), "bad.example", { family = "inet", address = "192.0.2.7", port = 1 })
    assert.are.equal("reject", v.action)
    assert.are.equal(554, v.code)
    assert.are.equal(2, #v.reason)
  end)

  it("lets other clients and unix sockets through", function()
    assert.is_nil(H.connect(fake_ctx(), "ok", { family = "inet", address = "203.0.113.9", port = 1 }))
    assert.is_nil(H.connect(fake_ctx(), "local", { family = "unix", address = "/s", port = 0 }))
  end)

  it("refuses a listed sender, whatever its case", function()
    local v = H.envfrom(fake_ctx(), "<Spammer@Example.NET>", {})
    assert.are.equal("reject", v.action)
    assert.matches("Spammer@Example.NET", v.reason[1], 1, true)
  end)

  it("tags the subject of external mail and adds X-Policy", function()
    local ctx = fake_ctx({ { "Subject", "hello" } })
    assert.is_nil(H.envfrom(ctx, "<someone@elsewhere.test>", {}))
    local v = H.eom(ctx)
    assert.are.equal("accept", v.action)
    assert.are.same({ { "Subject", 1, "[EXTERNAL] hello" } }, v.change_header)
    assert.are.equal("X-Policy", v.add_header[1][1])
    assert.is_nil(v.add_rcpt)
  end)

  it("leaves internal mail's subject alone", function()
    local ctx = fake_ctx({ { "Subject", "hello" } })
    H.envfrom(ctx, "<boss@example.org>", {})
    assert.is_nil(H.eom(ctx).change_header)
  end)

  it("does not tag a subject twice", function()
    local ctx = fake_ctx({ { "Subject", "[EXTERNAL] hello" } })
    H.envfrom(ctx, "<a@elsewhere.test>", {})
    assert.is_nil(H.eom(ctx).change_header)
  end)

  it("copies mail for the audited domain to the auditor", function()
    local ctx = fake_ctx({})
    H.envfrom(ctx, "<boss@example.org>", {})
    H.envrcpt(ctx, "<cfo@finance.example.org>", {})
    assert.are.same({ "<audit@example.org>" }, H.eom(ctx).add_rcpt)
  end)
end)

-- The same policy through the real session code, as the README shows.
describe("example.lua through milter.test", function()
  local mt = require "milter.test"

  it("tags external mail, copies finance mail to the auditor", function()
    local r = mt.run{
      script = "example.lua",
      message = mt.message{
        headers = { { "From", "Ann <ann@partner.example>" }, { "To", "cfo@finance.example.org" },
                    { "Subject", "Q3 numbers" } },
        body = "see attached\r\n",
      },
    }
    assert.are.equal(0, r.status, r.stderr)
    assert.are.equal("accept", r.final.action)
    assert.truthy(r.message:find("\r\nSubject: [EXTERNAL] Q3 numbers\r\n", 1, true))
    assert.truthy(r.message:find("\r\nX-Policy: luamilter example; client=127.0.0.1\r\n", 1, true))
    assert.are.same({ "<cfo@finance.example.org>", "<audit@example.org>" }, r.envelope.rcpts)
  end)

  it("refuses a blocked sender at MAIL FROM with the multi-line reply", function()
    local r = mt.run{
      script = "example.lua", from = "spammer@example.net", rcpt = { "bob@example.org" },
      message = mt.message{ headers = { { "Subject", "hi" } }, body = "x\r\n" },
    }
    assert.are.equal(1, r.status)
    assert.are.equal("550-5.7.1 Sender <spammer@example.net> is blocked by local policy.\r\n" ..
      "550 5.7.1 Contact postmaster@example.org if this is a mistake.", r.final.reply)
  end)

  it("refuses a listed client network at connect", function()
    local r = mt.run{
      script = "example.lua", client = "192.0.2.10", rcpt = { "bob@example.org" },
      message = mt.message{ headers = { { "Subject", "hi" } } },
    }
    assert.are.equal(1, r.status)
    assert.are.equal("connect", r.stages[#r.stages].event)
    assert.matches("^554%-5%.7%.1 Your network", r.final.reply)
  end)
end)
