-- luacheck: std +busted
-- The Debian package `make deb` built (in $LUAMILTER_DEB_DIR, build/deb by
-- default; `make deb-check` builds it, then runs this): lintian finds
-- nothing, even pedantic; the files, conffiles, dependencies and
-- maintainer scripts are the ones intended; the packaged binary runs and
-- loads the packaged policy; the packaged unit and options agree with the
-- source's and put the socket in Postfix's spool.  Nothing is installed on
-- this machine here: scripts/deb-install-check.sh, after this in make
-- deb-check, installs, runs and purges it.
package.path = "./?.lua;" .. package.path
local L = require "spec.daemon.lifecycle_util"
local unistd = require "posix.unistd"

local DIR = os.getenv("LUAMILTER_DEB_DIR") or "build/deb"
if DIR:sub(1, 1) ~= "/" then DIR = unistd.getcwd() .. "/" .. DIR end

local function sh(cmd)
  local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo rc=$?"))
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("rc=(%d+)\n$"))
  return rc, (out:gsub("rc=%d+\n$", ""))
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function version()
  local src = assert(L.read("src/main.c"))
  return assert(src:match('#define VERSION "([^"]+)"'))
end

local function deb()
  local rc, arch = sh("dpkg --print-architecture")
  assert.are.equal(0, rc, arch)
  local path = DIR .. "/luamilter_" .. version() .. "_" .. arch:gsub("%s+$", "") .. ".deb"
  assert(L.exists(path), path .. " is missing: run make deb")
  return path
end

describe("make deb", function()
  local tmp
  before_each(function() tmp = L.tmpdir("luamilter-deb") end)
  after_each(function() L.rmtree(tmp) end)

  it("is lintian-clean, pedantic and informational tags included", function()
    local changes = DIR .. "/luamilter_" .. version() .. "_*.changes"
    local rc, out = sh("lintian --pedantic --display-info " .. changes .. " 2>&1 | grep -v '^running with root'")
    assert.are.equal("", out)
    assert.are.equal(1, rc) -- grep found no line: lintian printed none
  end)

  it("holds the intended files, conffiles and dependencies", function()
    local path = deb()
    local rc, list = sh("dpkg-deb -c " .. q(path) .. " | awk '{print substr($1,1,1), $2, $6}' | sort -k3")
    assert.are.equal(0, rc, list)
    local files = {}
    for kind, owner, name in list:gmatch("(%S) (%S+) (%S+)\n") do
      if kind == "-" then files[#files + 1] = name end
      assert.are.equal("root/root", owner, name)
    end
    assert.are.same({
      "./etc/default/luamilter",
      "./etc/luamilter/policy.lua",
      "./lib/systemd/system/luamilter.service",
      "./usr/sbin/luamilter",
      "./usr/share/doc/luamilter/changelog.gz",
      "./usr/share/doc/luamilter/copyright",
      "./usr/share/lintian/overrides/luamilter",
      "./usr/share/lua/5.1/milter/test.lua",
      "./usr/share/luamilter/example.lua",
      "./usr/share/man/man8/luamilter.8.gz",
    }, files)
    assert.truthy(list:find("d root/root ./var/spool/postfix/luamilter/\n", 1, true), list)

    local _, conffiles = sh("dpkg-deb --ctrl-tarfile " .. q(path) .. " | tar -xO ./conffiles")
    assert.are.equal("/etc/default/luamilter\n/etc/luamilter/policy.lua\n", conffiles)
    local _, fields = sh("dpkg-deb -f " .. q(path) .. " Package Version Depends Section")
    assert.truthy(fields:find("Package: luamilter\n", 1, true), fields)
    assert.truthy(fields:find("Version: " .. version() .. "\n", 1, true), fields)
    assert.truthy(fields:find("Section: mail\n", 1, true), fields)
    for _, dep in ipairs { "adduser", "lua-cjson", "libluajit-5.1-2", "libev4", "liblmdb0", "libsystemd0" } do
      assert.truthy(fields:find("[ ,]" .. dep:gsub("%-", "%%-") .. "[ ,\n]"), dep .. " not in Depends: " .. fields)
    end
  end)

  it("runs as its own user with its socket in Postfix's spool, and its binary loads its policy", function()
    local path = deb()
    local root = tmp .. "/root"
    local rc, out = sh("dpkg-deb -x " .. q(path) .. " " .. q(root))
    assert.are.equal(0, rc, out)

    -- the packaged binary runs, and loads the packaged policy
    local bin = root .. "/usr/sbin/luamilter"
    rc, out = sh(q(bin) .. " --version")
    assert.are.equal(0, rc, out)
    assert.are.equal("luamilter " .. version() .. "\n", out)
    rc, out = sh(q(bin) .. " check " .. q(root .. "/etc/luamilter/policy.lua"))
    assert.are.equal(0, rc, out)
    assert.are.equal(assert(L.read("example.lua")), L.read(root .. "/etc/luamilter/policy.lua"))

    -- the unit is the source's, starting /usr/sbin/luamilter
    local unit = assert(L.read(root .. "/lib/systemd/system/luamilter.service"))
    assert.are.equal(assert(L.read("scripts/luamilter.service")),
                     (unit:gsub("/usr/sbin/luamilter", "/usr/local/sbin/luamilter")))
    assert.truthy(unit:find("\nUser=luamilter\n", 1, true))
    assert.truthy(unit:find("\nReadWritePaths=[^\n]*%-/var/spool/postfix/luamilter\n"), unit)

    -- /etc/default/luamilter listens where a chrooted Postfix reaches it
    local default = assert(L.read(root .. "/etc/default/luamilter"))
    local opts = assert(default:match("\nLUAMILTER_OPTIONS=([^\n]+)\n"), default)
    assert.truthy(opts:find("--listen unix:/var/spool/postfix/luamilter/luamilter.sock", 1, true), opts)
    assert.truthy(opts:find("--store lmdb:/var/lib/luamilter/store.mdb", 1, true), opts)
    assert.truthy(default:find("\nLUAMILTER_SCRIPT=/etc/luamilter/policy.lua\n", 1, true), default)
    -- which the binary accepts: check with those options
    rc, out = sh(q(bin) .. " " .. opts:gsub("/var/lib/luamilter", tmp .. "/state") .. " check "
                 .. q(root .. "/etc/luamilter/policy.lua"))
    assert.are.equal(0, rc, out)

    -- the maintainer scripts: the user, the set-group-ID socket directory
    rc, out = sh("cd " .. q(tmp) .. " && dpkg-deb -e " .. q(path) .. " ctl && sh -n ctl/postinst && sh -n ctl/postrm")
    assert.are.equal(0, rc, out)
    local postinst = assert(L.read(tmp .. "/ctl/postinst"))
    assert.truthy(postinst:find("adduser --system --group", 1, true), postinst)
    assert.truthy(postinst:find("chmod 2750 /var/spool/postfix/luamilter", 1, true), postinst)
    assert.truthy(postinst:find("deb-systemd-helper enable 'luamilter.service'", 1, true), postinst)
    -- purge removes the user and group postinst made
    local postrm = assert(L.read(tmp .. "/ctl/postrm"))
    assert.truthy(postrm:find("deluser --system", 1, true), postrm)
    assert.truthy(postrm:find("delgroup --system", 1, true), postrm)
  end)
end)
