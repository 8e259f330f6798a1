-- luacheck: std +busted
-- make install DESTDIR=<tmp> PREFIX=/usr: exactly the files it should
-- install, where they go, with their modes; the installed binary runs; the
-- unit names the installed binary; and milter.test loads from the
-- installed tree (a LuaJIT whose package.path has PREFIX/share/lua/5.1, as
-- the stock one has for /usr and /usr/local) and plays a session with it.
package.path = "./?.lua;" .. package.path
local L = require "spec.daemon.lifecycle_util"
local unistd = require "posix.unistd"

local function sh(cmd)
  local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo rc=$?"))
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("rc=(%d+)\n$"))
  return rc, out:gsub("rc=%d+\n$", "")
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- the build directory of the binary under test (build, or build-asan)
local function build_dir()
  local bin = os.getenv("LUAMILTER_BIN") or "build/luamilter"
  return bin:match("^(.*)/luamilter$") or "build"
end

describe("make install", function()
  local dir
  before_each(function() dir = L.tmpdir("luamilter-install") end)
  after_each(function() L.rmtree(dir) end)

  it("installs the binary, milter.test, the man page, the unit and its examples", function()
    local dest = dir .. "/dest"
    local rc, out = sh("make -s install B=" .. q(build_dir()) .. " DESTDIR=" .. q(dest) .. " PREFIX=/usr")
    assert.are.equal(0, rc, out)

    local rc2, listing = sh("cd " .. q(dest) .. " && find . -type f -printf '%m %p\\n' | sort")
    assert.are.equal(0, rc2, listing)
    assert.are.equal(table.concat({
      "644 ./usr/lib/systemd/system/luamilter.service",
      "644 ./usr/share/lua/5.1/milter/test.lua",
      "644 ./usr/share/luamilter/example.lua",
      "644 ./usr/share/luamilter/luamilter.default",
      "644 ./usr/share/man/man8/luamilter.8",
      "755 ./usr/sbin/luamilter",
    }, "\n") .. "\n", listing)

    -- the binary runs
    local bin = dest .. "/usr/sbin/luamilter"
    local vrc, version = sh(q(bin) .. " --version")
    assert.are.equal(0, vrc, version)
    assert.truthy(version:match("^luamilter %d+%.%d+%.%d+\n$"), version)
    local hrc, help = sh(q(bin) .. " --help")
    assert.are.equal(0, hrc, help)
    assert.truthy(help:find("--listen SPEC", 1, true), help)

    -- the unit starts the installed binary, the rest is the source's
    local unit = assert(L.read(dest .. "/usr/lib/systemd/system/luamilter.service"))
    assert.truthy(unit:find("\nExecStart=/usr/sbin/luamilter $LUAMILTER_OPTIONS ${LUAMILTER_SCRIPT}\n", 1, true), unit)
    assert.are.equal(assert(L.read("scripts/luamilter.service")),
                     (unit:gsub("/usr/sbin/luamilter", "/usr/local/sbin/luamilter")))
    assert.are.equal(assert(L.read("scripts/luamilter.8")), L.read(dest .. "/usr/share/man/man8/luamilter.8"))

    -- milter.test from the installed tree, run from elsewhere (no ./lua on
    -- the path), falls back to the installed binary when nothing else is
    -- given: here that path is under DESTDIR, so LUAMILTER_BIN names it
    local installed = assert(L.read(dest .. "/usr/share/lua/5.1/milter/test.lua"))
    assert.truthy(installed:find('return "/usr/sbin/luamilter"', 1, true))
    local script = unistd.getcwd() .. "/example.lua"
    local lua = table.concat({
      'package.path = ' .. string.format("%q", dest .. "/usr/share/lua/5.1/?.lua;") .. ' .. package.path',
      'local mt = require "milter.test"',
      'local r = mt.run{ script = ' .. string.format("%q", script) .. ', message = mt.message{',
      '  headers = { { "From", "ann@partner.example" }, { "To", "bob@example.org" }, { "Subject", "hi" } },',
      '  body = "hello\\r\\n" } }',
      'print("STATUS", r.status, r.final and r.final.action)',
      'print("FROM", debug.getinfo(mt.run, "S").source)',
    }, "\n")
    L.write(dir .. "/use.lua", lua)
    local lrc, got = sh("cd / && LUAMILTER_BIN=" .. q(bin) .. " luajit " .. q(dir .. "/use.lua"))
    assert.are.equal(0, lrc, got)
    assert.truthy(got:find("STATUS\t0\t", 1, true), got)
    assert.truthy(got:find("FROM\t@" .. dest .. "/usr/share/lua/5.1/milter/test.lua", 1, true), got)
  end)

  it("honours PREFIX: /usr/local by default", function()
    local dest = dir .. "/dest"
    local rc, out = sh("make -s install B=" .. q(build_dir()) .. " DESTDIR=" .. q(dest))
    assert.are.equal(0, rc, out)
    assert.truthy(L.exists(dest .. "/usr/local/sbin/luamilter"))
    assert.truthy(L.exists(dest .. "/usr/local/share/lua/5.1/milter/test.lua"))
    assert.truthy(L.exists(dest .. "/usr/local/share/man/man8/luamilter.8"))
    local unit = assert(L.read(dest .. "/usr/local/lib/systemd/system/luamilter.service"))
    assert.are.equal(assert(L.read("scripts/luamilter.service")), unit)
    -- and uninstall takes it all away again
    rc, out = sh("make -s uninstall DESTDIR=" .. q(dest))
    assert.are.equal(0, rc, out)
    local _, left = sh("find " .. q(dest) .. " -type f")
    assert.are.equal("", left)
  end)
end)
