-- luacheck: std +busted
-- Errors name the script's own line: the constructor's caller, the return
-- of a bad verdict, the assignment to a global, the require that failed
-- (with every path it tried); a tail call, which leaves no line, is named
-- by its handler and the lines of the handler's tail calls.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local D = U.D
local mt = require "milter.test"
local stdlib = require "posix.stdlib"
local unistd = require "posix.unistd"

describe("error locations", function()
  local dir, files

  before_each(function()
    dir = assert(stdlib.mkdtemp("/tmp/luamilter-lines-XXXXXX"))
    files = {}
  end)

  after_each(function()
    for _, f in ipairs(files) do os.remove(f) end
    unistd.rmdir(dir)
  end)

  local function write(src)
    local path = dir .. "/policy.lua"
    local f = assert(io.open(path, "wb"))
    f:write(src)
    f:close()
    files[#files + 1] = path
    return path
  end

  local function run(src)
    local path = write(src)
    return mt.run { script = path, file = "spec/eml/plain-lf.eml" }, path
  end

  it("names the return line of `return milter.reject(\"string\")` (a tail call)", function()
    local src = [[
local milter = require "milter"
return { connect = function(ctx, host)
  if host ~= "[192.0.2.66]" then
    return milter.reject("listed") -- only tail call
  end
end }
]]
    local r, path = run(src)
    assert.are.equal(2, r.status)
    local line = r.stderr:match("handler connect failed: ([^\n]*)")
    assert.are.equal("milter.reject expects a table or nothing, got string " ..
      "(in a tail call, `return f(...)`, of connect at " .. path .. ":" .. U.line_of(src, "only tail call") .. ")",
      line)
  end)

  it("an error of the handler's own code, with a tail call after it, is no tail call's", function()
    -- the failed coroutine's top frame (the handler's) has no line left:
    -- the note of a tail call is for a handler whose frame is gone
    local src = [[
local milter = require "milter"
return { connect = function(ctx, host)
  local n
  if host then n = n + 1 end -- the bad sum
  return milter.reject{ code = 550 }
end }
]]
    local r, path = run(src)
    assert.are.equal(2, r.status)
    local line = r.stderr:match("handler connect failed: ([^\n]*)")
    assert.are.equal(path .. ":" .. U.line_of(src, "the bad sum") ..
      ": attempt to perform arithmetic on local 'n' (a nil value)", line, r.stderr)
  end)

  it("names the caller's line when the constructor is not tail-called", function()
    local src = [[
local milter = require "milter"
return { helo = function(ctx, name)
  local v = milter.tempfail("busy") -- here
  return v
end }
]]
    local r, path = run(src)
    assert.truthy(r.stderr:find("handler helo failed: " .. path .. ":" .. U.line_of(src, "-- here") ..
      ": milter.tempfail expects a table or nothing, got string", 1, true), r.stderr)
  end)

  it("names the return that produced a bad verdict, or the candidates", function()
    local src = [[
local milter = require "milter"
return { envfrom = function(ctx)
  return milter.reject{ code = 250 } -- one return
end }
]]
    local r, path = run(src)
    assert.truthy(r.stderr:find("bad verdict from envfrom (handler at " .. path .. ":2, returned at " .. path ..
      ":" .. U.line_of(src, "one return") .. "): code must be a 5xx number for reject", 1, true), r.stderr)
    src = [[
local milter = require "milter"
return { envrcpt = function(ctx, rcpt)
  if rcpt == "<x@y>" then return milter.continue() end -- first
  local v = { action = "reject", code = 200 }
  return v -- second
end }
]]
    r, path = run(src)
    assert.truthy(r.stderr:find("bad verdict from envrcpt (handler at " .. path .. ":2, returned at " .. path ..
      ":" .. U.line_of(src, "-- first") .. " or " .. U.line_of(src, "-- second") .. "): code must be", 1, true),
      r.stderr)
  end)

  it("warns of a global write at the assignment's line", function()
    local src = U.script [[
function H.helo(ctx, name)
  last_helo = name -- the write
end
return H
]]
    local d = U.start(src)
    finally(function() d:stop() end)
    local res = U.normal_session(d)
    assert.is_nil(res.error)
    U.wait_log(d, "writes global")
    d:stop()
    local want = "[lua] " .. d.script_path .. ":" .. U.line_of(src, "-- the write") ..
      ": script writes global 'last_helo': globals are shared by every connection"
    assert.truthy(d:log():find(want, 1, true), d:log())
    assert.matches("WARN %[c=%d+", d:log()) -- tagged with the connection
  end)

  it("prints the whole message of a failed require, at the script's line", function()
    local src = "local milter = require 'milter'\nlocal u = require 'myutil_missing'\nreturn {}\n"
    local path = write(src)
    local r = D.run({ "check", path }, 10)
    assert.are.equal(1, r.status)
    assert.truthy(r.stderr:find(path .. ":2: module 'myutil_missing' not found:", 1, true), r.stderr)
    assert.truthy(r.stderr:find("no file '" .. dir .. "/myutil_missing.lua'", 1, true), r.stderr)
    assert.is_nil(r.stderr:find("stack traceback", 1, true))
  end)

  it("locates a bad argument to a C function at the script's line", function()
    local src = [[
local milter = require "milter"
return { connect = function(ctx)
  local a = milter.dns.query("example.org", "BOGUS") -- bad type
  return a and nil
end }
]]
    local r, path = run(src)
    assert.truthy(r.stderr:find("handler connect failed: " .. path .. ":" .. U.line_of(src, "bad type") ..
      ": bad argument #2 to 'query'", 1, true), r.stderr)
  end)
end)
