-- Writes fuzzing seeds: the MTA side of every capture, each with a prefix of
-- three control bytes (handler set, body limit and split size).
-- usage: luajit scripts/fuzz-seeds.lua FIXTURES_DIR OUT_DIR
local fx = dofile(arg[1] .. "/tools/fixture.lua")
local out = arg[2]
local n = 0
for name in io.popen("ls " .. arg[1] .. "/postfix/*.milter " .. arg[1] .. "/libmilter/*.milter"):lines() do
  local parts = {}
  for _, p in ipairs(fx.load(name)) do
    if p.dir == ">" and p.cmd ~= "EOF" then parts[#parts + 1] = p.wire end
  end
  for i, prefix in ipairs({ "\255\15\40", "\0\1\7", "\0\16\200" }) do
    local f = assert(io.open(("%s/%s-%d"):format(out, name:match("([^/]+)%.milter$"), i), "wb"))
    f:write(prefix .. table.concat(parts))
    f:close()
    n = n + 1
  end
end
io.stderr:write(("wrote %d seeds to %s\n"):format(n, out))
