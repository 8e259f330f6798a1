-- luajit scripts/bcname.lua IN.lua NAME OUT.raw: IN compiled to bytecode
-- with its line numbers kept and named "=NAME" (not by its path), so that
-- tracebacks show `milter:12` and the bridge can tell the module's frames
-- from the script's (which are named "@file").
local input, name, output = ...
local f = assert(io.open(input, "rb"))
local src = f:read("*a")
f:close()
local fn = assert(loadstring(src, "=" .. name))
local o = assert(io.open(output, "wb"))
o:write(string.dump(fn))
o:close()
