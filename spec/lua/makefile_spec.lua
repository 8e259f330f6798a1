-- The Makefile under make -j: nothing is compiled before scripts/deps.sh
-- has installed what the compiler needs (on a fresh machine, `make -j2`
-- once ran luajit and cc beside the apt-get that was installing them).
-- DEPS_SH stands in for scripts/deps.sh: it takes a second, then leaves a
-- mark; CC is a wrapper that fails unless the mark is there.
local stdlib = require "posix.stdlib"

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1; echo \"rc=$?\""))
  local out = p:read("*a")
  p:close()
  return tonumber(out:match("rc=(%d+)%s*$")), out
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  assert(os.execute("chmod +x " .. path) == 0)
end

describe("Makefile", function()
  local dir

  before_each(function()
    dir = assert(stdlib.mkdtemp("/tmp/luamilter-makespec-XXXXXX"))
    write(dir .. "/deps", "#!/bin/sh\nsleep 1\necho \"$1\" >>" .. dir .. "/deps.done\n")
    write(dir .. "/cc", "#!/bin/sh\n[ -e " .. dir .. "/deps.done ] || { echo 'cc ran before deps' >&2; exit 97; }\n"
      .. "exec gcc \"$@\"\n")
  end)

  after_each(function()
    os.execute("rm -rf " .. dir)
  end)

  it("make -j4 all compiles only after deps, which runs once", function()
    local rc, out = sh(("make -j4 B=%s/b DEPS_SH=%s/deps CC=%s/cc CFLAGS='-O0 -g0' all"):format(dir, dir, dir))
    assert.are.equal(0, rc, out)
    assert.falsy(out:find("cc ran before deps", 1, true), out)
    local f = assert(io.open(dir .. "/deps.done"))
    assert.are.equal("build\n", f:read("*a"))
    f:close()
    assert.truthy(io.open(dir .. "/b/luamilter"), out)
  end)
end)
