-- luacheck: std +busted
-- The man page luamilter(8), scripts/luamilter.8: groff formats it without
-- a warning, and its options cannot drift from the binary's: every long
-- option the code parses (src/main.c, src/offline.c) is in --help, every
-- one in --help has an entry in the man page and a row in the README, and
-- every entry of the man page is an option the code parses.
package.path = "./?.lua;" .. package.path
local U = require "spec.daemon.util"
local L = require "spec.daemon.lifecycle_util"
local D = U.D

local PAGE = "scripts/luamilter.8"

local function sh(cmd)
  local p = assert(io.popen(cmd .. "; echo rc=$?"))
  local out = p:read("*a")
  p:close()
  return out
end

-- "\-\-max\-body" -> "max-body" for each long option in a roff line
local function roff_options(line)
  local set = {}
  for name in line:gsub("\\%-", "-"):gmatch("%-%-([a-z][a-z-]*)") do set[name] = true end
  return set
end

local function keys(t)
  local list = {}
  for k in pairs(t) do list[#list + 1] = k end
  table.sort(list)
  return list
end

local function code_options()
  local set = {}
  for _, f in ipairs { "src/main.c", "src/offline.c" } do
    local src = assert(L.read(f))
    for name in src:gmatch('{"([a-z][a-z-]*)",%s*[a-z_]+_argument') do set[name] = true end
  end
  return set
end

local function help_options()
  local r = D.run({ "--help" })
  assert.are.equal(0, r.status, r.stderr)
  local set = {}
  for name in r.stdout:gmatch("%-%-([a-z][a-z-]*)") do set[name] = true end
  return set, r.stdout
end

-- the options the man page has an entry for: the tag lines of .TP/.TQ items
local function page_entries(page)
  local set, tag = {}, false
  for line in page:gmatch("[^\n]*") do
    if tag and line ~= "" then
      for name in pairs(roff_options(line)) do set[name] = true end
      tag = false
    end
    if line == ".TP" or line == ".TQ" then tag = true end
  end
  return set
end

describe("luamilter(8)", function()
  it("formats without a warning (man --warnings)", function()
    local out = sh("MANWIDTH=80 man --warnings -l " .. PAGE .. " 2>&1 >/dev/null")
    assert.are.equal("rc=0\n", out)
    -- and warnings would be seen: a page with an unknown macro gets one
    local dir = L.tmpdir("luamilter-man")
    L.write(dir .. "/bad.8", assert(L.read(PAGE)) .. ".XX unknown\n")
    out = sh("MANWIDTH=80 man --warnings -l " .. dir .. "/bad.8 2>&1 >/dev/null")
    L.rmtree(dir)
    assert.truthy(out:find("warning: macro 'XX' not defined", 1, true), out)
  end)

  it("has an entry for every long option of --help, and only for options the code parses", function()
    local page = assert(L.read(PAGE))
    local code = code_options()
    local help, text = help_options()
    assert.truthy(#keys(code) >= 30, "too few options found in the code: " .. table.concat(keys(code), " "))
    for _, name in ipairs(keys(code)) do
      assert.truthy(help[name], "--" .. name .. " is parsed but not in --help:\n" .. text)
    end
    local entries = page_entries(page)
    for _, name in ipairs(keys(help)) do
      assert.truthy(entries[name], "--" .. name .. " of --help has no entry in " .. PAGE)
    end
    for _, name in ipairs(keys(entries)) do
      assert.truthy(code[name], PAGE .. " documents --" .. name .. ", which the code does not parse")
    end
    -- every option in the page's running text exists too
    for _, name in ipairs(keys(roff_options(page))) do
      assert.truthy(code[name], PAGE .. " mentions --" .. name .. ", which the code does not parse")
    end
  end)

  it("agrees with the README's options table and the binary's version", function()
    local readme = assert(L.read("README.md"))
    local help = help_options()
    for _, name in ipairs(keys(help)) do
      assert.truthy(readme:find("%-%-" .. name:gsub("%-", "%%-") .. "[^a-z-]"),
                    "--" .. name .. " is not in README.md")
    end
    local r = D.run({ "--version" })
    local version = assert(r.stdout:match("^luamilter (%S+)\n"), r.stdout)
    local th = assert(L.read(PAGE)):match('^[^\n]*\n') -- first line: .TH
    assert.truthy(th:find('"luamilter ' .. version .. '"', 1, true), th)
  end)
end)
