-- luacheck: std +busted
-- milter.http.request against the tests' own HTTP(S) server on loopback
-- (spec/support/http_server.py; HTTPS with a throwaway CA made by the
-- openssl CLI), and the README's rspamd recipe against Debian's rspamd
-- (spec/support/servers.lua, a private offline config). The handler
-- waits; the worker does not.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local HS = require "spec.support.http_servers"
local S = require "spec.support.servers"
local cjson = require "cjson"
local stdlib = require "posix.stdlib"
local now = require "spec.support.clock" -- monotonic, for waits

local read = U.read

local function show(r)
  if type(r) ~= "table" then return tostring(r) end
  return r.cmd .. (r.text and (" " .. r.text) or "")
end

-- the header values of name in an echoed request, in order
local function got(echo, name)
  local out = {}
  for _, h in ipairs(echo.headers) do
    if h[1]:lower() == name:lower() then out[#out + 1] = h[2] end
  end
  return out
end

describe("milter.http.request", function()
  local d, srv, tls
  setup(function()
    srv = HS.start()
    tls = HS.start(true)
  end)
  teardown(function()
    if srv then srv:stop() end
    if tls then tls:stop() end
  end)
  after_each(function()
    if d then d:stop(); d = nil end
  end)

  local function start(body, args)
    d = U.start(U.script(("local BASE, TLS, CA = %q, %q, %q\n"):format(srv.base, tls.base,
      tls.cafile) .. body), { args = args })
    return d
  end

  -- runs a default session; returns it after checking the log has no error
  local function session(opts)
    local c = U.client(d)
    local res = c:session(opts or {})
    c:close()
    return res
  end

  it("GET and POST: method, headers and body arrive; status, headers and body come back", function()
    start [[
function H.envfrom(ctx)
  local r = milter.http.request{ url = BASE .. "/echo?q=1" }
  seen(ctx, "get", { r.status, r.headers["content-type"], r.body })
  r = milter.http.request{ url = BASE .. "/echo", headers = { ["X-Test"] = "one",
    ["Content-Type"] = "message/rfc822", Rcpt = { "<a@x>", "<b@x>" }, ["X-Empty"] = "",
    ["X-Num"] = 42 }, body = "raw\r\nbytes\0here" }
  seen(ctx, "post", r.body)
  r = milter.http.request{ url = BASE .. "/echo", method = "put", body = "" }
  seen(ctx, "put", r.body)
  r = milter.http.request{ url = BASE .. "/echo", method = "DELETE" }
  seen(ctx, "delete", r.body)
  r = milter.http.request{ url = BASE .. "/big/10", method = "HEAD" }
  seen(ctx, "head", { r.status, r.headers["content-length"], r.body })
end
return H
]]
    local res = session()
    assert.are.equal("c", res.mail.cmd, show(res.mail))
    local g = U.seen(d, "get")[1]
    assert.are.equal(200, g[1])
    assert.are.equal("application/json", g[2])
    local e = cjson.decode(g[3])
    assert.are.equal("GET", e.method)
    assert.are.equal("/echo?q=1", e.path)
    assert.are.equal("", e.body)
    assert.are.same({ "luamilter" }, got(e, "User-Agent"))
    e = cjson.decode(U.seen(d, "post")[1])
    assert.are.equal("POST", e.method) -- a body makes the default POST
    assert.are.equal("raw\r\nbytes\0here", e.body)
    assert.are.same({ "one" }, got(e, "X-Test"))
    assert.are.same({ "message/rfc822" }, got(e, "Content-Type"))
    assert.are.same({ "<a@x>", "<b@x>" }, got(e, "Rcpt"))
    assert.are.same({ "" }, got(e, "X-Empty"))
    assert.are.same({ "42" }, got(e, "X-Num"))
    assert.are.same({}, got(e, "Expect"))
    e = cjson.decode(U.seen(d, "put")[1])
    assert.are.equal("PUT", e.method)
    assert.are.same({ "application/octet-stream" }, got(e, "Content-Type"))
    assert.are.same({ "0" }, got(e, "Content-Length"))
    assert.are.equal("DELETE", cjson.decode(U.seen(d, "delete")[1]).method)
    assert.are.same({ { 200, "10", "" } }, U.seen(d, "head"))
  end)

  it("404 and 500 are results, not errors; header names are lower-cased, repeats joined", function()
    start [[
function H.envfrom(ctx)
  for _, n in ipairs{ 200, 404, 500 } do
    local r, err = milter.http.request{ url = BASE .. "/status/" .. n }
    seen(ctx, "status", { r and r.status, r and r.body, err })
  end
  local r = milter.http.request{ url = BASE .. "/headers" }
  seen(ctx, "multi", r.headers["x-multi"])
  seen(ctx, "mixed", r.headers["x-mixed-case"])
  seen(ctx, "upper", r.headers["X-Multi"] == nil)
end
return H
]]
    session()
    assert.are.same({ { 200, "status 200" }, { 404, "status 404" }, { 500, "status 500" } },
      U.seen(d, "status"))
    assert.are.same({ "a, b" }, U.seen(d, "multi"))
    assert.are.same({ "padded" }, U.seen(d, "mixed"))
    assert.are.same({ true }, U.seen(d, "upper"))
  end)

  it("HTTPS: cafile works, the system store refuses the throwaway CA, verify = false skips the check", function()
    start [[
function H.envfrom(ctx)
  local r, err = milter.http.request{ url = TLS .. "/echo", cafile = CA, body = "secret" }
  seen(ctx, "ca", { r and r.status, r and r.body:match('"body": "(%w+)"'), err })
  seen(ctx, "system", { milter.http.request{ url = TLS .. "/status/200" } })
  r, err = milter.http.request{ url = TLS .. "/status/201", verify = false }
  seen(ctx, "noverify", { r and r.status, err })
  seen(ctx, "badca", { milter.http.request{ url = TLS .. "/", cafile = "/nonexistent/ca.pem" } })
end
return H
]]
    session()
    assert.are.same({ { 200, "secret" } }, U.seen(d, "ca"))
    assert.are.same({ { nil, "ssl certificate problem" } }, U.seen(d, "system"))
    assert.are.same({ { 201 } }, U.seen(d, "noverify"))
    assert.are.same({ { nil, "ssl ca file problem" } }, U.seen(d, "badca"))
  end)

  it("nil, err: connection refused; a silent server times out, the fail-open branch runs, the worker stays", function()
    start [[
function H.envfrom(ctx)
  seen(ctx, "refused", { milter.http.request{ url = "http://127.0.0.1:1/" } })
  local r, err = milter.http.request{ url = BASE .. "/never", timeout = 0.5 }
  seen(ctx, "never", { r, err })
  if not r then return nil end -- fail open
  return milter.reject{}
end
return H
]]
    local t0 = now()
    local res = session()
    assert.are.equal("c", res.mail.cmd, show(res.mail))
    assert.is_true(now() - t0 < 4)
    assert.are.same({ { nil, "connection refused" } }, U.seen(d, "refused"))
    assert.are.same({ { nil, "timeout" } }, U.seen(d, "never"))
    assert.is_true(d:alive())
    assert.are.equal("c", U.normal_session(d).eom.cmd)
  end)

  it("the handler's --script-timeout caps the request's timeout", function()
    start([[
function H.envfrom(ctx)
  local r, err = milter.http.request{ url = BASE .. "/never", timeout = 30 }
  seen(ctx, "never", { r, err })
  return milter.reject{ reason = "after " .. tostring(err) }
end
return H
]], { "--script-timeout", "1" })
    local t0 = now()
    local res = session()
    assert.are.equal("550 5.7.1 after timeout", res.mail and res.mail.text, show(res.mail))
    assert.is_true(now() - t0 < 5)
  end)

  it("a response body above the cap is nil, 'response too large' (16 MiB by default, max_body)", function()
    start [[
function H.envfrom(ctx)
  seen(ctx, "default", { milter.http.request{ url = BASE .. "/big/" .. (16 * 1024 * 1024 + 1) } })
  local r = milter.http.request{ url = BASE .. "/big/1000", max_body = 1000 }
  seen(ctx, "at", #r.body)
  seen(ctx, "known", { milter.http.request{ url = BASE .. "/big/1001", max_body = 1000 } })
  seen(ctx, "stream", { milter.http.request{ url = BASE .. "/stream/200000", max_body = 1000 } })
end
return H
]]
    session()
    assert.are.same({ { nil, "response too large" } }, U.seen(d, "default"))
    assert.are.same({ 1000 }, U.seen(d, "at"))
    assert.are.same({ { nil, "response too large" } }, U.seen(d, "known"))
    assert.are.same({ { nil, "response too large" } }, U.seen(d, "stream"))
  end)

  it("redirects are followed only when asked; a proxy only when named", function()
    start [[
function H.envfrom(ctx)
  local r = milter.http.request{ url = BASE .. "/redirect" }
  seen(ctx, "plain", { r.status, r.headers.location })
  r = milter.http.request{ url = BASE .. "/redirect", follow = true }
  seen(ctx, "follow", { r.status, r.body:match('"path": "([^"]+)"') })
  r = milter.http.request{ url = "http://proxied.example.test/echo", proxy = BASE }
  seen(ctx, "proxy", r.body:match('"path": "([^"]+)"'))
end
return H
]]
    session()
    assert.are.same({ { 302, "/echo" } }, U.seen(d, "plain"))
    assert.are.same({ { 200, "/echo" } }, U.seen(d, "follow"))
    assert.are.same({ "http://proxied.example.test/echo" }, U.seen(d, "proxy"))
  end)

  it("misuse raises: no url, bad url, non-string body, unknown key, bad headers; so does the top level", function()
    start [[
local function try(tag, opts)
  local ok, err = pcall(milter.http.request, opts)
  seen(H.ctx, tag, { ok, (tostring(err):gsub("^.-milter%.http%.request", "milter.http.request")) })
end
function H.envfrom(ctx)
  H.ctx = ctx
  try("nourl", {})
  try("notable", nil)
  try("scheme", { url = "ftp://127.0.0.1/x" })
  try("badurl", { url = "not a url" })
  try("body", { url = BASE, body = 42 })
  try("key", { url = BASE, bdy = "x" })
  try("hdr", { url = BASE, headers = { ["Bad Name"] = "x" } })
  try("crlf", { url = BASE, headers = { X = "a\r\nInjected: yes" } })
  try("method", { url = BASE, method = "GE T" })
  try("timeout", { url = BASE, timeout = "5" })
  try("head", { url = BASE, method = "HEAD", body = "x" })
end
return H
]]
    session()
    local function err_of(tag)
      local v = U.seen(d, tag)[1]
      assert.is_false(v[1], tag .. " did not raise")
      return v[2]
    end
    assert.are.equal("milter.http.request: url is required", err_of("nourl"))
    assert.is_truthy(err_of("notable"):find("table expected", 1, true))
    assert.is_truthy(err_of("scheme"):find("url must be http:// or https://", 1, true))
    assert.is_truthy(err_of("badurl"):find("bad url", 1, true))
    assert.are.equal("milter.http.request: body must be a string", err_of("body"))
    assert.are.equal("milter.http.request: unknown option bdy", err_of("key"))
    assert.is_truthy(err_of("hdr"):find("bad header name", 1, true))
    assert.is_truthy(err_of("crlf"):find("may not contain CR", 1, true))
    assert.is_truthy(err_of("method"):find("bad method", 1, true))
    assert.is_truthy(err_of("timeout"):find("timeout", 1, true))
    assert.is_truthy(err_of("head"):find("HEAD request has no body", 1, true))
    d:stop()
    d = nil
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write(('local milter = require "milter"\nmilter.http.request{ url = %q }\nreturn {}\n')
      :format(srv.base))
    f:close()
    local r = U.D.run({ "check", path })
    os.remove(path)
    assert.are.equal(1, r.status)
    assert.is_truthy(r.stderr:find("only inside a handler", 1, true), r.stderr)
    assert.is_truthy(r.stderr:find(":2:", 1, true), r.stderr)
  end)

  it("a waiting handler does not block the worker: B's whole session completes while A waits", function()
    start [[
function H.envfrom(ctx, sender)
  if sender == "<a@example.org>" then
    local r, err = milter.http.request{ url = BASE .. "/hold/ka" }
    seen(ctx, "a", { r and r.body, err })
    return milter.reject{ reason = "held: " .. tostring(r and r.body) }
  end
end
function H.eom(ctx)
  local r = milter.http.request{ url = BASE .. "/status/200" }
  return milter.accept{ add_header = { { "X-B", r.body } } }
end
return H
]]
    local a = U.client(d)
    U.open(a)
    assert(a:send("M", "<a@example.org>\0"))
    -- A's handler now waits on the server, which answers when told
    local b = U.client(d)
    local res = b:session { mail = "<b@example.org>" }
    b:close()
    assert.are.equal("a", res.eom and res.eom.cmd, tostring(res.error))
    assert.are.equal("status 200", res.eom.mods[1].value)
    assert.are.same({}, U.seen(d, "a"), "A resumed before its answer")
    assert.are.same({ 200, "ok" }, { srv:get("/release/ka") })
    local r = assert(a:read_reply(5))
    assert.are.equal("y", r.cmd)
    assert.are.equal("550 5.7.1 held: released ka", r.text)
    a:close()
  end)

  it("the MTA's ABORT mid-wait abandons the request: abort runs, the handler is never resumed", function()
    start [[
function H.eom(ctx)
  if ctx.sender == "<n@example.org>" then
    milter.http.request{ url = BASE .. "/status/200" }
    return
  end
  seen(ctx, "waiting", true)
  milter.http.request{ url = BASE .. "/hold/kb" }
  seen(ctx, "resumed", true)
end
function H.abort(ctx) seen(ctx, "abort", true) end
function H.close(ctx) seen(ctx, "close", true) end
return H
]]
    U.abandoned(d, "abort", {
      release = function() srv:get("/release/kb") end,
      mail = "<n@example.org>",
      served = function(r) assert.are.equal("c", r.eom and r.eom.cmd, tostring(r.error)) end,
    })
    assert.is_true(d:alive())
  end)

  it("the MTA hanging up mid-wait: close runs, the handler is never resumed", function()
    start [[
function H.envrcpt(ctx, rcpt)
  if rcpt ~= "<held@example.org>" then return end
  seen(ctx, "waiting", true)
  milter.http.request{ url = BASE .. "/hold/kc" }
  seen(ctx, "resumed", true)
end
function H.close(ctx)
  seen(ctx, "close", (milter.http.request{ url = BASE .. "/status/204" }).status)
end
return H
]]
    U.abandoned(d, "hang up", {
      handled = function(close) assert.are.same({ 204 }, close) end,
      release = function() srv:get("/release/kc") end,
      served = function(res) assert.is_true(res.eom ~= nil) end,
    })
  end)

  it("works in luamilter test too", function()
    local dir = assert(stdlib.mkdtemp("/tmp/luamilter-httpt-XXXXXX"))
    local script = dir .. "/p.lua"
    U.D.write_file(script, ([[
local milter = require "milter"
return { eom = function()
  local r = assert(milter.http.request{ url = %q, body = "x" })
  local n, err = milter.http.request{ url = %q, timeout = 0.2 }
  return milter.accept{ add_header = { { "X-Status", r.status .. " " .. tostring(n) .. " " .. err } } }
end }
]]):format(srv.base .. "/status/202", srv.base .. "/never"))
    local r = U.D.run({ "test", script, "spec/eml/plain-lf.eml" })
    os.remove(script)
    U.D.rmtree(dir)
    assert.are.equal(0, r.status, r.stderr)
    assert.is_truthy(r.stdout:find("X-Status: 202 nil timeout", 1, true), r.stdout)
  end)
end)

describe("cookbook: rspamd /checkv2 at end of message, against Debian's rspamd", function()
  local SRC = "spec/cookbook/rspamd.lua"
  local d, rspamd, srv
  setup(function()
    rspamd = S.rspamd() -- ~1 s
    srv = HS.start()     -- what rspamd cannot be made to do: a 500, a reply not rspamd's
  end)
  teardown(function()
    if rspamd then rspamd:stop() end
    if srv then srv:stop() end
  end)
  after_each(function()
    if d then d:stop(); d = nil end
  end)

  it("is the README's text", function()
    local readme = read("README.md")
    assert.is_true(readme:find("```lua\n" .. read(SRC) .. "```", 1, true) ~= nil,
      SRC .. " differs from the README's recipe")
  end)

  -- one message from 192.0.2.9 (HELO client.example.org) to bob and carol
  local function run(qid, headers, body, mmacros)
    local c = U.client(d)
    U.open(c, { addr = "192.0.2.9" })
    local res = U.message(c, { mail = "<alice@example.org>", qid = qid, mmacros = mmacros,
      rcpts = { "<bob@example.org>", "<carol@example.org>" }, headers = headers, body = body })
    c:quit()
    c:close()
    assert.are.equal("a", res.eom and res.eom.cmd, tostring(res.error))
    local out = {}
    for _, m in ipairs(res.eom.mods) do
      if m.op == "addheader" then out[m.name] = m.value end
    end
    return out
  end

  -- "A(1.00),B(0.00)" or the folded header: {A = "1.00", B = "0.00"}
  local function syms(list)
    local out = {}
    for name, score in list:gmatch("([%w_]+)%((%-?[%d.]+)%)") do out[name] = score end
    return out
  end

  -- the headers say what rspamd's own log says it decided for that task
  local function agree(added, task)
    assert.is_truthy(task, "rspamd logged no such task")
    assert.are.equal((task.scores:gsub("/", " / ")), added["X-Spam-Score"])
    assert.are.equal(task.action, added["X-Spam-Action"])
    assert.are.same(syms(task.symbols), syms(added["X-Spam-Symbols"]))
    assert.are.equal("0", task.dns) -- offline
  end

  it("a message with no Date, Message-ID or To: rspamd's symbols, score and action come back", function()
    stdlib.setenv("RSPAMD_URL", rspamd.url)
    d = U.start(read(SRC))
    local added = run("4RSPAMD01", { { "From", "Alice <alice@example.org>" }, { "Subject", "hi" } },
      "Hello.\r\n")
    local task = rspamd:task("4RSPAMD01")
    agree(added, task)
    -- the envelope arrived in rspamd's request headers
    assert.are.same({ "192.0.2.9", "alice@example.org", "bob@example.org,carol@example.org",
      "client.example.org" }, { task.ip, task.from, task.rcpts, task.helo })
    local s = syms(added["X-Spam-Symbols"])
    assert.are.same({ "1.00", "2.50", "2.00" }, { s.MISSING_DATE, s.MISSING_MID, s.MISSING_TO })
    assert.is_truthy(s.FROM_EQ_ENVFROM, added["X-Spam-Symbols"]) -- the envelope sender matched
    -- the README's example: Debian's scores, and its thresholds (greylist 4, add header 6, reject 15)
    assert.are.same({ "5.50 / 15.00", "greylist" }, { added["X-Spam-Score"], added["X-Spam-Action"] })
  end)

  it("GTUBE: rspamd's reject", function()
    stdlib.setenv("RSPAMD_URL", rspamd.url)
    d = U.start(read(SRC))
    local added = run("4RSPAMD02", { { "From", "Alice <alice@example.org>" }, { "Subject", "test" } },
      "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n")
    agree(added, rspamd:task("4RSPAMD02"))
    assert.are.same({ ["X-Spam-Score"] = "15.00 / 15.00", ["X-Spam-Action"] = "reject",
      ["X-Spam-Symbols"] = "GTUBE(0.00)" }, added)
  end)

  it("a complete message: no action, nothing missing; the SASL login arrives as User", function()
    stdlib.setenv("RSPAMD_URL", rspamd.url)
    d = U.start(read(SRC))
    local added = run("4RSPAMD03", {
      { "From", "Alice <alice@example.org>" },
      { "To", "Bob <bob@example.org>, Carol <carol@example.org>" },
      { "Subject", "lunch" },
      { "Date", os.date("!%a, %d %b %Y %H:%M:%S +0000") },
      { "Message-ID", "<lunch." .. os.time() .. "@example.org>" },
      { "MIME-Version", "1.0" },
      { "Content-Type", "text/plain; charset=us-ascii" },
    }, "See you at noon.\r\n", { { "{auth_authen}", "alice" } })
    local task = rspamd:task("4RSPAMD03")
    agree(added, task)
    assert.are.equal("alice", task.user)
    assert.are.equal("no action", added["X-Spam-Action"])
    local s = syms(added["X-Spam-Symbols"])
    assert.is_nil(s.MISSING_DATE or s.MISSING_MID or s.MISSING_TO, added["X-Spam-Symbols"])
    assert.is_truthy(s.TO_MATCH_ENVRCPT_ALL and s.RCPT_COUNT_TWO, added["X-Spam-Symbols"])
  end)

  it("fails open: rspamd down, too slow, a 500 or a reply not rspamd's delivers unscored", function()
    for _, case in ipairs {
      { "http://127.0.0.1:1/checkv2", "connection refused" },
      { srv.base .. "/never", "timeout", { "--script-timeout", "1" } },
      { srv.base .. "/status/500", "status 500" },
      { srv.base .. "/echo", "bad reply" },
    } do
      stdlib.setenv("RSPAMD_URL", case[1])
      d = U.start(read(SRC), { args = case[3] })
      local c = U.client(d)
      local res = c:session { body = "Hello.\r\n" }
      c:close()
      assert.are.equal("c", res.eom and res.eom.cmd, case[1] .. ": " .. show(res.eom))
      local log = U.wait_log(d, "delivering unscored")
      assert.is_truthy(log:find("rspamd: " .. case[2], 1, true), log)
      d:stop()
      d = nil
    end
  end)
end)
