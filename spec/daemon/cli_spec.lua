-- luacheck: std +busted
-- `luamilter check`, and the daemon refusing to start on a broken script.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local D = U.D
local stdlib = require "posix.stdlib"
local unistd = require "posix.unistd"

describe("luamilter check / start", function()
  local dir, files

  before_each(function()
    dir = assert(stdlib.mkdtemp("/tmp/luamilter-cli-XXXXXX"))
    files = {}
  end)

  after_each(function()
    for _, f in ipairs(files) do os.remove(f) end
    os.remove(dir .. "/m.sock")
    unistd.rmdir(dir)
  end)

  local function write(name, src)
    local path = dir .. "/" .. name
    local f = assert(io.open(path, "wb"))
    f:write(src)
    f:close()
    files[#files + 1] = path
    return path
  end

  local function check(src)
    local path = write("script.lua", src)
    return D.run({ "check", path }, 10), path
  end

  it("accepts a good script (exit 0)", function()
    local r = check(U.script [[
function H.eom(ctx) return milter.accept{ add_header = { { "X-A", "b" } } } end
function H.envfrom(ctx, sender) end
return H
]])
    assert.is_falsy(r.timed_out)
    assert.are.equal("exited", r.how)
    assert.are.equal(0, r.status, r.stderr)
  end)

  it("accepts a script using cjson and cjson.safe", function()
    local r = check([[
local cjson = require "cjson"
local safe = require "cjson.safe"
assert(cjson.encode({ 1 }) == "[1]" and safe.decode("{") == nil)
return { eom = function() end }
]])
    assert.are.equal(0, r.status, r.stderr)
  end)

  it("reports a syntax error with file:line (exit 1)", function()
    local r, path = check("local milter = require 'milter'\nlocal x = 1\nlocal y = = 2\nreturn {}\n")
    assert.are.equal("exited", r.how)
    assert.are.equal(1, r.status)
    assert.is_truthy(r.stderr:find(path .. ":3:", 1, true), r.stderr)
  end)

  it("reports a script that errors at top level with file:line (exit 1)", function()
    local r, path = check("local t = {}\nerror('top-level-marker')\nreturn t\n")
    assert.are.equal(1, r.status)
    assert.is_truthy(r.stderr:find(path .. ":2:", 1, true), r.stderr)
    assert.is_truthy(r.stderr:find("top-level-marker", 1, true), r.stderr)
  end)

  it("reports a runtime error in a required-at-load helper with file:line", function()
    local r, path = check("local function f() local t = nil; return t.x end\nf()\nreturn {}\n")
    assert.are.equal(1, r.status)
    assert.is_truthy(r.stderr:find(path .. ":1:", 1, true), r.stderr)
  end)

  it("rejects a script returning a non-table (exit 1)", function()
    local r, path = check("return 42\n")
    assert.are.equal(1, r.status)
    assert.is_truthy(r.stderr:find(path, 1, true), r.stderr)
  end)

  it("rejects a script returning nothing (exit 1)", function()
    local r = check("local x = 1\n")
    assert.are.equal(1, r.status)
    assert.are_not.equal("", r.stderr)
  end)

  it("rejects an unknown handler key and names it (exit 1)", function()
    local r = check([[
return {
  envelope_from = function(ctx, sender) end,
  eom = function(ctx) end,
}
]])
    assert.are.equal(1, r.status)
    assert.is_truthy(r.stderr:find("envelope_from", 1, true), r.stderr)
  end)

  it("rejects a handler that is not a function (exit 1)", function()
    local r = check("return { eom = 42 }\n")
    assert.are.equal(1, r.status)
    assert.is_truthy(r.stderr:find("eom", 1, true), r.stderr)
  end)

  it("fails on a missing file (exit 1)", function()
    local r = D.run({ "check", dir .. "/does-not-exist.lua" }, 10)
    assert.are.equal(1, r.status)
    assert.is_truthy(r.stderr:find("does-not-exist.lua", 1, true), r.stderr)
  end)

  local BROKEN = {
    { "a syntax error", "local a = 1\nlocal b = (\nreturn {}\n", ":3:" },
    { "a top-level error", "\nerror('boom-at-start')\nreturn {}\n", ":2:" },
    { "an unknown handler key", "return { helo_handler = function() end }\n", "helo_handler" },
  }
  for _, b in ipairs(BROKEN) do
    it("the daemon refuses to start on " .. b[1] .. " (exit 1, reason on stderr)", function()
      local path = write("script.lua", b[2])
      local r = D.run({ "-l", "unix:" .. dir .. "/m.sock", path }, 5)
      assert.is_falsy(r.timed_out, "the daemon kept running")
      assert.are.equal("exited", r.how)
      assert.are.equal(1, r.status)
      local want = b[3]:sub(1, 1) == ":" and (path .. b[3]) or b[3]
      assert.is_truthy(r.stderr:find(want, 1, true), r.stderr)
    end)
  end

  it("--version prints the name and exits 0", function()
    local r = D.run({ "--version" }, 5)
    assert.are.equal(0, r.status)
    assert.is_truthy(r.stdout:find("luamilter", 1, true), r.stdout)
  end)

  it("--help prints usage and exits 0", function()
    local r = D.run({ "--help" }, 5)
    assert.are.equal(0, r.status)
    assert.is_truthy((r.stdout .. r.stderr):find("check", 1, true))
  end)
end)
